"""Starting a plugin's process so that nothing it starts can slip out of reach.

The plugin runs in a new session, so it leads its own process group
(pgid == pid), which the host signals as a whole. On Linux it is also made a
*child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): whatever its
descendants orphan, a ``setsid`` double-fork daemon included, is reparented
to the plugin rather than to init, so it stays in the plugin's process tree
for as long as the plugin runs.

The attribute is set by a short trampoline that then executes the plugin in
place (same pid; the attribute survives ``execve``). It cannot be set from a
``preexec_fn``: that makes Python fork instead of vfork, which runs gRPC's
fork handlers in a process with a live server. The trampoline reports an
``execve`` failure over a close-on-exec pipe, so a plugin that cannot be
started still fails here, synchronously, as it would without it.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Sequence

#: Bound on waiting for the trampoline to execute the plugin (it takes a few
#: milliseconds; past this the launch goes on, and a failure shows as exit 127).
_EXEC_REPORT_WAIT = 10.0
#: Bound on reaping a trampoline whose ``execve`` failed (it exits at once).
_FAILED_REAP_WAIT = 5.0

# argv: report-fd, LC_CTYPE ("=value", or "" when unset), program, args...
# Python may coerce a C locale by setting LC_CTYPE in its environment, and
# ignores SIGPIPE and SIGXFSZ (ignored signals survive execve): both are put
# back as they were, so the plugin sees what a direct launch would give it.
_TRAMPOLINE = """\
import ctypes, os, signal, sys
report = int(sys.argv[1])
os.set_inheritable(report, False)
if sys.argv[2]:
    os.environ["LC_CTYPE"] = sys.argv[2][1:]
else:
    os.environ.pop("LC_CTYPE", None)
for name in ("SIGPIPE", "SIGXFSZ"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
try:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except Exception:
    pass
try:
    os.execvp(sys.argv[3], sys.argv[3:])
except OSError as exc:
    os.write(report, str(exc.errno or 0).encode())
    sys.stderr.write(f"cannot start plugin {sys.argv[3]!r}: {exc.strerror}\\n")
os._exit(127)
"""


def can_adopt_orphans() -> bool:
    """Whether plugins are started as child subreapers here (Linux, with a Python to run the trampoline)."""
    executable = os.path.basename(sys.executable or "").lower()
    return sys.platform.startswith("linux") and ("python" in executable or "pypy" in executable)


def spawn(cmdline: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start ``cmdline`` with piped stdio, as described in the module's docstring.

    Raises:
        OSError: the program cannot be executed (``strerror`` says why).
    """
    if not can_adopt_orphans():
        return _popen(list(cmdline), ())
    read_end, write_end = os.pipe()
    try:
        try:
            ctype = os.environ.get("LC_CTYPE")
            trampoline = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(write_end)]
            popen = _popen([*trampoline, "" if ctype is None else f"={ctype}", *cmdline], (write_end,))
        finally:
            os.close(write_end)
        # EOF once execve succeeded (the pipe is close-on-exec there); an
        # errno if it failed. poll, not select: a busy host may have
        # descriptors numbered past select's limit of 1024.
        poller = select.poll()
        poller.register(read_end, select.POLLIN)
        ready = poller.poll(_EXEC_REPORT_WAIT * 1000)
        report = os.read(read_end, 64) if ready else b""
    finally:
        os.close(read_end)
    if report:
        try:
            popen.wait(_FAILED_REAP_WAIT)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()  # Cannot hang: SIGKILL cannot be refused.
        for stream in (popen.stdin, popen.stdout, popen.stderr):
            if stream is not None:
                stream.close()
        code = int(report) if report.isdigit() else 0
        raise OSError(code, os.strerror(code) if code else "cannot execute")
    return popen


def _popen(argv: list[str], pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    # A new session also keeps a terminal's Ctrl-C away from plugins: the
    # host decides when they stop.
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        pass_fds=pass_fds,
        start_new_session=True,
    )
