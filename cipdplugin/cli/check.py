"""``cipdplugin check``: ask an admission plugin about pins from the command line.

For legacy tooling that cannot import Python: it launches the plugin the way
the Go CIPD client does, checks every pin at once, prints one verdict per
pin and sums them up in the exit code. The help text (``cipdplugin check
--help``) is the user's documentation; the README repeats it.

Streams: stdout carries only the report (text lines or ``--json``), so it
stays machine-parsable; logs and the progress indicator go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from types import FrameType
from typing import Any, TextIO

import grpc

from cipdplugin import (
    DEFAULT_SERVICE_URL,
    AdmissionChain,
    AdmissionPlugin,
    Config,
    ConfigError,
    Host,
    __version__,
)
from cipdplugin.cli.inputs import (
    PinRequest,
    PluginSpec,
    UsageError,
    parse_pin_argument,
    read_pins_file,
)
from cipdplugin.cli.report import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    WARNED,
    PinReport,
    exit_status,
    json_report,
)
from cipdplugin.cli.sources import add_source_options, resolve_sources
from cipdplugin.constants import DEFAULT_CONNECT_TIMEOUT
from cipdplugin.deadline import Deadline
from cipdplugin.options import ADMISSION_PLUGIN_ENV as PLUGIN_ENV
from cipdplugin.status import DENIED, ERROR, verdict_of
from cipdplugin.text import printable

#: Default limit, in seconds, for the whole run.
DEFAULT_TIMEOUT = 300.0
#: Longest accepted limit: waits longer than the platform's timers can hold
#: would overflow (``threading.TIMEOUT_MAX``).
MAX_TIMEOUT = 365 * 24 * 3600.0
#: Where the command's own progress is logged (under the "cipdplugin" logger shown on stderr).
_logger = logging.getLogger(__name__)
#: Longer pin lists get a progress indicator when stderr is a terminal.
PROGRESS_THRESHOLD = 20
#: How often the progress indicator is refreshed, in seconds.
_PROGRESS_INTERVAL = 0.1
#: The longest the main thread sleeps in one wait for verdicts: a signal the
#: kernel gave another thread (one of grpc's) is handled on the main thread
#: only once it wakes.
_WAIT_SLICE = 0.5
#: Exit status after SIGINT/SIGTERM, following the shell's 128 + signal convention.
_EXIT_INTERRUPTED = 128 + signal.SIGINT
_EXIT_TERMINATED = 128 + signal.SIGTERM

_DESCRIPTION = """\
Ask a CIPD deployment-admission plugin whether package instances may be
deployed, exactly as the CIPD client would before installing them.

The plugin is launched once, every pin is checked concurrently, and one line
per pin is printed to stdout in input order:

  admitted  <package>:<instance_id>
  denied    <package>:<instance_id>: <the plugin's reason>
  warned    <package>:<instance_id>: <the plugin's reason>   (--warn-only)
  error     <package>:<instance_id>: <status code>: <what went wrong>

