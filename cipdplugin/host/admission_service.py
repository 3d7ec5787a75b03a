"""``cipd.plugin.Admissions``: the service of the admission kind, host side.

The Go host's ``admissionsServer`` in Python: one ``AdmissionsServant`` per
admission plugin serves its ListAdmissions stream (the checks, one
``Admission`` message each) and takes its ResolveAdmission answers. The
host registers ``ADMISSIONS_SERVICE`` with the transport; the transport
routes each call to the servant of the plugin whose ticket it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import grpc
from google.protobuf.empty_pb2 import Empty

from cipdplugin.constants import ANSWER_SLACK
from cipdplugin.errors import AdmissionDenied, AdmissionError, PluginStartError
from cipdplugin.host.checks import AdmissionChecks
from cipdplugin.host.lifecycle import PluginLifecycle
from cipdplugin.host.requests import Call, CallFailed
from cipdplugin.host.transport import Method, Service
from cipdplugin.protocol import PROTOCOL_VERSION, plugin_pb2
from cipdplugin.status import code_of

_OK = grpc.StatusCode.OK.value[0]
_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


class AdmissionsServant:
    """One admission plugin's side of the Admissions service."""

    def __init__(self, lifecycle: PluginLifecycle, checks: AdmissionChecks) -> None:
        self._lifecycle = lifecycle
        self._checks = checks
        # Guards the fields below.
        self._lock = threading.Lock()
        self._claimed = False  # a plugin opens its stream once
        self._opened = False  # the stream's opening connected the plugin
        self._abandoned = False  # the stream's call ended while it was opening

    async def list_admissions(
        self, request: plugin_pb2.ListAdmissionsRequest, call: Call
    ) -> AsyncIterator[plugin_pb2.Admission]:
        """The stream of checks, on the server's loop: waits without a thread
        while there is nothing to send."""
        try:
            # Opening may end the plugin, and so run the program's callbacks.
            await call.run_blocking(self._open, request)
        except asyncio.CancelledError:
            # The call ended while the opening ran on the pool, where it goes
            # on: whichever of the two ends last ends the session.
            with self._lock:
                self._abandoned = True
                opened = self._opened
            if opened:
                call.offload(self._lifecycle.disconnected)
            raise
        checks, lifecycle = self._checks, self._lifecycle
        loop = asyncio.get_running_loop()
        has_work = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the call is over
                loop.call_soon_threadsafe(has_work.set)

        try:
            while True:
                batch = checks.poll(wake)
                if batch is None:
                    break
                if not batch:
                    # Cannot hang: a queued check and the plugin's end call
                    # wake(), and the call's end cancels this wait.
                    await has_work.wait()
                    has_work.clear()
                    continue
                for check in batch:
                    admission = checks.sendable(check)
                    if admission is not None:
                        yield admission
                # Not kept while the next wait blocks: a burst's last batch
                # would otherwise stay alive as long as the stream idles.
                del batch, check, admission
        finally:
            # It may wait a moment for the plugin's exit status.
            call.offload(lifecycle.disconnected)
        raise CallFailed(grpc.StatusCode.ABORTED, "terminating")

    def _open(self, request: plugin_pb2.ListAdmissionsRequest) -> None:
        """The stream's opening: the plugin is connected, or the call fails."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
        if claimed:
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION, "ListAdmissions was already called")
        lifecycle = self._lifecycle
        if request.protocol_version != PROTOCOL_VERSION:
            message = (
                f"plugin {lifecycle.name!r} speaks admission protocol version "
                f"{request.protocol_version}, the host speaks {PROTOCOL_VERSION}"
            )
            answered = lifecycle.refuse(PluginStartError(message, code=grpc.StatusCode.FAILED_PRECONDITION))
            # The plugin's stdin is closed once the refusal has left.
            raise CallFailed(
                grpc.StatusCode.FAILED_PRECONDITION, message, then=lambda: answered.set_result(None)
            )
        if not lifecycle.connected(request.plugin_version):
            raise CallFailed(grpc.StatusCode.ABORTED, "terminating")
        lifecycle.host.logger.debug(
            "Plugin '%s' connected (version %r)", lifecycle.name, request.plugin_version
        )
        self._checks.connected()
        with self._lock:
            self._opened = True
            abandoned = self._abandoned
        if abandoned:
            lifecycle.disconnected()

    def resolve_admission(self, request: plugin_pb2.ResolveAdmissionRequest, call: Call) -> Empty:
        """Settle one check; unknown IDs (already settled, or never ours) are ignored.

        No status, or OK, admits: the Go SDK sends none when it admits.
        """
        if not request.HasField("status") or request.status.code == _OK:
            outcome: BaseException | None = None
        elif request.status.code == _FAILED_PRECONDITION:
            outcome = AdmissionDenied(request.status.message)
        else:
            outcome = AdmissionError(request.status.message, code=code_of(request.status.code))
        if not self._checks.resolve(request.admission_id, outcome):
            self._lifecycle.host.logger.debug(
                "Plugin '%s': ignoring an answer to admission %s: it came after the check's "
                "deadline, after the check was settled otherwise, or was never asked",
                self._lifecycle.name,
                request.admission_id,
            )
        return Empty()

    def answer_room(self) -> int:
        """ResolveAdmission calls the plugin may have open at once: one per
        unsettled check, and some slack for answers racing a deadline."""
        return self._checks.answer_room() + ANSWER_SLACK


ADMISSIONS_SERVICE = Service(
    "cipd.plugin.Admissions",
    (
        Method(
            "ListAdmissions",
            plugin_pb2.ListAdmissionsRequest,
            plugin_pb2.Admission,
            AdmissionsServant.list_admissions,
            streaming=True,
            # The stream and a refused second one.
            reserved=lambda servant: 2,
        ),
        Method(
            "ResolveAdmission",
            plugin_pb2.ResolveAdmissionRequest,
            Empty,
            AdmissionsServant.resolve_admission,
            reserved=AdmissionsServant.answer_room,
        ),
    ),
)
