"""The programs the benchmarks run as subprocesses.

Usage: ``python benchmarks/plugins.py MODE [ARG...]``. Modes:

* ``admit``: an admission plugin built with the SDK whose handler admits
  everything; what the throughput and cold-start figures measure.
* ``bare-peer PORT WORKERS``: the plugin side of the bare gRPC baseline. It
  speaks the admission messages with nothing of the library: it calls
  ListAdmissions on 127.0.0.1:PORT and answers each Admission with one
  ResolveAdmission call, inline when WORKERS is 0, else from a thread pool
  of that size. It exits when the stream ends.
* ``bare-plugin WORKERS``: a complete admission plugin in bare grpcio, the
  baseline of our SDK under the Go host: it reads the handshake line from
  stdin as JSON, sends the ticket as ``x-plugin-ticket`` metadata on every
  call, opens ListAdmissions and admits each Admission with one
  ResolveAdmission call from a pool of WORKERS threads. It stops when the
  stream ends or stdin closes. No cipdplugin code, only its generated
  messages.
* ``decide-one PACKAGE:INSTANCE_ID``: the process-per-pin baseline, what
  legacy tooling does without the library: one process imports the same
  modules as a plugin, decides one pin, prints the verdict and exits.

Every mode imports only what it needs, so that start-up costs stay
comparable to the floor measured by ``python -c "import
cipdplugin.plugins.admission"``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _admit_everything(request: object, info: object) -> None:
    """The trivial handler: every instance is admitted."""


def _run_admit() -> int:
    from cipdplugin.plugins import admission

    return admission.run(_admit_everything, version="benchmark-plugin 1.0")


def _run_bare_peer(port: int, workers: int) -> int:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from google.protobuf.empty_pb2 import Empty

    from cipdplugin.protocol import ADMISSIONS_LIST, ADMISSIONS_RESOLVE, plugin_pb2

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])
    list_admissions = channel.unary_stream(
        ADMISSIONS_LIST,
        request_serializer=plugin_pb2.ListAdmissionsRequest.SerializeToString,
        response_deserializer=plugin_pb2.Admission.FromString,
    )
    resolve = channel.unary_unary(
        ADMISSIONS_RESOLVE,
        request_serializer=plugin_pb2.ResolveAdmissionRequest.SerializeToString,
        response_deserializer=Empty.FromString,
    )

    def answer(admission: plugin_pb2.Admission) -> None:
        resolve(plugin_pb2.ResolveAdmissionRequest(admission_id=admission.admission_id), timeout=30)

    stream = list_admissions(plugin_pb2.ListAdmissionsRequest(protocol_version=1, plugin_version="bare"))
    try:
        if workers == 0:
            for admission in stream:
                answer(admission)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for admission in stream:
                    pool.submit(answer, admission)
    except grpc.RpcError:
        pass  # The benchmark ends the stream when it is done.
    finally:
        channel.close()
    return 0


def _run_bare_plugin(workers: int) -> int:
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from google.protobuf.empty_pb2 import Empty

    from cipdplugin.protocol import plugin_pb2

    line = b""
    while not line.endswith(b"\n"):  # byte by byte: stdin stays open after it
        byte = os.read(0, 1)
        if not byte:
            return 2
        line += byte
    handshake = json.loads(line)
    metadata = (("x-plugin-ticket", str(handshake["ticket"])),)
    channel = grpc.insecure_channel(f"127.0.0.1:{handshake['port']}", options=[("grpc.enable_http_proxy", 0)])
    list_admissions = channel.unary_stream(
        "/cipd.plugin.Admissions/ListAdmissions",
        request_serializer=plugin_pb2.ListAdmissionsRequest.SerializeToString,
        response_deserializer=plugin_pb2.Admission.FromString,
    )
    resolve = channel.unary_unary(
        "/cipd.plugin.Admissions/ResolveAdmission",
        request_serializer=plugin_pb2.ResolveAdmissionRequest.SerializeToString,
        response_deserializer=Empty.FromString,
    )

    def answer(admission: plugin_pb2.Admission) -> None:
        request = plugin_pb2.ResolveAdmissionRequest(admission_id=admission.admission_id)
        resolve(request, timeout=30, metadata=metadata)

    stream = list_admissions(
        plugin_pb2.ListAdmissionsRequest(protocol_version=1, plugin_version="bare"), metadata=metadata
    )

    def stop_at_end_of_stdin() -> None:
        while os.read(0, 4096):
            pass
        stream.cancel()  # type: ignore[no-untyped-call]

    threading.Thread(target=stop_at_end_of_stdin, daemon=True).start()
    pool = ThreadPoolExecutor(workers)
    try:
        for admission in stream:
            pool.submit(answer, admission)
    except grpc.RpcError:
        pass  # The host ends the stream (or stdin closed): stop.
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        channel.close()
    return 0


def _run_decide_one(text: str) -> int:
    from cipdplugin.pins import Pin
    from cipdplugin.plugins import admission

    pin = Pin.parse(text)
    try:
        _admit_everything(pin, None)
    except admission.Denied as exc:
        print(f"{pin}: denied: {exc}")
        return 1
    print(f"{pin}: admitted")
    return 0


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else ""
    if mode == "admit":
        return _run_admit()
    if mode == "bare-peer" and len(argv) == 4:
        return _run_bare_peer(int(argv[2]), int(argv[3]))
    if mode == "bare-plugin" and len(argv) == 3:
        return _run_bare_plugin(int(argv[2]))
    if mode == "decide-one" and len(argv) == 3:
        return _run_decide_one(argv[2])
    print(
        f"usage: {argv[0]} admit | bare-peer PORT WORKERS | bare-plugin WORKERS | decide-one PIN",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
