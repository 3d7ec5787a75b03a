"""The life of one plugin, whatever its kind: launch, connect, exit, end, close.

A plugin kind (admission plugins, say) builds on a ``PluginLifecycle``:

* it hands over its servants (the objects its gRPC services call, by service
  name) and an ``on_ended`` callback that fails whatever work is unsettled;
* it calls ``start()`` when the first piece of work arrives, ``connected()``
  when the plugin opens the kind's session (ListAdmissions, for admissions),
  ``refuse()`` when the plugin must go for good (another protocol version),
  and ``disconnected()`` when that session ends.

The lifecycle does the rest, as the Go host does: it launches the process
and hands it its ticket (through ``Host.launch_plugin``), waits for the
connection, the exit or the end, whichever comes first (a ``select`` over
Futures), and funnels every way a plugin can end (a start failure, a connect
timeout, a refusal, the process exiting, the session breaking, ``close()``)
into ``end()``, which decides once why the plugin ended.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from concurrent.futures import FIRST_COMPLETED, Future
from typing import TYPE_CHECKING, Any

import grpc

from cipdplugin.constants import CLOSE_MARGIN, EXIT_STATUS_WAIT, KILL_DEADLINE, REFUSAL_GRACE
from cipdplugin.deadline import Deadline
from cipdplugin.errors import AdmissionError, PluginAbortedError, PluginStartError
from cipdplugin.host.process import FORKS, display_name, termination_span

if TYPE_CHECKING:
    from cipdplugin.host.host import Host
    from cipdplugin.host.process import PluginProcess
    from cipdplugin.host.transport import PluginSession


class PluginState(enum.Enum):
    NOT_STARTED = "not started"  # no work yet, no process
    STARTING = "starting"  # launching, or waiting for the plugin to connect
    CONNECTED = "connected"  # the kind's session is open; work flows
    BROKEN = "broken"  # failed for good; ``failure`` says why
    CLOSED = "closed"  # closed by the caller or the host


ALIVE = frozenset({PluginState.NOT_STARTED, PluginState.STARTING, PluginState.CONNECTED})

#: What a kind is told once its plugin ended: the error for its unsettled
#: work, and the state the plugin ended in (BROKEN or CLOSED).
OnEnded = Callable[[AdmissionError, PluginState], None]


def first_of(*signals: Future[Any], timeout: float | None) -> None:
    """Wait until one of ``signals`` resolves, or ``timeout`` passes: a ``select``."""
    futures.wait(signals, timeout, FIRST_COMPLETED)


#: Threads running a close now, by ident. Single set operations, atomic
#: under the GIL: a close must never wait for a lock to learn this.
_closing_threads: set[int] = set()


def close_on_own_thread(
    work: Callable[[Deadline], None], *, timeout: float | None, name: str, wait: bool = True
) -> Future[None]:
    """Run ``work(deadline)`` on a thread of its own and wait for it, within bounds.

    ``deadline`` is the kill deadline (5 s from now, or ``timeout`` if
    shorter); the wait ends by then plus ``CLOSE_MARGIN``. A close never
    runs on its caller's thread: the caller may be a signal handler that
    interrupted that very thread inside a lock the close needs, and then
    only the wait is cut short, never the close. A close asked for on a
    thread that is itself closing (a Future callback of a close, closing
    again) is started and not waited for: it would wait for itself.

    Returns the Future resolved when ``work`` is done; with ``wait=False``,
    at once.
    """
    deadline = Deadline(termination_span(timeout))
    done: Future[None] = Future()

    def run() -> None:
        ident = threading.get_ident()
        _closing_threads.add(ident)
        try:
            work(deadline)
        finally:
            _closing_threads.discard(ident)
            done.set_result(None)

    threading.Thread(target=run, name=name, daemon=True).start()
    if wait:
        wait_for_close(done, deadline)
    return done


def wait_for_close(done: Future[None], deadline: Deadline) -> None:
    """Wait for a close in progress until ``deadline`` plus ``CLOSE_MARGIN``,
    unless this thread is itself closing."""
    if threading.get_ident() not in _closing_threads:
        futures.wait([done], deadline.remaining_or(KILL_DEADLINE) + CLOSE_MARGIN)


class PluginLifecycle:
    """One plugin process's life from its first piece of work to its end.

    Its signals are Futures, each resolved in one place: ``launched`` (the
    process, or the launch's error) by the launcher thread; ``connected``
    (the plugin's version, or why it was refused) by ``connected()`` or
    ``refuse()``; the process's ``exited`` by its monitor; ``ended`` (the
    error later work gets) by ``end()``, the funnel.
    """

    def __init__(
        self,
        host: Host,
        cmdline: Sequence[str],
        *,
        connect_timeout: float,
        services: Mapping[str, object],
        on_ended: OnEnded,
        on_closed: Callable[[Deadline], None] | None = None,
        work: str = "work",
    ) -> None:
        """``on_closed(deadline)`` joins the kind's own threads at the end of
        ``close()``; ``work`` names the kind's units of work in messages ("checks")."""
        self.host = host
        self.cmdline = list(cmdline)
        self.name = display_name(self.cmdline)
        self.services = dict(services)
        self._connect_timeout = connect_timeout
        self._on_ended = on_ended
        self._on_closed = on_closed
        self._work = work
        self._session: PluginSession | None = None  # the transport's, once launched
        self._fork_generation = FORKS.generation
        self.launched: Future[PluginProcess] = Future()
        self.connected_signal: Future[str] = Future()
        self.ended: Future[AdmissionError] = Future()
        self._refusal_answered: Future[None] | None = None  # set by refuse(), before it ends the plugin
        # Guards the fields below; held only for a moment, never while
        # calling out.
        self._lock = threading.Lock()
        self._state = PluginState.NOT_STARTED
        self._failure: AdmissionError | None = None  # why, once BROKEN or CLOSED
        self._process: PluginProcess | None = None  # once launched
        self._launching = False  # the launcher thread was started

    def __repr__(self) -> str:
        return f"<PluginLifecycle {self.name!r} {self._state.value}>"

    @property
    def state(self) -> PluginState:
        return self._state

    @property
    def failure(self) -> AdmissionError | None:
        """Why the plugin ended, once it did."""
        return self._failure

    @property
    def process(self) -> PluginProcess | None:
        return self._process

    @property
    def version(self) -> str:
        """The version the plugin reported when it connected; "" until then."""
        signal = self.connected_signal
        if signal.done() and signal.exception(timeout=0) is None:
            return signal.result(timeout=0)
        return ""

    def owned_here(self) -> bool:
        """False in a child forked from the host's process: the plugin is the parent's."""
        return self._fork_generation == FORKS.generation

    # -- Driven by the kind ---------------------------------------------------------

    def start(self) -> None:
        """Launch the plugin in the background, unless it was launched or ended already.

        Raises:
            RuntimeError: in a child forked from the host's process.
        """
        if not self.owned_here():
            raise RuntimeError("a plugin can only be used in the process that created its host")
        with self._lock:
            if self._state is not PluginState.NOT_STARTED:
                return
            self._state = PluginState.STARTING
            self._launching = True
        thread = threading.Thread(
            target=self._launch_and_await, name=f"cipdplugin-launch-{self.name}", daemon=True
        )
        try:
            thread.start()
        except BaseException as exc:
            error = PluginStartError(f"cannot start plugin {self.name!r}: {exc}")
            self.launched.set_exception(error)
            self.end(error)
            raise

    def connected(self, version: str) -> bool:
        """The plugin opened its session: True, unless it ended meanwhile."""
        with self._lock:
            connected = self._state is PluginState.STARTING
            if connected:
                self._state = PluginState.CONNECTED
        if connected:
            self.connected_signal.set_result(version)
        return connected

    def refuse(self, error: AdmissionError) -> Future[None]:
        """Refuse the plugin for good: end it with ``error``, and close its
        stdin once the Future returned is resolved (the refusal has left) or
        a grace period passed, so that it learns why before it is told to stop."""
        answered: Future[None] = Future()
        self._refusal_answered = answered
        if self._session is not None:
            self.host.forget_session(self._session)
        self.end(error)
        if not self.connected_signal.done():
            self.connected_signal.set_exception(error)
        return answered

    def disconnected(self) -> None:
        """The kind's session is over. If the plugin ended it, the plugin is done for."""
        with self._lock:
            if self._state is not PluginState.CONNECTED:
                return  # ended by us, or already failed
            process = self._process
        # The exit status makes a better message; a crashing plugin's exit
        # usually follows its connection's end within milliseconds.
        if process is not None:
            first_of(process.exited, self.ended, timeout=EXIT_STATUS_WAIT)
            if process.exited.done():
                self._on_exit(process.exited)
                return
        self.end(PluginAbortedError(f"plugin {self.name!r} closed its connection"))

    # -- The one funnel ----------------------------------------------------------------

    def end(self, error: AdmissionError, state: PluginState = PluginState.BROKEN) -> bool:
        """End the plugin with ``error``: the first ending decides the error later
        work gets; a close after a break only records that the plugin is closed.
        Tells the kind (``on_ended``) once. Returns whether this call ended it."""
        with self._lock:
            if self._state not in ALIVE:
                if state is PluginState.CLOSED:
                    self._state = PluginState.CLOSED
                return False
            self._state = state
            self._failure = error
        # Outside the lock: the kind settles promises, whose callbacks run
        # arbitrary code.
        self.ended.set_result(error)
        self._on_ended(error, state)
        if state is PluginState.BROKEN:
            self.host.logger.warning("Plugin '%s': %s", self.name, error.message)
        return True

    def close(self, deadline: Deadline) -> None:
        """End the plugin as closed and terminate its process by ``deadline``.

        A launch in progress is waited for within the deadline; if it
        finishes later, its launcher terminates the process.
        """
        self.end(PluginAbortedError(f"plugin {self.name!r} was closed"), PluginState.CLOSED)
        if not self.owned_here():
            return  # the process belongs to the parent
        if self._launching:
            first_of(self.launched, timeout=deadline.remaining())
        process = self._process
        if process is not None:
            process.terminate(deadline=deadline)
        if self._on_closed is not None:
            self._on_closed(deadline)

    # -- The launcher thread -------------------------------------------------------------

    def _launch_and_await(self) -> None:
        """Launch the plugin, then wait for its connection, its exit or its end.

        The Go host's ``select`` over the same three: whichever comes first
        decides, and a timeout fails the plugin.
        """
        try:
            process, self._session = self.host.launch_session(self.cmdline, self.services)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, PluginStartError)
                else PluginStartError(f"cannot start plugin {self.name!r}: {exc}")
            )
            self.launched.set_exception(error)
            # A host that closes refuses launches: that is a close, and the
            # plugin's pending work must say so.
            if self.host.closed:
                self.end(PluginAbortedError(f"plugin {self.name!r} was closed"), PluginState.CLOSED)
            else:
                self.end(error)
            return
        self._process = process
        self.launched.set_result(process)
        process.exited.add_done_callback(self._on_exit)
        first_of(
            self.connected_signal,
            process.exited,
            self.ended,
            timeout=Deadline(self._connect_timeout).remaining(),
        )
        answered = self._refusal_answered
        if answered is not None:
            # Answer first, stdin after: a plugin that leaves on stdin EOF
            # must still learn why it was refused.
            first_of(answered, process.exited, timeout=REFUSAL_GRACE)
            first_of(process.exited, timeout=REFUSAL_GRACE)
            process.close_stdin()
        elif not (self.connected_signal.done() or process.exited.done() or self.ended.done()):
            self.end(
                PluginStartError(
                    f"plugin {self.name!r} did not connect within {self._connect_timeout:g} s",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            )
            process.terminate()
        elif self._state is PluginState.CLOSED:
            # close() may have given up waiting for this launch; make sure
            # the process does not outlive the plugin.
            process.terminate()

    def _on_exit(self, exited: Future[int]) -> None:
        """The process ended: fail whatever it left unsettled."""
        process = self._process
        text = process.describe() if process is not None else f"plugin {self.name!r} exited"
        if self.connected_signal.done():
            self.end(PluginAbortedError(f"{text} while {self._work} were pending"))
        else:
            self.end(PluginStartError(f"{text} before connecting"))
