"""Delivering an admission plugin's answers (ResolveAdmission), none lost.

A handler's thread hands its answer over and is free at once: the call is
made without waiting for it (grpc's ``future()``), and ends on grpc's
channel thread. A host may refuse a call for capacity; the answer is then
sent again, with backoff, until the host takes it, the plugin stops, or the
answer's deadline passes.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
from collections import deque
from typing import Any, cast

import grpc

from cipdplugin.constants import SDK_CALL_LIMIT, SDK_MAX_ANSWERS_IN_FLIGHT, SDK_RETRY_MAX_DELAY
from cipdplugin.deadline import Deadline
from cipdplugin.plugins.retry import retry_delay
from cipdplugin.protocol import plugin_pb2

_logger = logging.getLogger(__name__)

CallMetadata = tuple[tuple[str, str], ...]


class _Answer:
    """One ResolveAdmission to deliver, and until when it may keep trying."""

    __slots__ = ("attempts", "deadline", "request")

    def __init__(self, request: plugin_pb2.ResolveAdmissionRequest) -> None:
        self.request = request
        self.deadline = Deadline(SDK_CALL_LIMIT)
        self.attempts = 0  # refusals so far


class Answers:
    """Sends ResolveAdmission calls without waiting for them.

    At most ``max_in_flight`` calls are in flight at once; more answers wait
    their turn in order. A flood of calls at once is what a host refuses: a
    grpcio server cancels calls beyond about a thousand not yet taken up,
    for all its plugins together.

    An answer refused for capacity is sent again after a delay: refused
    means RESOURCE_EXHAUSTED, or UNAVAILABLE or CANCELLED while the plugin
    is not stopping (the host cancels answers only when it ends the
    stream, which stops the plugin). A second answer to one admission is
    harmless: the host ignores answers to admissions it does not wait for.
    An answer is given up once the plugin stops or ``SDK_CALL_LIMIT``
    seconds after it was first sent.

    Retries wait on one thread of its own, started at the first retry and
    ended by ``stop()``.
    """

    def __init__(
        self,
        call: grpc.UnaryUnaryMultiCallable[Any, Any],
        metadata: CallMetadata,
        stopping: threading.Event,
        *,
        max_in_flight: int = SDK_MAX_ANSWERS_IN_FLIGHT,
    ) -> None:
        self._call = call
        self._metadata = metadata
        self._stopping = stopping
        self._max_in_flight = max_in_flight
        self._order = itertools.count()  # ties in the retry heap never compare answers
        # Guards the fields below.
        self._cond = threading.Condition()
        self._slots = 0  # calls in flight, or about to be started
        # The calls in flight: grpc cancels a call whose Future is collected.
        self._in_flight: set[grpc.Future[Any]] = set()
        self._queued: deque[_Answer] = deque()  # waiting for a slot, in order
        self._retries: list[tuple[float, int, _Answer]] = []  # a heap, by when to send again
        self._retry_thread: threading.Thread | None = None
        self._stopped = False

    def send(self, request: plugin_pb2.ResolveAdmissionRequest) -> None:
        """Send ``request``; never waits for the host."""
        self._submit(_Answer(request))

    def stop(self) -> None:
        """Give up what is not sent yet; calls in flight end with the channel."""
        with self._cond:
            self._stopped = True
            self._retries.clear()
            self._queued.clear()
            thread = self._retry_thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(SDK_RETRY_MAX_DELAY)  # it only ever waits on the condition

    def _submit(self, answer: _Answer) -> None:
        with self._cond:
            if self._stopped:
                return
            if self._slots >= self._max_in_flight:
                self._queued.append(answer)
                return
            self._slots += 1
        self._start(answer)

    def _start(self, answer: _Answer | None) -> None:
        """Make the call for ``answer``, which holds a slot (and for the
        queued answers the slot passes to, if it is given up at once)."""
        while answer is not None:
            if answer.deadline.expired():
                self._give_up(answer, "its deadline passed while it waited to be sent")
                answer = self._release_slot()
                continue
            try:
                future = self._call.future(
                    answer.request, timeout=answer.deadline.remaining(), metadata=self._metadata
                )
            except ValueError:  # the channel is closed: the plugin is leaving, nobody waits
                with self._cond:
                    self._queued.clear()
                    self._slots -= 1
                return
            with self._cond:
                self._in_flight.add(future)
            future.add_done_callback(functools.partial(self._done, answer))
            return

    def _release_slot(self) -> _Answer | None:
        """Free a slot; or pass it to the first queued answer, returned to be started."""
        with self._cond:
            if self._queued and not self._stopped:
                return self._queued.popleft()
            self._slots -= 1
            return None

    def _done(self, answer: _Answer, future: grpc.Future[Any]) -> None:
        """A call ended (on grpc's channel thread)."""
        with self._cond:
            self._in_flight.discard(future)
        self._start(self._release_slot())
        call = cast("grpc.Call", future)  # every grpc call's Future is a Call too
        code = call.code()
        if code is grpc.StatusCode.OK:
            return
        if self._stopping.is_set():
            return  # the host is not waiting any more
        refused = code in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
        )
        if refused and not answer.deadline.expired() and self._schedule(answer):
            return
        self._give_up(answer, f"{code.name if code is not None else 'UNKNOWN'}: {call.details()}")

    def _give_up(self, answer: _Answer, why: str) -> None:
        if not self._stopping.is_set():
            _logger.warning(
                "cannot resolve admission %s (after %d refusals): %s",
                answer.request.admission_id,
                answer.attempts,
                why,
            )

    def _schedule(self, answer: _Answer) -> bool:
        """Queue ``answer`` to be sent again after its next delay; False once stopped."""
        due = answer.deadline.sooner(retry_delay(answer.attempts)).moment
        assert due is not None  # an answer's deadline is never "never"
        answer.attempts += 1
        with self._cond:
            if self._stopped:
                return False
            heapq.heappush(self._retries, (due, next(self._order), answer))
            if self._retry_thread is None:
                # Started under the lock: start() only waits for the thread to
                # exist, and its first act is to wait for this lock.
                self._retry_thread = threading.Thread(
                    target=self._retry_loop, name="cipdplugin-answer-retries", daemon=True
                )
                self._retry_thread.start()
            self._cond.notify_all()
        return True

    def _retry_loop(self) -> None:
        while True:
            with self._cond:
                # Cannot hang: stop() sets _stopped and notifies, a new retry notifies.
                while not self._stopped:
                    wait = Deadline.at(self._retries[0][0]).remaining() if self._retries else None
                    if wait == 0.0:
                        break
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, answer = heapq.heappop(self._retries)
            self._submit(answer)
