"""Compile the protocol's ``.proto`` sources into Python modules.

Run by ``make protos``, and by the staleness test into a scratch folder.
The include path is the installed grpcio-tools (``google/protobuf``) and
googleapis-common-protos (``google/rpc``), so nothing is vendored.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROTO_FILES = (
    "cipdplugin/protocol/cipd.proto",
    "cipdplugin/protocol/plugin.proto",
    "cipdplugin/protocol/config.proto",
)
# Only these declare services, so only they get a ``_pb2_grpc`` module.
SERVICE_FILES = ("cipdplugin/protocol/plugin.proto",)
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _include_dirs() -> list[str]:
    import google.rpc
    import grpc_tools

    tools_protos = Path(grpc_tools.__file__).parent / "_proto"
    rpc_root = Path(next(iter(google.rpc.__path__))).parents[1]
    return [str(PACKAGE_ROOT), str(tools_protos), str(rpc_root)]


def generate(out_dir: Path) -> None:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_dir``."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{d}" for d in _include_dirs()]
    messages = [f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
    services = [f"--grpc_python_out={out_dir}"]
    for outputs, files in ((messages, PROTO_FILES), (services, SERVICE_FILES)):
        args = ["grpc_tools.protoc", *includes, *outputs]
        args += [str(PACKAGE_ROOT / p) for p in files]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(files)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(PACKAGE_ROOT), help="output root (default: the repository)")
    args = parser.parse_args(argv)
    os.chdir(PACKAGE_ROOT)
    generate(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
