"""One plugin subprocess: launching it, forwarding its output, noticing its exit,
and terminating it together with everything it started.

This module knows nothing about what a plugin does; the server and the
plugin kinds build on it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

import psutil

from cipdplugin.errors import PluginStartError

#: Termination never takes longer than this (plus a small constant).
KILL_DEADLINE = 5.0
#: How long a plugin may take to exit on its own once its stdin is closed.
STOP_GRACE = 1.0
#: Longer output lines are cut before they reach the log.
MAX_LOG_LINE = 16 * 1024
#: How many of the plugin's last stderr lines are kept for error messages.
STDERR_TAIL = 5
#: Bound on the wait for a SIGKILLed process to vanish (it cannot refuse).
_KILL_SETTLE = 1.0


def termination_span(timeout: float | None) -> float:
    """How long a termination may take: the 5 s deadline, or ``timeout`` if shorter."""
    return KILL_DEADLINE if timeout is None else max(0.0, min(timeout, KILL_DEADLINE))


def describe_exit(returncode: int | None) -> str:
    """``"exited with code 3"`` or ``"was killed by SIGKILL"``."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class _LineForwarder:
    """Splits a byte stream into lines and logs each under the plugin's name."""

    def __init__(self, logger: logging.Logger, level: int, label: str, tail: collections.deque[str] | None):
        self._logger = logger
        self._level = level
        self._label = label
        self._tail = tail
        self._partial = bytearray()

    def feed(self, data: bytes) -> None:
        self._partial += data
        *lines, rest = self._partial.split(b"\n")
        for line in lines:
            self._emit(line)
        self._partial = bytearray(rest)
        while len(self._partial) > MAX_LOG_LINE:
            self._emit(self._partial[:MAX_LOG_LINE])
            del self._partial[:MAX_LOG_LINE]

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial.clear()

    def _emit(self, raw: bytes | bytearray) -> None:
        text = bytes(raw[:MAX_LOG_LINE]).decode("utf-8", errors="replace").rstrip("\r")
        if self._tail is not None and text.strip():
            self._tail.append(text)
        self._logger.log(self._level, "%s: %s", self._label, text)


