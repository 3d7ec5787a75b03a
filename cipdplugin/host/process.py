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
import re
import selectors
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future

import psutil

from cipdplugin.constants import KILL_DEADLINE, KILL_SETTLE, MAX_LOG_LINE, STDERR_TAIL, STOP_GRACE
from cipdplugin.deadline import Deadline
from cipdplugin.errors import PluginStartError
from cipdplugin.host.spawn import spawn
from cipdplugin.text import printable

# Tunables of the monitor alone, kept here so that tests can shorten them.
#: After the plugin exits, its output is read for at most this long and at
#: most this many bytes: a descendant may hold the pipes open and write forever.
DRAIN_SPAN = 0.5
DRAIN_BYTES = 1024 * 1024
#: How often the monitor records the plugin's descendants, so that those still
#: running when the plugin itself exits are terminated with it.
FAMILY_INTERVAL = 1.0


#: Interpreters a plugin script may be run under: python, python3, python3.11, pypy3...
_INTERPRETER = re.compile(r"(python|pypy)[0-9.]*(\.exe)?")
#: Interpreter options that take the next argument as their value.
_OPTIONS_WITH_VALUE = frozenset({"-W", "-X", "--check-hash-based-pycs"})


class _Forks:
    """How many times this process is a fork child away from the one that
    imported cipdplugin. Hosts, plugins and processes note it when made: in a
    child, they belong to the parent and refuse to act."""

    generation = 0


FORKS = _Forks()


def _count_fork() -> None:
    FORKS.generation += 1


os.register_at_fork(after_in_child=_count_fork)


def display_name(cmdline: Sequence[str]) -> str:
    """The name messages, log lines and thread names give a plugin.

    The executable's basename, except under an interpreter (``python``,
    ``python3.11``, this interpreter): then the script's basename
    (``allowlist_plugin.py``), or the module's name with ``-m``.
    """
    program = os.path.basename(cmdline[0])
    if not (_INTERPRETER.fullmatch(program) or program == os.path.basename(sys.executable)):
        return program
    arguments = iter(cmdline[1:])
    for argument in arguments:
        if argument in ("-m", "-c"):
            target = next(arguments, "")
            return target if argument == "-m" and target else program
        if argument in _OPTIONS_WITH_VALUE:
            next(arguments, None)
        elif argument == "-" or not argument.startswith("-"):
            return os.path.basename(argument) or program
    return program


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
        self._logger.log(self._level, "%s: %s", self._label, printable(text))


