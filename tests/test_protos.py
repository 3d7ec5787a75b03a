"""The committed generated protocol modules match their ``.proto`` sources."""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_DIR = Path("cipdplugin") / "protocol"
GENERATED_FILES = (
    "cipd_pb2.py",
    "cipd_pb2.pyi",
    "config_pb2.py",
    "config_pb2.pyi",
    "plugin_pb2.py",
    "plugin_pb2.pyi",
    "plugin_pb2_grpc.py",
)

# Lines that name the generating tools' versions: a patch release of
# grpcio-tools changes them without changing what goes on the wire.
_VERSION_PATTERNS = (
    (re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE), "# Protobuf Python Version: <version>"),
    (
        re.compile(
            r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.\w+,)\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"
        ),
        r"\1 <version>,",
    ),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE), "GRPC_GENERATED_VERSION = <version>"),
)


def _without_versions(text: str) -> str:
    for pattern, replacement in _VERSION_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "generate_protos", REPO_ROOT / "scripts" / "generate_protos.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("protos")
    _load_generator().generate(out_dir)
    return out_dir / PROTOCOL_DIR


def test_version_lines_are_recognised() -> None:
    # Guards the normalisation itself: if the generators change these lines'
    # shape, the staleness test must not silently compare them verbatim.
    pb2 = (REPO_ROOT / PROTOCOL_DIR / "plugin_pb2.py").read_text(encoding="utf-8")
    grpc_module = (REPO_ROOT / PROTOCOL_DIR / "plugin_pb2_grpc.py").read_text(encoding="utf-8")
    assert "# Protobuf Python Version: <version>" in _without_versions(pb2)
    assert "_runtime_version.Domain.PUBLIC, <version>," in _without_versions(pb2)
    assert "GRPC_GENERATED_VERSION = <version>" in _without_versions(grpc_module)


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_generated_file_is_up_to_date(generated_dir: Path, name: str) -> None:
    committed_path = REPO_ROOT / PROTOCOL_DIR / name
    fresh = _without_versions((generated_dir / name).read_text(encoding="utf-8"))
    committed = _without_versions(committed_path.read_text(encoding="utf-8"))
    if fresh != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                f"{PROTOCOL_DIR / name} (committed)",
                f"{PROTOCOL_DIR / name} (generated now)",
            )
        )
        pytest.fail(
            f"{PROTOCOL_DIR / name} is stale: the .proto sources have changed; run make protos\n{diff[:4000]}"
        )


def test_nothing_else_is_generated(generated_dir: Path) -> None:
    assert sorted(p.name for p in generated_dir.iterdir()) == sorted(GENERATED_FILES)
