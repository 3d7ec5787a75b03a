"""Admission plugins built with our SDK that do what luci's Go plugins do, so
that the Go host and ours can be compared on the same policy.

Usage: go_peer_plugin.py MODE [--record FILE] [--handshake FILE]. Modes:

* ``trivial``: what ``go-plugin-trivial`` does: denies packages starting
  with ``bad/`` (FAILED_PRECONDITION "bad package"), admits the rest.
* ``example``: what luci's example plugin (``go-example-plugin``) does:
  denies ``experimental/...`` by name; otherwise visits the instance's
  ``allowed-sha256`` metadata with the SDK's default page size and admits
  if one value is the instance's hex digest, with the Go plugin's messages.
* ``raise``: the handler raises RuntimeError("policy exploded").

``--record FILE`` appends one JSON line per admission as the plugin received
it (``admission_id``, ``service_url``, ``package``, ``instance_id``,
``hash_algo``, ``hex_digest``); ``--handshake FILE`` writes the handshake
line exactly as it arrived on stdin (the bytes before the newline, as
latin-1 text) before the SDK parses it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
from typing import BinaryIO

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cipdplugin.plugins import admission

#: What luci's plugins answer, word for word (see tests/go_anchors.py).
BAD_PACKAGE = "bad package"
EXPERIMENTAL = "experimental packages are not allowed"
NO_ENTRIES = 'doesn\'t have metadata entries with key "allowed-sha256"'
ALLOWED_KEY = "allowed-sha256"
VERSION = "go-peer-plugin 1.0"


class _Recorder:
    """Appends one JSON line per admission to a file, whole lines only."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the process's life)

    def record(self, request: admission.Request) -> None:
        line = json.dumps(
            {
                "admission_id": request.admission_id,
                "service_url": request.service_url,
                "package": request.package,
                "instance_id": request.instance_id,
                "hash_algo": request.instance.hash_algo,
                "hex_digest": request.instance.hex_digest,
            }
        )
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()


def _trivial(request: admission.Request, info: admission.InstanceInfo) -> None:
    if request.package.startswith("bad/"):
        raise admission.Denied(BAD_PACKAGE)


def _example(request: admission.Request, info: admission.InstanceInfo) -> None:
    if request.package.startswith("experimental/"):
        raise admission.Denied(EXPERIMENTAL)
    visited = 0
    for entry in info.metadata(keys=[ALLOWED_KEY]):
        visited += 1
        if entry.value.decode("utf-8", errors="replace") == request.instance.hex_digest:
            return
    if visited == 0:
        raise admission.Denied(NO_ENTRIES)
    raise admission.Denied(f'evaluated {visited} metadata entries with key "{ALLOWED_KEY}" and none is valid')


def _raise(request: admission.Request, info: admission.InstanceInfo) -> None:
    raise RuntimeError("policy exploded")


HANDLERS = {"trivial": _trivial, "example": _example, "raise": _raise}


class _Replay(io.RawIOBase):
    """stdin for the SDK after the handshake was read here: that line again, then the real stdin."""

    def __init__(self, first: bytes, rest: BinaryIO) -> None:
        self._first = first
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._first:
            size = len(self._first) if size < 0 else size
            chunk, self._first = self._first[:size], self._first[size:]
            return chunk
        return os.read(self._rest.fileno(), size if size > 0 else 65536)


def _read_line(stdin: BinaryIO) -> bytes:
    """The handshake line with its newline, read byte by byte so nothing after it is taken."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(stdin.fileno(), 1)
        if not byte:
            break
        line += byte
    return line


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="go_peer_plugin.py")
    parser.add_argument("mode", choices=sorted(HANDLERS))
    parser.add_argument("--record")
    parser.add_argument("--handshake")
    args = parser.parse_args(argv[1:])
    handler = HANDLERS[args.mode]
    if args.record:
        recorder = _Recorder(args.record)
        policy = handler

        def handler(request: admission.Request, info: admission.InstanceInfo) -> None:
            recorder.record(request)
            policy(request, info)

    stdin: BinaryIO = sys.stdin.buffer
    if args.handshake:
        line = _read_line(stdin)
        temporary = args.handshake + ".tmp"
        with open(temporary, "w", encoding="latin-1") as file:
            file.write(line.rstrip(b"\n").decode("latin-1"))
        os.replace(temporary, args.handshake)
        stdin = _Replay(line, stdin)  # type: ignore[assignment]
    return admission.run(handler, version=VERSION, stdin=stdin)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
