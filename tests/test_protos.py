"""The committed protocol modules match their ``.proto`` sources and load on this runtime."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.message import Message

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_DIR = Path("cipdplugin") / "protocol"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "generate_protos", REPO_ROOT / "scripts" / "generate_protos.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()
SOURCES: list[str] = GENERATOR.proto_files()
GENERATED_FILES = sorted(
    f"{Path(source).stem}_pb2{suffix}" for source in SOURCES for suffix in (".py", ".pyi")
)


def test_the_protocol_sources_are_found() -> None:
    expected = {"cipd.proto", "config.proto", "plugin.proto"}
    assert {f"cipdplugin/protocol/{name}" for name in expected} <= set(SOURCES)


@pytest.fixture(scope="module")
def generated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The matrix environments run without the generating tools: only the
    # development environment can say whether the committed files are stale.
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) generates the protocol modules")
    out_dir = tmp_path_factory.mktemp("protos")
    GENERATOR.generate(out_dir)
    return out_dir / PROTOCOL_DIR


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_generated_file_is_up_to_date(generated_dir: Path, name: str) -> None:
    committed_path = REPO_ROOT / PROTOCOL_DIR / name
    fresh = (generated_dir / name).read_text(encoding="utf-8")
    committed = committed_path.read_text(encoding="utf-8") if committed_path.exists() else ""
    if fresh != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                f"{PROTOCOL_DIR / name} (committed)",
                f"{PROTOCOL_DIR / name} (generated now)",
            )
        )
        pytest.fail(f"{PROTOCOL_DIR / name} is stale: run make protos\n{diff[:4000]}")


def test_nothing_else_is_generated(generated_dir: Path) -> None:
    assert sorted(p.name for p in generated_dir.iterdir()) == GENERATED_FILES


def test_nothing_stale_is_committed() -> None:
    # A module whose .proto is gone would still import, and still register.
    committed = sorted(
        p.name for p in (REPO_ROOT / PROTOCOL_DIR).iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi"))
    )
    assert committed == GENERATED_FILES
    assert not list((REPO_ROOT / PROTOCOL_DIR).glob("*_grpc.py"))


def test_module_names_follow_protoc() -> None:
    assert GENERATOR.module_of("google/rpc/status.proto") == "google.rpc.status_pb2"
    assert GENERATOR.module_of("cipdplugin/protocol/cipd.proto") == "cipdplugin.protocol.cipd_pb2"


@pytest.mark.parametrize("source", SOURCES)
def test_module_builds_every_declared_type(source: str) -> None:
    # Runs on every protobuf of the supported range (the test matrix): the
    # builder the modules call must still make real classes there.
    module = importlib.import_module(GENERATOR.module_of(source))
    descriptor = module.DESCRIPTOR
    assert descriptor.name == source
    for name, message_descriptor in descriptor.message_types_by_name.items():
        cls = getattr(module, name)
        assert issubclass(cls, Message)
        assert cls.DESCRIPTOR is message_descriptor
        assert cls.__module__ == module.__name__
        assert cls.FromString(cls().SerializeToString()) == cls()
    for name, enum_descriptor in descriptor.enum_types_by_name.items():
        assert getattr(module, name).DESCRIPTOR is enum_descriptor
        for value in enum_descriptor.values:
            assert getattr(module, value.name) == value.number


@pytest.mark.parametrize("source", SOURCES)
def test_module_matches_its_stub(source: str) -> None:
    # mypy reads the .pyi: every public name it promises must exist at run time.
    module = importlib.import_module(GENERATOR.module_of(source))
    stub = (REPO_ROOT / PROTOCOL_DIR / f"{Path(source).stem}_pb2.pyi").read_text(encoding="utf-8")
    promised = [
        line.split(":")[0].split("(")[0].split()[-1]
        for line in stub.splitlines()
        if line.startswith(("class ", "DESCRIPTOR:")) or (line[:1].isupper() and ": " in line)
    ]
    assert promised
    missing = [name for name in promised if not hasattr(module, name)]
    assert not missing