class PluginProcess:
    """A running plugin subprocess, owned by the host that launched it.

    The plugin's stdout is logged at INFO and its stderr at WARNING on the
    host's logger, line by line, as ``Plugin '<name>' stdout: ...``; the last
    few stderr lines are also kept for error messages (``stderr_tail``).

    One monitor thread per process forwards the output and notices the exit;
    it ends when the process has exited and been reaped. ``terminate`` makes
    sure that happens.
    """

    def __init__(
        self,
        cmdline: Sequence[str],
        *,
        logger: logging.Logger,
        on_exit: Callable[[PluginProcess], None] | None = None,
    ) -> None:
        """Start ``cmdline`` with piped stdin/stdout/stderr in a new session.

        Raises:
            PluginStartError: the executable cannot be started.
        """
        self.cmdline = list(cmdline)
        self.name = os.path.basename(self.cmdline[0])
        self.done = threading.Event()
        self._logger = logger
        self._on_exit = on_exit
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        # Guards stdin against a write racing with its close.
        self._stdin_lock = threading.Lock()
        try:
            # A new session keeps a terminal's Ctrl-C away from plugins: the
            # host decides when they stop.
            self._popen = subprocess.Popen(
                self.cmdline,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise PluginStartError(f"cannot start plugin {self.cmdline[0]!r}: {reason}") from None
        self.pid = self._popen.pid
        self._monitor = threading.Thread(
            target=self._monitor_loop, name=f"cipdplugin-monitor-{self.name}-{self.pid}", daemon=True
        )
        self._monitor.start()

    def __repr__(self) -> str:
        return f"<PluginProcess {self.name!r} pid={self.pid} {describe_exit(self.returncode)}>"

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has been reaped, else None."""
        return self._popen.returncode if self.done.is_set() else None

    @property
    def stderr_tail(self) -> list[str]:
        """The last few non-empty lines the plugin wrote to stderr."""
        return list(self._stderr_tail)

    def describe(self) -> str:
        """How the process ended, with its last stderr line if any."""
        text = f"plugin {self.cmdline[0]!r} (pid {self.pid}) {describe_exit(self.returncode)}"
        tail = self.stderr_tail
        if tail:
            text += f" (its last stderr line: {tail[-1]!r})"
        return text

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit; return its status, or None on timeout."""
        self.done.wait(timeout)
        return self.returncode

    def write_line(self, line: bytes) -> bool:
        """Write one line to the plugin's stdin; False if the plugin is gone."""
        with self._stdin_lock:
            stdin = self._popen.stdin
            if stdin is None or stdin.closed:
                return False
            try:
                stdin.write(line)
                stdin.flush()
            except (BrokenPipeError, OSError):
                return False
        return True

    def close_stdin(self) -> None:
        """Close the plugin's stdin: the signal for it to stop. Idempotent."""
        with self._stdin_lock:
            stdin = self._popen.stdin
            if stdin is not None and not stdin.closed:
                # An error here means the plugin is gone: nobody to tell.
                with contextlib.suppress(OSError):
                    stdin.close()

    def terminate(self, timeout: float | None = None) -> int | None:
        """Stop the plugin and every process it started; return its exit status.

        Closes stdin; after a grace period sends SIGTERM to the plugin and its
        descendants; at the deadline (5 s, or ``timeout`` if shorter) sends
        SIGKILL to whatever is left. The descendants are listed while the
        plugin is alive, before any signal, so none escapes by being
        reparented. Returns within the deadline plus a small constant; safe to
        call from several threads and more than once.
        """
        deadline_span = termination_span(timeout)
        deadline = time.monotonic() + deadline_span
        family = self._descendants()
        self.close_stdin()
        if not self.done.wait(min(STOP_GRACE, deadline_span / 2)):
            family = self._descendants() | family
            _signal_all([self._self_process(), *family], signal.SIGTERM)
        elif family:
            # The plugin left, but what it started must not outlive it.
            _signal_all(family, signal.SIGTERM)
        self.done.wait(max(0.0, deadline - time.monotonic()))
        alive = [p for p in family if _is_running(p)]
        if alive:
            psutil.wait_procs(alive, timeout=max(0.0, deadline - time.monotonic()))
        if not self.done.is_set():
            family = self._descendants() | family
            _signal_all([self._self_process()], signal.SIGKILL)
        _signal_all(family, signal.SIGKILL)
        self.done.wait(_KILL_SETTLE)
        alive = [p for p in family if _is_running(p)]
        if alive:
            psutil.wait_procs(alive, timeout=_KILL_SETTLE)
        return self.returncode

    def _self_process(self) -> psutil.Process | None:
        if self.done.is_set():
            return None  # Reaped: the pid may already belong to someone else.
        try:
            return psutil.Process(self.pid)
        except psutil.Error:
            return None

    def _descendants(self) -> set[psutil.Process]:
        me = self._self_process()
        if me is None:
            return set()
        try:
            return set(me.children(recursive=True))
        except psutil.Error:
            return set()

    def _monitor_loop(self) -> None:
        """Forward output until the process exits, then reap it and report."""
        try:
            self._forward_output()
        except Exception:
            self._logger.exception("Plugin %r: output forwarding failed", self.name)
            self._popen.wait()  # Cannot hang: terminate() ends the process.
        for stream in (self._popen.stdout, self._popen.stderr):
            if stream is not None:
                stream.close()
        self.done.set()
        if self._on_exit is not None:
            try:
                self._on_exit(self)
            except Exception:
                self._logger.exception("Plugin %r: exit handler failed", self.name)

    def _forward_output(self) -> None:
        label = f"Plugin {self.name!r}"
        assert self._popen.stdout is not None and self._popen.stderr is not None
        streams = {
            self._popen.stdout.fileno(): _LineForwarder(self._logger, logging.INFO, f"{label} stdout", None),
            self._popen.stderr.fileno(): _LineForwarder(
                self._logger, logging.WARNING, f"{label} stderr", self._stderr_tail
            ),
        }
        with selectors.DefaultSelector() as selector:
            for fd in streams:
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ)
            pidfd = _pidfd_open(self.pid)
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ)
            try:
                # With a pidfd the select wakes when the process exits, so it
                # needs no timeout; without one, poll for the exit.
                poll = None if pidfd is not None else 0.05
                while self._popen.poll() is None:
                    for key, _ in selector.select(poll):
                        if key.fd in streams and not _read_into(key.fd, streams[key.fd]):
                            selector.unregister(key.fd)
                # Output written before the exit is still in the pipes, but a
                # descendant may hold them open: take what is there, no more.
                for fd, forwarder in streams.items():
                    while _read_into(fd, forwarder, drain=True):
                        pass
                    forwarder.flush()
            finally:
                if pidfd is not None:
                    os.close(pidfd)


def _read_into(fd: int, forwarder: _LineForwarder, *, drain: bool = False) -> bool:
    """Read once from a non-blocking pipe; False at end of file (or nothing, if draining)."""
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return not drain
    except OSError:
        return False
    if not data:
        return False
    forwarder.feed(data)
    return True


def _pidfd_open(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:
        return None
    return fd


def _is_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_all(processes: Sequence[psutil.Process | None] | set[psutil.Process], sig: int) -> None:
    for process in processes:
        if process is None:
            continue
        # psutil checks the process's start time first, so a reused pid is
        # never signalled.
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)
