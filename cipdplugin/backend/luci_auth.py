"""``LuciAuthTokenSource``: tokens of the user's ``luci-auth login``, for people at workstations.

Each fetch runs ``luci-auth token -json-output - -lifetime <lifetime>`` and
reads the ``{"token": ..., "expiry": ...}`` it prints. The run is bounded
twice: in time (the call's deadline, or ``timeout``; then the process is
killed and reaped) and in size (``MAX_TOKEN_COMMAND_OUTPUT`` bytes of
output; then too). Nothing of it outlives the fetch.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import subprocess
from collections.abc import Sequence

from cipdplugin.backend.tokens import BoundedTokenSource, TokenError, deadline_passed
from cipdplugin.backend.wire import time_left
from cipdplugin.constants import LUCI_AUTH_LIFETIME, LUCI_AUTH_TIMEOUT, MAX_TOKEN_COMMAND_OUTPUT
from cipdplugin.deadline import Deadline, checked_timeout

#: ``luci-auth token`` refuses longer lifetimes (``authcli.go``: "The maximum acceptable value is 30m").
MAX_LIFETIME = 30 * 60.0
#: Kept of the command's stderr for the error message: its last line says why.
_STDERR_TAIL = 4096


class LuciAuthTokenSource(BoundedTokenSource):
    """OAuth2 access tokens from ``luci-auth token``, the LUCI login tool.

    Log in once with ``luci-auth login``; each fetch then runs ``luci-auth
    token`` and returns the ``(token, expiry)`` pair it prints
    (``PrpcRepository`` caches it).

    Args:
        executable: the command, found on PATH when the fetch runs.
        scopes: OAuth scopes to ask for (``-scopes``); none: luci-auth's default.
        lifetime: the least lifetime, in seconds, of the token it prints (at most 30 minutes).
        timeout: bound on a fetch made by calling the source, in seconds.
        max_output: most bytes the command may print before it is stopped.

    Raises:
        ValueError, TypeError: a bound is not a positive number (of seconds or bytes).

    Raises (when fetching):
        AdmissionError: UNAUTHENTICATED, saying what to do: luci-auth is not
            installed, not logged in, failed, or printed something unexpected;
            DEADLINE_EXCEEDED when it did not finish in time.
    """

    def __init__(
        self,
        executable: str = "luci-auth",
        *,
        scopes: Sequence[str] = (),
        lifetime: float = LUCI_AUTH_LIFETIME,
        timeout: float = LUCI_AUTH_TIMEOUT,
        max_output: int = MAX_TOKEN_COMMAND_OUTPUT,
    ) -> None:
        self.executable = executable
        self.scopes = tuple(scopes)
        self.lifetime = checked_timeout(lifetime, "lifetime")
        if self.lifetime > MAX_LIFETIME:
            raise ValueError(
                f"lifetime must be at most {MAX_LIFETIME:g} s (luci-auth's limit), got {lifetime!r}"
            )
        self.timeout = checked_timeout(timeout, "timeout")
        if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 1:
            raise ValueError(f"max_output must be a positive number of bytes, got {max_output!r}")
        self.max_output = max_output

    @property
    def description(self) -> str:
        return f"'{os.path.basename(self.executable)} token' (the luci-auth login)"

    def command(self) -> list[str]:
        """The command line run for each token (with the executable found on PATH)."""
        path = shutil.which(self.executable)
        if path is None:
            raise TokenError(
                f"{self.executable!r} was not found: install luci-auth (it comes with depot_tools) "
                "and run 'luci-auth login', or use the backend without credentials"
            )
        argv = [path, "token", "-json-output", "-", "-lifetime", f"{math.ceil(self.lifetime)}s"]
        if self.scopes:
            argv += ["-scopes", " ".join(self.scopes)]
        return argv

    def fetch(self, deadline: Deadline) -> tuple[str, float]:
        argv = self.command()
        seconds = deadline.remaining_or(self.timeout)
        returncode, stdout, stderr = _run_bounded(argv, deadline, self.max_output)
        if returncode is None:
            raise deadline_passed("'luci-auth token'", seconds)
        if returncode != 0:
            said = stderr.decode("utf-8", errors="replace").strip().splitlines()
            raise TokenError(
                f"'luci-auth token' failed (exit status {returncode})"
                + (f": {said[-1]}" if said else "")
                + "; run 'luci-auth login' to log in"
            )
        try:
            data = json.loads(stdout)
            token, expiry = data["token"], data["expiry"]
        except (ValueError, TypeError, KeyError):
            raise TokenError(
                f"'luci-auth token' printed {len(stdout)} bytes that are not a JSON token with an expiry"
            ) from None
        if not isinstance(token, str) or not token or not isinstance(expiry, (int, float)):
            raise TokenError("'luci-auth token' printed an empty token or no expiry")
        return token, float(expiry)


def _run_bounded(argv: list[str], deadline: Deadline, max_output: int) -> tuple[int | None, bytes, bytes]:
    """Run ``argv``: (exit status, stdout, stderr's tail); None for a run stopped at ``deadline``.

    Raises:
        TokenError: it could not start, or printed more than ``max_output`` bytes.
    """
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as exc:
        raise TokenError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    stdout, stderr = bytearray(), bytearray()
    try:
        assert process.stdout is not None and process.stderr is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, stdout)
            selector.register(process.stderr, selectors.EVENT_READ, stderr)
            while selector.get_map():
                left = time_left(deadline)
                if left <= 0:
                    return None, b"", b""
                for key, _ in selector.select(left):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    key.data.extend(chunk)
                    if len(stdout) > max_output:
                        raise TokenError(f"'luci-auth token' printed more than {max_output} bytes")
                    del stderr[:-_STDERR_TAIL]
        try:
            return process.wait(timeout=time_left(deadline)), bytes(stdout), bytes(stderr)
        except subprocess.TimeoutExpired:
            return None, b"", b""
    finally:
        if process.poll() is None:
            process.kill()
        # Cannot hang: the process has exited or was just killed.
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]
