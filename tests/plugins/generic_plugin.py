"""A test plugin of no particular kind, built on ``cipdplugin.plugins.run``.

Usage: generic_plugin.py MODE [ARG...]. Modes:

* ``wait``: logs "started" and waits until the host closes stdin.
* ``log``: logs one record at each level, then waits.
* ``list-metadata URL``: calls Host.ListMetadata for URL and logs the
  outcome as ``outcome: <CODE> <details>``, then waits.
* ``crash-after-rpc``: sends one Log RPC, then exits with code 5.
* ``print``: writes lines to stdout and stderr, then waits.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import grpc
from google.protobuf.empty_pb2 import Empty

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cipdplugin import plugins
from cipdplugin.protocol import HOST_LIST_METADATA, HOST_LOG, cipd_pb2, plugin_pb2

log = logging.getLogger("generic-plugin")


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else "wait"
    args = argv[2:]

    def run_loop(channel: grpc.Channel, stopping: threading.Event) -> int:
        if mode == "wait":
            log.info("started")
        elif mode == "log":
            logging.getLogger().setLevel(logging.DEBUG)
            log.debug("debug record")
            log.info("info record")
            log.warning("warning record")
            log.error("error record")
        elif mode == "list-metadata":
            call = channel.unary_unary(
                HOST_LIST_METADATA,
                request_serializer=plugin_pb2.ListMetadataRequest.SerializeToString,
                response_deserializer=plugin_pb2.ListMetadataResponse.FromString,
            )
            request = plugin_pb2.ListMetadataRequest(
                service_url=args[0],
                package="a/b",
                instance=cipd_pb2.ObjectRef(hash_algo=cipd_pb2.SHA1, hex_digest="a" * 40),
            )
            try:
                answer = call(request, timeout=10)
                log.info("outcome: OK %d entries", len(answer.metadata))
            except grpc.RpcError as exc:
                log.info("outcome: %s %s", exc.code().name, exc.details())
        elif mode == "crash-after-rpc":
            send = channel.unary_unary(
                HOST_LOG,
                request_serializer=plugin_pb2.LogRequest.SerializeToString,
                response_deserializer=Empty.FromString,
            )
            send(plugin_pb2.LogRequest(severity="info", message="one rpc done"), timeout=10)
            os._exit(5)
        elif mode == "print":
            print("hello on stdout", flush=True)
            print("hello on stderr", file=sys.stderr, flush=True)
        stopping.wait()  # Cannot hang: run() sets it when stdin closes.
        return 0

    return plugins.run(run_loop)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
