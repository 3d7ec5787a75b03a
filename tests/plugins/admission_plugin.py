"""A test admission plugin with modes, run by the tests as a real subprocess.

Usage: admission_plugin.py MODE [ARG...]. Modes:

* ``admit``: admits everything except packages under ``deny/`` (denied) and
  ``error/`` (answered with PERMISSION_DENIED).
* ``metadata``: admits if the instance has a metadata entry ``allow``;
  ``metadata-first`` only looks at the first entry; ``metadata-all`` with
  a page size (argument) visits every entry and denies, saying how many.
* ``raise``: the handler raises ValueError.
* ``slow``: each handler sleeps the given seconds (default 0.2).
* ``log``: logs at every level, then admits.
* ``crash-on-start``: exits 3 at once; ``crash-on-second``: exits 7 on the second check.
* ``never-connect``: reads the handshake and sleeps.
* ``crash-on-connect``: reads the handshake, then exits 4 before ListAdmissions.
* ``slow-connect``: waits the given seconds (default 1) before connecting, then acts as ``admit``.
* ``wrong-version``: asks for protocol version 2.
* ``ignore-eof``: admits, and keeps running after stdin closes.
* ``ignore-sigterm``: like ignore-eof, and ignores SIGTERM too; with an
  argument N it first starts N children (and grandchildren) that do the same.
* ``hold``: like ignore-sigterm (with the same argument), but never answers a check.
* ``stuck-handler``: the handler never returns (but the plugin must still exit on EOF).
* ``echo-request``: denies, with "<service_url> <pin> <hash_algo> <hex_digest>" as the message.
* ``flood``: writes the given number of lines to stderr and logs as many records, then admits.
* ``orphan PID_FILE``: starts a child that starts a grandchild and exits (the
  grandchild is reparented), then acts as ``admit``.
* ``new-group PID_FILE``: like ``orphan``, but the child first moves to a
  process group of its own (in the same session).
* ``daemon PID_FILE``: starts a daemon the classic way (fork, ``setsid``,
  fork, the middle process exits), then acts as ``admit``.
* ``flood-after-exit PID_FILE``: starts a child that writes short lines to
  the inherited stdout without end, admits the first check and exits 7 on
  the second.
* ``silent PREFIX[,PREFIX...]``: never answers packages under a prefix (until
  the host stops it); answers the others as ``admit`` does.
* ``late SECONDS PREFIX[,PREFIX...]``: answers packages under a prefix after
  SECONDS (admitting them); the others at once, as ``admit`` does.
* ``deny-prefix PREFIX[,PREFIX...]``: denies packages under a prefix, saying
  which prefix; admits everything else. Prefixes match at ``/`` boundaries.
* ``say JSON_STRING``: for each check, writes the string (a JSON string, so
  that it may hold any character) to stderr, logs it at ERROR through the
  host, and denies with it as the message.
* ``workers N``: reads every metadata entry of the instance, then admits;
  at most N handlers at once (``max_workers=N``).
* ``allowed-sha256 [N]``: what luci's example plugin does: denies packages
  under ``experimental/``, else admits if an ``allowed-sha256`` entry holds
  the instance's hex digest; with N, ``max_workers=N``.

The modes with a PID_FILE write the pid of the process that is left behind
to it (atomically, so a test can poll for the file).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cipdplugin.plugins import admission, read_handshake

_checks = 0
_checks_lock = threading.Lock()


def _count() -> int:
    global _checks
    with _checks_lock:
        _checks += 1
        return _checks


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else "admit"
    args = argv[2:]

    if mode == "crash-on-start":
        print("crashing on start as asked", file=sys.stderr)
        return 3
    if mode == "never-connect":
        read_handshake(sys.stdin.buffer)
        time.sleep(600)
        return 0
    if mode == "crash-on-connect":
        read_handshake(sys.stdin.buffer)
        print("crashing while connecting as asked", file=sys.stderr)
        return 4
    if mode == "slow-connect":
        # The handshake waits in the pipe meanwhile; then serve as "admit".
        time.sleep(float(args[0]) if args else 1.0)
        mode = "admit"
    if mode in ("ignore-sigterm", "hold"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _start_stubborn_children(int(args[0]) if args else 0)
    if mode in ("ignore-eof", "ignore-sigterm", "hold"):
        code = admission.run(_never_answer if mode == "hold" else _admit_all, version="test-plugin 1.0")
        while True:
            time.sleep(1)
        return code
    if mode == "wrong-version":
        admission.PROTOCOL_VERSION = 2  # type: ignore[attr-defined]
        from cipdplugin.plugins import admission as module

        module.PROTOCOL_VERSION = 2  # type: ignore[attr-defined]
    if mode in _LEFT_BEHIND:
        subprocess.Popen(
            [sys.executable, "-c", _LEFT_BEHIND[mode], args[0]],
            stdin=subprocess.DEVNULL,
            stdout=None if mode == "flood-after-exit" else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).wait()
        mode = "crash-on-second" if mode == "flood-after-exit" else "admit"
    if mode == "flood":
        count = int(args[0]) if args else 1000
        for i in range(count):
            print(f"flood line {i}", file=sys.stderr)
        sys.stderr.flush()

    max_workers = admission.DEFAULT_MAX_WORKERS
    if mode == "workers" or (mode == "allowed-sha256" and args):
        max_workers = int(args[0])

    def handler(request: admission.Request, info: admission.InstanceInfo) -> None:
        n = _count()
        if mode in {"admit", "wrong-version"}:
            _admit_by_name(request)
        elif mode == "metadata":
            if not any(md.key == "allow" for md in info.metadata()):
                raise admission.Denied("no 'allow' metadata")
        elif mode == "metadata-first":
            for md in info.metadata():
                if md.key == "allow":
                    return
                raise admission.Denied(f"newest entry is {md.key!r}")
            raise admission.Denied("no metadata")
        elif mode == "metadata-all":
            seen = sum(1 for _ in info.metadata(page_size=int(args[0]) if args else 20))
            raise admission.Denied(f"visited {seen} entries")
        elif mode == "raise":
            raise ValueError("boom")
        elif mode == "slow":
            time.sleep(float(args[0]) if args else 0.2)
        elif mode == "log":
            log = logging.getLogger("test-plugin")
            log.debug("a debug line")
            log.info("an info line")
            log.warning("a warning line")
            log.error("an error line")
        elif mode == "crash-on-second":
            if n >= 2:
                os._exit(7)
        elif mode == "stuck-handler":
            threading.Event().wait()
        elif mode == "echo-request":
            instance = request.instance
            raise admission.Denied(
                f"{request.service_url} {request.pin} {instance.hash_algo} {instance.hex_digest}"
            )
        elif mode == "silent":
            if _under(request.package, args[0]):
                request.stopping.wait()  # no answer: the host's deadline must act
                return
            _admit_by_name(request)
        elif mode == "late":
            if _under(request.package, args[1]):
                time.sleep(float(args[0]))
                return
            _admit_by_name(request)
        elif mode == "deny-prefix":
            for prefix in args[0].split(","):
                if _under(request.package, prefix):
                    raise admission.Denied(f"{request.package} is under {prefix}")
        elif mode == "say":
            text = json.loads(args[0])
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            logging.getLogger("test-plugin").error("%s", text)
            raise admission.Denied(text)
        elif mode == "flood":
            for i in range(int(args[0]) if args else 1000):
                logging.getLogger("flood").warning("flood record %d", i)
        elif mode == "workers":
            for _ in info.metadata():
                pass
        elif mode == "allowed-sha256":
            if request.package.startswith("experimental/"):
                raise admission.Denied("experimental packages are not allowed")
            digest = request.instance.hex_digest.encode()
            if not any(md.value == digest for md in info.metadata(keys=["allowed-sha256"])):
                raise admission.Denied('no "allowed-sha256" entry holds the instance\'s digest')
        else:
            raise admission.Error(f"unknown mode {mode}", code=grpc.StatusCode.INVALID_ARGUMENT)

    if mode == "log":
        logging.getLogger().setLevel(logging.DEBUG)
    return admission.run(handler, version="test-plugin 1.0", max_workers=max_workers)


def _admit_by_name(request: admission.Request) -> None:
    if request.package.startswith("deny/"):
        raise admission.Denied(f"{request.package} is denied")
    if request.package.startswith("error/"):
        raise admission.Error("no access", code=grpc.StatusCode.PERMISSION_DENIED)


def _never_answer(request: admission.Request, info: admission.InstanceInfo) -> None:
    threading.Event().wait()


def _under(package: str, prefixes: str) -> bool:
    return any(package == p or package.startswith(p + "/") for p in prefixes.split(","))


def _admit_all(request: admission.Request, info: admission.InstanceInfo) -> None:
    _admit_by_name(request)


def _left_behind(*, leave: str, body: str) -> str:
    """Code for a child that runs ``leave``, forks a grandchild and exits.

    The grandchild writes its pid, then runs ``body``.
    """
    return textwrap.dedent(
        f"""
        import os, sys, time
        {leave}
        if os.fork() == 0:
            with open(sys.argv[1] + ".tmp", "w") as file:
                file.write(str(os.getpid()))
            os.replace(sys.argv[1] + ".tmp", sys.argv[1])
            {body}
        os._exit(0)
        """
    )


_FLOOD = """
            while True:
                try:
                    os.write(1, b"flooding\\n")
                except OSError:
                    time.sleep(0.01)
"""
#: The code of the child each mode starts (and waits for).
_LEFT_BEHIND = {
    "orphan": _left_behind(leave="", body="time.sleep(600)"),
    "new-group": _left_behind(leave="os.setpgid(0, 0)", body="time.sleep(600)"),
    "daemon": _left_behind(leave="os.setsid()", body="time.sleep(600)"),
    "flood-after-exit": _left_behind(leave="", body=_FLOOD.strip()),
}


def _start_stubborn_children(count: int) -> None:
    for _ in range(count):
        # Each child ignores SIGTERM and starts a grandchild that does the same.
        code = (
            "import signal, subprocess, sys, time;"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "subprocess.Popen([sys.executable, '-c', "
            "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'],"
            " stdin=subprocess.DEVNULL);"
            "time.sleep(600)"
        )
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