class PluginProcess:
    """A running plugin subprocess, owned by the host that launched it.

    The plugin's stdout is logged at INFO and its stderr at WARNING on the
    host's logger, line by line, as ``Plugin '<name>' stdout: ...``; the last
    few stderr lines are also kept for error messages (``stderr_tail``).

    One monitor thread per process forwards the output and notices the exit;
    it ends when the process has exited and been reaped, and it alone
    resolves ``exited``. ``terminate`` makes sure that happens.

    Attributes:
        exited: resolves to the exit status once the process has exited and
            been reaped (negative: killed by that signal). Never fails.
        done: an Event set just before ``exited`` resolves, for callers that
            prefer ``done.wait()``; in ``exited``'s callbacks it is set.
    """

    def __init__(self, cmdline: Sequence[str], *, logger: logging.Logger) -> None:
        """Start ``cmdline`` with piped stdin/stdout/stderr in a new session.

        Raises:
            PluginStartError: the executable cannot be started.
        """
        self.cmdline = list(cmdline)
        self.name = display_name(self.cmdline)
        self.exited: Future[int] = Future()
        self.done = threading.Event()
        self._logger = logger
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        # Guards stdin against a write racing with its close.
        self._stdin_lock = threading.Lock()
        # Guards _terminating: the first terminate() does the work, later
        # ones wait for the exit it brings.
        self._terminate_lock = threading.Lock()
        self._terminating = False
        # Guards _family: every descendant seen while the plugin ran and not
        # yet known to have exited, by pid. The monitor adds to it; terminate
        # signals it.
        self._family_lock = threading.Lock()
        self._family: dict[int, psutil.Process] = {}
        try:
            # The plugin leads its own process group, which terminate
            # signals as a whole, and adopts what its descendants orphan
            # (see spawn.py).
            self._popen = spawn(self.cmdline)
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
        return self.exited.result() if self.exited.done() else None

    @property
    def family(self) -> frozenset[int]:
        """Pids of the descendants recorded while the plugin ran and not yet seen to exit.

        ``terminate`` signals these as well as whatever runs in the plugin's
        process group and session.
        """
        with self._family_lock:
            return frozenset(self._family)

    @property
    def stderr_tail(self) -> list[str]:
        """The last few non-empty lines the plugin wrote to stderr."""
        return list(self._stderr_tail)

    def describe(self) -> str:
        """How the process ended, with its last stderr line if any."""
        text = f"plugin {self.name!r} (pid {self.pid}) {describe_exit(self.returncode)}"
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

    def terminate(self, timeout: float | None = None, *, deadline: Deadline | None = None) -> int | None:
        """Stop the plugin and every process it started; return its exit status.

        Closes stdin; after a grace period sends SIGTERM to the plugin, its
        process group and session, and its descendants; at the deadline (5 s
        from now, or ``timeout`` if shorter, or ``deadline`` when given)
        sends SIGKILL to whatever is left. The descendants signalled are
        those running now and every one the monitor saw while the plugin ran
        (see docs/reliability.md for what can still escape). Returns within
        the deadline plus ``KILL_SETTLE``.

        The process is terminated once: a later or concurrent call waits for
        the first one's work, until its own deadline plus ``KILL_SETTLE``.
        """
        if deadline is None:
            deadline = Deadline(termination_span(timeout))
        with self._terminate_lock:
            first, self._terminating = not self._terminating, True
        if not first:
            self.done.wait(deadline.remaining_or(KILL_DEADLINE) + KILL_SETTLE)
            return self.returncode
        span = deadline.remaining_or(KILL_DEADLINE)
        family = self._remember_family()
        self.close_stdin()
        if not self.done.wait(min(STOP_GRACE, span / 2)):
            family = self._remember_family()
        # Signalled even if the plugin left: what it started must not outlive it.
        family = self._signal_everyone(family, signal.SIGTERM)
        if deadline.moment is None:
            deadline = Deadline(span)
        self.done.wait(deadline.remaining())
        _wait_until_dead(family, deadline)
        family = self._signal_everyone(self._remember_family(), signal.SIGKILL)
        settled = Deadline(KILL_SETTLE)
        self.done.wait(settled.remaining())
        _wait_until_dead(family, settled)
        self._remember_family()  # Forget those that are gone.
        return self.returncode

    def _signal_everyone(self, family: set[psutil.Process], sig: int) -> set[psutil.Process]:
        """Signal the plugin (unless reaped), its group and session, and ``family``; return whom."""
        everyone = family | self._kin()
        _signal_all([self._self_process(), *everyone], sig)
        # The group outlives its leader while any member runs, and its ID
        # cannot be reused meanwhile, so this reaches only the plugin's
        # group, even after the plugin was reaped. It catches members
        # started after the others were listed.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        return everyone

    def _kin(self) -> set[psutil.Process]:
        """Every process in the plugin's process group or session, the plugin aside.

        A descendant may leave the group (setpgid) yet stay in the session;
        only setsid leaves both. As with the group, a session's ID is not
        reused while any member runs.
        """
        found: set[psutil.Process] = set()
        for pid in psutil.pids():
            if pid == self.pid:
                continue
            try:
                if os.getpgid(pid) == self.pid or os.getsid(pid) == self.pid:
                    found.add(psutil.Process(pid))
            except (OSError, psutil.Error):
                pass  # Gone meanwhile.
        return found

    def _self_process(self) -> psutil.Process | None:
        if self.done.is_set() or self._popen.returncode is not None:
            return None  # Reaped: the pid may already belong to someone else.
        try:
            return psutil.Process(self.pid)
        except psutil.Error:
            return None

    def _remember_family(self) -> set[psutil.Process]:
        """Record the current descendants; return every recorded one still running."""
        current: list[psutil.Process] = []
        me = self._self_process()
        if me is not None:
            with contextlib.suppress(psutil.Error):
                current = me.children(recursive=True)
        with self._family_lock:
            for process in current:
                self._family[process.pid] = process
            for pid, process in list(self._family.items()):
                if not _is_running(process):
                    del self._family[pid]
            return set(self._family.values())

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
        # The callbacks (the host forgetting the process, the plugin kind
        # failing its work) run here, on this thread, in the order added.
        self.exited.set_result(self._popen.returncode)

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
                # With a pidfd the select wakes when the process exits;
                # without one, poll for the exit. Either way it wakes every
                # FAMILY_INTERVAL to record the plugin's descendants.
                poll = FAMILY_INTERVAL if pidfd is not None else 0.05
                next_census = time.monotonic()
                while self._popen.poll() is None:
                    if time.monotonic() >= next_census:
                        self._remember_family()
                        next_census = time.monotonic() + FAMILY_INTERVAL
                    for key, _ in selector.select(poll):
                        if key.fd in streams and _read_into(key.fd, streams[key.fd]) == 0:
                            selector.unregister(key.fd)
                self._drain(streams)
            finally:
                if pidfd is not None:
                    os.close(pidfd)

    def _drain(self, streams: dict[int, _LineForwarder]) -> None:
        """Take the output the plugin left in its pipes, within DRAIN_SPAN and DRAIN_BYTES.

        A descendant may hold the pipes open and keep writing: what is there
        now is read, not what keeps coming. Reading stops at the first empty
        read, and in any case at the bounds.
        """
        deadline = Deadline(DRAIN_SPAN)
        budget = DRAIN_BYTES
        unread = set(streams)
        while unread and budget > 0 and not deadline.expired():
            for fd in list(unread):
                count = _read_into(fd, streams[fd])
                if count <= 0:
                    unread.discard(fd)
                budget -= max(count, 0)
        if unread:
            self._logger.warning(
                "Plugin %r exited, but a process it started keeps writing to its output: no longer read",
                self.name,
            )
        for forwarder in streams.values():
            forwarder.flush()


def _read_into(fd: int, forwarder: _LineForwarder) -> int:
    """Read once from a non-blocking pipe; the byte count, -1 if nothing yet, 0 at end of file."""
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return -1
    except OSError:
        return 0
    if data:
        forwarder.feed(data)
    return len(data)


def _pidfd_open(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:
        return None
    return fd


#: How often _wait_until_dead looks for processes that died but were not reaped.
_ZOMBIE_RECHECK = 0.05


def _wait_until_dead(processes: Iterable[psutil.Process], deadline: Deadline) -> None:
    """Return once none of ``processes`` runs (a zombie counts as dead), or at ``deadline``.

    ``psutil.wait_procs`` alone waits for a process to vanish: an orphan that
    died stays a zombie until its new parent reaps it, which some init
    processes (in containers, say) do late or never.
    """
    alive = [p for p in processes if _is_running(p)]
    while alive and not deadline.expired():
        psutil.wait_procs(alive, timeout=deadline.remaining_or(_ZOMBIE_RECHECK))
        alive = [p for p in alive if _is_running(p)]


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