"denied" is a policy decision of the plugin; "error" means the check itself
failed (invalid pin, plugin missing or crashed, timeout, ...). With several
plugins, a pin is admitted only if every plugin covering it admits it, and
a denial or error names the plugin.
"""

_EPILOG = f"""\
plugin command line and backend (as the Go CIPD client finds them):
  --plugin, or else the {PLUGIN_ENV} environment variable (an empty value,
  [] and null count as unset), holds a JSON list of strings: the executable
  and its arguments, e.g. '["/opt/plugin", "-v"]'. Without either, the
  plugin comes from the CIPD config file: $CIPD_CONFIG_FILE (an absolute
  path, or "-" for none), else /etc/chrome-infra/cipd.cfg if it exists:
    plugins {{ admission {{ cmd: "/opt/plugin" args: "-v" }} }}
  The backend is --service-url, else $CIPD_SERVICE_URL, else
  {DEFAULT_SERVICE_URL}; $CIPD_PROXY_URL (unix:///path) sends backend
  calls through a local CIPD proxy. -v says where each came from. An invalid
  variable or config file is an error (exit status 2). With --plugin, the
  config file is not read.

several plugins:
  --plugin may be repeated; each may be followed by --plugin-scope
  PREFIX[,PREFIX...], the packages it covers (prefixes match at "/":
  infra/tools covers infra/tools and infra/tools/x, not infra/toolsx).
  A plugin without a scope covers every package. Every plugin covering a
  pin is asked at once; a pin no plugin covers is admitted. The environment
  variable and the config file give one plugin covering every package.

deadlines:
  --check-timeout SECONDS fails a check (DEADLINE_EXCEEDED) that a plugin
  has not answered that long after it was sent; the plugin goes on serving
  the other checks. --timeout bounds the whole run.

audit log:
  --audit-log FILE appends one JSON line per check a plugin resolved (and
  per pin no plugin covers, as "unscoped"): ts, pin, package, instance_id,
  verdict, code, message, plugin, plugin_version, service_url, latency_ms,
  enforced (false under --warn-only) and host_pid. Read it with jq, e.g.
    jq -r 'select(.verdict == "denied") | "\\(.ts) \\(.pin) \\(.message)"' FILE

warn-only rollout:
  --warn-only prints denials as "warned" ("verdict": "warned" in --json)
  and leaves them out of the exit status; failed checks still fail.

pins:
  PIN arguments are "package:instance_id". --pins-json reads the file that
  `cipd ensure -json-output FILE` writes ("-" reads standard input):
    {{"result": {{"<subdir>": [{{"package": "...", "instance_id": "..."}}, ...]}}}}
  Invalid pins are reported as errors and never sent to the plugin. Input
  files (--pins-json, --metadata) must be regular files: a FIFO or a device
  is refused, never waited on.

plugin text:
  Control characters in what a plugin says (its denial messages, log
  messages and stderr lines) are shown escaped (\\x1b, \\n) in the lines
  and logs; --json and the audit log keep the exact text, JSON-escaped.

metadata:
  Plugins may ask for instance metadata. --metadata serves it from a JSON file
  (the StaticRepository format, see the README); without it, it comes from
  the backend, each call within --backend-timeout SECONDS (default 30, or
  half of --timeout), through $HTTPS_PROXY / $HTTP_PROXY unless $NO_PROXY
  exempts the backend, as the Go client does.

credentials (https backends; --no-auth sends none):
  chosen as the Go CIPD client chooses them: --service-account-json PATH
  (a service account key; needs cipdplugin[google-auth]) or ":gce" (the GCE
  metadata server); else the default account of $LUCI_CONTEXT (LUCI bots);
  else the `luci-auth login` of the user. Plain http backends and the CIPD
  proxy get none. -v names the source chosen and each wait on the backend.

--json report (printed to stdout instead of the lines):
  {{"pins": [{{"pin": "<as given>", "package": "<str or null>",
             "instance_id": "<str or null>",
             "verdict": "admitted" | "denied" | "warned" | "error",
             "code": "OK" | "<gRPC status code name>", "message": "<str>"}}, ...],
   "totals": {{"admitted": <n>, "denied": <n>, "error": <n>}}}}
  Pins appear in input order; "message" is "" for admitted pins. Under
  --warn-only, "totals" also counts "warned" (and "denied" stays 0).

logging (stderr only):
  by default only warnings and errors (including the plugin's own stderr
  output); -v adds the plugin's info logs and the host's progress ("waiting
  for the plugin to connect"), -vv debug logs; -q shows nothing.
  A progress indicator appears on stderr when it is a terminal and more than
  {PROGRESS_THRESHOLD} pins are checked.

exit status:
  0  every pin was admitted (or, with --warn-only, admitted or warned)
  1  some pins were denied, and no check failed
  2  usage or configuration error (bad arguments, input files, CIPD_*
     variables or config file): nothing was checked
  3  some check failed (an "error" line), whatever the other verdicts
  4  internal error: a bug in cipdplugin, please report it (one line on
     stderr; -vv shows the traceback)
  Nothing to check (a --pins-json file with no pins) is exit status 0. If
  the reader of stdout goes away (`| head`), the status is still that of
  the verdicts.

example:
  cipdplugin check \\
      --plugin '["python3", "examples/allowlist_plugin.py"]' \\
      --metadata examples/metadata.json \\
      infra/tools/deployer/linux-amd64:Q53qfEtj15kpxufMXyZoYhWQIRVZGYnnOmMq5H7DypsC

  cipd ensure -ensure-file cipd.ensure -root out -json-output pins.json
  CIPD_ADMISSION_PLUGIN='["/opt/plugin"]' cipdplugin check --json --pins-json pins.json
"""


# -- Running the checks --------------------------------------------------------


class Progress:
    """``checked N/M`` on one line of a terminal, rewritten in place."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._shown: tuple[int, int] | None = None

    def show(self, done: int, total: int) -> None:
        if self._shown != (done, total):
            self._stream.write(f"\r  checked {done}/{total}")
            self._stream.flush()
            self._shown = (done, total)

    def clear(self) -> None:
        if self._shown is not None:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = None


def _wait_all(futures: Sequence[Future[None]], deadline: Deadline, progress: Progress | None) -> None:
    """Return when every future is done or at ``deadline``, refreshing ``progress``."""
    total = len(futures)
    # Guards ``finished``; the callbacks run on whichever thread resolves a future.
    lock = threading.Lock()
    finished = 0
    all_done = threading.Event()

    def count(_: Future[None]) -> None:
        nonlocal finished
        with lock:
            finished += 1
            if finished == total:
                all_done.set()

    for future in futures:
        future.add_done_callback(count)
    while not deadline.expired():
        if all_done.wait(deadline.remaining_or(_PROGRESS_INTERVAL if progress else _WAIT_SLICE)):
            break
        if progress:
            progress.show(finished, total)
    if progress:
        progress.show(finished, total)
        progress.clear()


def _report(
    request: PinRequest, future: Future[None] | None, timeout: float, *, warn_only: bool
) -> PinReport:
    if request.pin is None or future is None:
        return PinReport(request, ERROR, grpc.StatusCode.INVALID_ARGUMENT, request.problem)
    if not future.done():
        return PinReport(
            request, ERROR, grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within the {timeout:g} s timeout"
        )
    verdict, code, message = verdict_of(future.exception(timeout=0))
    return PinReport(request, WARNED if warn_only and verdict == DENIED else verdict, code, message)


def _open_host(config: Config, audit_log: str | None, warn_only: bool) -> Host:
    try:
        return Host(config, audit_log=audit_log, enforce=not warn_only)
    except OSError as exc:
        raise UsageError(f"cannot open the audit log {audit_log!r}: {exc.strerror or exc}") from None
    except ValueError as exc:  # not a file, FIFO or character device
        raise UsageError(str(exc)) from None


def check_pins(
    requests: Sequence[PinRequest],
    plugins: Sequence[PluginSpec],
    config: Config,
    *,
    timeout: float,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    check_timeout: float | None = None,
    audit_log: str | None = None,
    warn_only: bool = False,
    progress: Progress | None = None,
    stop_signals: StopSignals | None = None,
) -> list[PinReport]:
    """Check every valid pin with the plugins; one verdict per request, in order.

    One unscoped plugin is asked directly; several, or a scoped one, form
    an ``AdmissionChain``. Every check is submitted at once. Checks
    unresolved ``timeout`` seconds after the start become DEADLINE_EXCEEDED
    errors; the plugins are then terminated, which takes at most a few more
    seconds. A plugin that has not connected ``connect_timeout`` seconds
    after its launch fails every check it was asked. Never raises for a
    plugin's failure: that becomes error verdicts. With ``stop_signals``,
    signals cannot interrupt the closing host; one that arrived meanwhile is
    raised once it is closed.

    Raises:
        UsageError: the audit log cannot be opened.
    """
    deadline = Deadline(timeout)
    valid = [request.pin for request in requests if request.pin is not None]
    futures: list[Future[None] | None] = [None] * len(requests)
    host = _open_host(config, audit_log, warn_only)
    try:
        if valid:
            # Room for every check, so that submitting never blocks on a slow
            # plugin and the deadline alone bounds the run.
            members = [
                (
                    host.new_admission_plugin(
                        spec.cmdline,
                        connect_timeout=connect_timeout,
                        max_pending=len(valid),
                        check_timeout=check_timeout,
                    ),
                    spec.scope,
                )
                for spec in plugins
            ]
            checker: AdmissionChain | AdmissionPlugin = (
                members[0][0] if len(members) == 1 and not members[0][1] else AdmissionChain(members)
            )
            for index, request in enumerate(requests):
                if request.pin is not None:
                    futures[index] = checker.check_admission(request.pin)
            # The first check launched them; the host logs (at debug) when each connects.
            _logger.info(
                "waiting for the plugin%s to connect (up to %g s)",
                "s" if len(members) > 1 else "",
                connect_timeout,
            )
            _wait_all([f for f in futures if f is not None], deadline, progress)
        # Before the host closes: closing fails whatever is still pending.
        return [
            _report(request, future, timeout, warn_only=warn_only)
            for request, future in zip(requests, futures, strict=True)
        ]
    finally:
        if stop_signals is not None:
            stop_signals.defer()
        host.close()
        if stop_signals is not None:
            stop_signals.raise_deferred()


class _Terminated(Exception):
    """SIGTERM arrived: unwind so that the host stops its plugins."""


def _note(text: str) -> None:
    """One line on stderr; safe in a signal handler (never raises)."""
    # Not through sys.stderr: the main thread may be inside a write to it.
    with contextlib.suppress(OSError, ValueError):
        os.write(2, f"cipdplugin check: {text}\n".encode())


class StopSignals:
    """SIGINT and SIGTERM for ``cipdplugin check``: the first one unwinds, later ones wait.

    The first signal raises ``KeyboardInterrupt`` (SIGINT) or ``_Terminated``
    (SIGTERM) in the main thread, so that the host closes and stops the
    plugin. From then on, and from ``defer()`` on, a signal only prints a
    note: an interrupted ``Host.close()`` would leave the plugin and its
    descendants running, and the close is bounded (a few seconds at most).
    ``first`` is the signal the exit status reports.
    """

    def __init__(self) -> None:
        # Written by the handler, which runs in the main thread only.
        self.first: int | None = None
        self._deferring = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle both signals within the block (in the main thread; elsewhere, no change)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def defer(self) -> None:
        """From now on, signals are only noted (the plugin is being stopped)."""
        self._deferring = True

    def raise_deferred(self) -> None:
        """Raise for a signal that arrived while deferred, now that the close is over."""
        if self.first is not None and self._deferring:
            self._deferring = False
            raise KeyboardInterrupt if self.first == signal.SIGINT else _Terminated

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.first is None and not self._deferring:
            self.first = signum
            # Set before raising: a second signal may come at any moment now.
            self._deferring = True
            _note("stopping the plugin before exiting")
            raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated
        if self.first is None:
            self.first = signum
        _note("still stopping the plugin; this takes a few seconds at most")


# -- The command line ----------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT:g} seconds (a year), got {text!r}")
    return value


class _PluginAction(argparse.Action):
    """``--plugin``: appends ``[JSON_LIST, None]``; ``--plugin-scope`` fills in the None."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        entries = list(getattr(namespace, self.dest) or [])
        entries.append([values, None])
        setattr(namespace, self.dest, entries)


class _ScopeAction(argparse.Action):
    """``--plugin-scope``: the scope of the ``--plugin`` given just before."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        entries = getattr(namespace, "plugin", None)
        if not entries:
            parser.error("--plugin-scope must follow the --plugin it applies to")
        if entries[-1][1] is not None:
            parser.error("--plugin-scope was given twice for one --plugin")
        entries[-1][1] = values


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: it reports arguments it does not know itself, with its own usage.

    Left to the top-level parser, ``check --bogus`` would print the top
    level's usage, which does not show ``check``'s options.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``check`` subcommand parser."""
    parser = argparse.ArgumentParser(
        prog="cipdplugin",
        description="CIPD deployment-admission plugins from the command line.",
        epilog="Run 'cipdplugin check --help' for the details and examples.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    check = commands.add_parser(
        "check",
        help="ask an admission plugin whether pins may be deployed",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("pins", nargs="*", metavar="PIN", help='a pin, "package:instance_id"')
    check.add_argument(
        "--plugin",
        action=_PluginAction,
        metavar="JSON_LIST",
        help=f"a plugin command line as a JSON list of strings; repeatable (default: ${PLUGIN_ENV})",
    )
    check.add_argument(
        "--plugin-scope",
        action=_ScopeAction,
        metavar="PREFIX[,PREFIX...]",
        help="the packages the --plugin just before covers (default: all)",
    )
    check.add_argument(
        "--check-timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="fail a check a plugin has not answered this long after it was sent (default: no limit)",
    )
    check.add_argument("--audit-log", metavar="FILE", help="append one JSON line per resolved check to FILE")
    check.add_argument(
        "--warn-only",
        action="store_true",
        help='report denials as "warned" and leave them out of the exit status; failed checks still fail',
    )
    check.add_argument(
        "--service-url",
        metavar="URL",
        help=f"the CIPD backend the pins come from (default: $CIPD_SERVICE_URL, else {DEFAULT_SERVICE_URL})",
    )
    check.add_argument(
        "--metadata",
        metavar="FILE.json",
        help="instance metadata to serve to the plugin (default: the backend's)",
    )
    add_source_options(check)
    check.add_argument(
        "--pins-json",
        action="append",
        default=[],
        metavar="FILE",
        help='pins from a `cipd ensure -json-output` file; "-" reads stdin; repeatable',
    )
    check.add_argument("--json", action="store_true", help="print a machine-readable JSON report")
    check.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="limit for the whole run; later answers are errors (default: %(default)g)",
    )
    check.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="how long the plugin may take to start and connect; then every check fails "
        "(default: %(default)g)",
    )
    noise = check.add_mutually_exclusive_group()
    noise.add_argument(
        "-v", "--verbose", action="count", default=0, help="show plugin logs on stderr (-vv: debug too)"
    )
    noise.add_argument("-q", "--quiet", action="store_true", help="show no logs at all, not even warnings")
    return parser, check


class _PrintableFormatter(logging.Formatter):
    """One log line per record, whatever its message holds: controls are shown escaped.

    The host escapes what plugins send; this also covers every other
    message that quotes outside text (file contents, exception texts). A
    traceback (``-vv``) keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        shown = logging.makeLogRecord(record.__dict__)
        shown.message = printable(record.message)
        return super().formatMessage(shown)


@contextlib.contextmanager
def _logging_to(stream: TextIO, level: int) -> Iterator[None]:
    """Send the ``cipdplugin`` logger (where plugin logs land) to ``stream`` at ``level``."""
    logger = logging.getLogger("cipdplugin")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_PrintableFormatter("cipdplugin: %(levelname)s: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _log_level(verbose: int, quiet: bool) -> int:
    if quiet:
        return logging.CRITICAL + 1
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def run_check(
    args: argparse.Namespace,
    *,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    environ: Mapping[str, str],
    stop_signals: StopSignals | None = None,
) -> int:
    """Run ``cipdplugin check`` with parsed ``args``; returns the exit status.

    Raises:
        UsageError: the arguments or input files are unusable.
        ConfigError: the CIPD client options (environment, config file) are invalid.
    """
    # Nothing connects before the checks run: only they need closing after.
    sources = resolve_sources(args, environ)
    if args.pins_json.count("-") > 1:
        raise UsageError('"--pins-json -" may be given only once: standard input is read once')
    if not args.pins and not args.pins_json:
        raise UsageError("no pins to check: give PIN arguments or --pins-json FILE")
    requests = [parse_pin_argument(text) for text in args.pins]
    for path in args.pins_json:
        requests += read_pins_file(path, stdin)
    long_run = sum(request.pin is not None for request in requests) > PROGRESS_THRESHOLD
    progress = Progress(stderr) if long_run and stderr.isatty() else None
    with _logging_to(stderr, _log_level(args.verbose, args.quiet)):
        sources.log_origins()
        if not requests:
            _logger.info("nothing to check: the pins files hold no pins")
        with sources:
            verdicts = check_pins(
                requests,
                sources.plugins,
                sources.config,
                timeout=args.timeout,
                connect_timeout=args.connect_timeout,
                check_timeout=args.check_timeout,
                audit_log=args.audit_log,
                warn_only=args.warn_only,
                progress=progress,
                stop_signals=stop_signals,
            )
    try:
        if args.json:
            stdout.write(json.dumps(json_report(verdicts, warn_only=args.warn_only), indent=2) + "\n")
        else:
            stdout.writelines(verdict.as_line() + "\n" for verdict in verdicts)
        stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head -1`): it has what it wanted; the
        # status still tells the verdicts.
        _discard_output(stdout)
    return exit_status(verdicts)


def _discard_output(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at /dev/null, so that what it still buffers
    (flushed again at exit) cannot fail once more."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def _say(text: str) -> None:
    """One line on stderr for the user; a stderr that is gone is no reason to fail."""
    with contextlib.suppress(OSError, ValueError):
        print(f"cipdplugin check: {printable(text)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``cipdplugin`` console script; returns the exit status (see ``--help``)."""
    parser, check = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or an argparse usage error
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    stop_signals = StopSignals()
    try:
        with stop_signals.installed():
            return run_check(
                args,
                stdin=sys.stdin,
                stdout=sys.stdout,
                stderr=sys.stderr,
                environ=os.environ,
                stop_signals=stop_signals,
            )
    except UsageError as exc:
        with contextlib.suppress(OSError, ValueError):
            check.print_usage(sys.stderr)
        _say(f"error: {exc}")
        return EXIT_ERROR
    except ConfigError as exc:
        _say(f"error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("interrupted")
        return _EXIT_INTERRUPTED
    except _Terminated:
        _say("terminated")
        return _EXIT_TERMINATED
    except Exception as exc:
        # The last line of defence: a bug must never read as a verdict.
        if args.verbose >= 2:
            with contextlib.suppress(OSError, ValueError):
                traceback.print_exc(file=sys.stderr)
        _say(
            f"internal error (a bug in cipdplugin {__version__}; please report it"
            f"{'' if args.verbose >= 2 else ', with the traceback -vv shows'}): "
            f"{type(exc).__name__}: {exc}"
        )
        return EXIT_INTERNAL
