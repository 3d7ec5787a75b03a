"""``cipdplugin check``: runs through the real console script in a subprocess;
usage errors, which stop before any plugin runs, call ``main(argv)`` in-process."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from cipdplugin.cli import main
from cipdplugin.cli.report import EXIT_CHECK_FAILED, EXIT_ERROR, EXIT_INTERNAL
from tests.conftest import REPO_ROOT, SHA256_ID, hex_id, plugin_cmd, wait_until

PLUGIN_ENV = "CIPD_ADMISSION_PLUGIN"
INSTALLED_SCRIPT = Path(sys.executable).parent / "cipdplugin"
ALLOWLIST_PLUGIN = REPO_ROOT / "examples" / "allowlist_plugin.py"
PIN_FIELDS = {"pin", "package", "instance_id", "verdict", "code", "message"}

ADMITTED_PIN = f"ok/tool:{hex_id(1)}"
DENIED_PIN = f"deny/tool:{hex_id(2)}"
ERROR_PIN = f"error/tool:{hex_id(3)}"


def run_cli(
    *args: str,
    stdin: str = "",
    env: dict[str, str] | None = None,
    executable: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cipdplugin`` with ``args``, no inherited CIPD variable and no config file."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CIPD_")}
    environment["CIPD_CONFIG_FILE"] = "-"
    environment.update(env or {})
    command = executable or [sys.executable, "-m", "cipdplugin"]
    return subprocess.run(
        [*command, *args],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        timeout=60,
    )


def check(mode: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cipdplugin check`` with the test plugin in ``mode``."""
    return run_cli("check", "--plugin", json.dumps(plugin_cmd(mode)), *args, **kwargs)


@dataclasses.dataclass
class MainResult:
    returncode: int
    stdout: str
    stderr: str


def run_main(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> MainResult:
    """Call ``main(args)`` in this process, as ``run_cli`` runs the script."""
    saved_environ, saved_stdin = dict(os.environ), sys.stdin
    out, err = io.StringIO(), io.StringIO()
    try:
        for name in [name for name in os.environ if name.startswith("CIPD_")]:
            del os.environ[name]
        os.environ["CIPD_CONFIG_FILE"] = "-"
        os.environ.update(env or {})
        sys.stdin = io.StringIO(stdin)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        sys.stdin = saved_stdin
        os.environ.clear()
        os.environ.update(saved_environ)
    return MainResult(code, out.getvalue(), err.getvalue())


def check_main(mode: str, *args: str, **kwargs: Any) -> MainResult:
    """``check`` with the test plugin in ``mode``, through ``run_main``."""
    return run_main("check", "--plugin", json.dumps(plugin_cmd(mode)), *args, **kwargs)


def report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def verdicts(result: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """(verdict, code) of each pin of a ``--json`` report, in order."""
    return [(entry["verdict"], entry["code"]) for entry in report(result)["pins"]]


def ensure_output(pins_by_subdir: dict[str, list[str]]) -> str:
    """What ``cipd ensure -json-output`` writes for these pins."""
    result = {
        subdir: [dict(zip(("package", "instance_id"), pin.split(":"), strict=True)) for pin in pins]
        for subdir, pins in pins_by_subdir.items()
    }
    return json.dumps({"result": result})


# -- Verdicts and exit codes ---------------------------------------------------


def test_all_admitted_exits_0_with_one_line_per_pin() -> None:
    second = f"ok/other:{SHA256_ID}"
    result = check("admit", ADMITTED_PIN, second)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"admitted  {ADMITTED_PIN}", f"admitted  {second}"]
    assert result.stderr == ""


def test_denied_exits_1_with_the_reason() -> None:
    result = check("admit", DENIED_PIN, ADMITTED_PIN)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"denied    {DENIED_PIN}: deny/tool is denied",
        f"admitted  {ADMITTED_PIN}",
    ]


def test_failed_check_exits_3_even_with_denials() -> None:
    result = check("admit", ADMITTED_PIN, ERROR_PIN, DENIED_PIN)
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines() == [
        f"admitted  {ADMITTED_PIN}",
        f"error     {ERROR_PIN}: PERMISSION_DENIED: no access",
        f"denied    {DENIED_PIN}: deny/tool is denied",
    ]


def test_json_report_schema() -> None:
    bad_package = f"Bad/Name:{hex_id(4)}"
    result = check("admit", "--json", DENIED_PIN, ADMITTED_PIN, ERROR_PIN, bad_package, "no-colon")
    assert result.returncode == 3, result.stderr
    data = report(result)
    assert set(data) == {"pins", "totals"}
    assert data["totals"] == {"admitted": 1, "denied": 1, "error": 3}
    for entry in data["pins"]:
        assert set(entry) == PIN_FIELDS
    assert data["pins"][:3] == [
        {
            "pin": DENIED_PIN,
            "package": "deny/tool",
            "instance_id": hex_id(2),
            "verdict": "denied",
            "code": "FAILED_PRECONDITION",
            "message": "deny/tool is denied",
        },
        {
            "pin": ADMITTED_PIN,
            "package": "ok/tool",
            "instance_id": hex_id(1),
            "verdict": "admitted",
            "code": "OK",
            "message": "",
        },
        {
            "pin": ERROR_PIN,
            "package": "error/tool",
            "instance_id": hex_id(3),
            "verdict": "error",
            "code": "PERMISSION_DENIED",
            "message": "no access",
        },
    ]
    bad, unparsable = data["pins"][3:]
    assert (bad["pin"], bad["package"], bad["verdict"], bad["code"]) == (
        bad_package,
        "Bad/Name",
        "error",
        "INVALID_ARGUMENT",
    )
    assert "invalid package name 'Bad/Name'" in bad["message"]
    assert (unparsable["pin"], unparsable["package"], unparsable["instance_id"]) == ("no-colon", None, None)
    assert "expected 'package:instance_id'" in unparsable["message"]


def test_json_report_exit_codes_match_text_mode() -> None:
    assert check("admit", "--json", ADMITTED_PIN).returncode == 0
    denied = check("admit", "--json", DENIED_PIN)
    assert denied.returncode == 1
    assert report(denied)["totals"] == {"admitted": 0, "denied": 1, "error": 0}


def test_installed_console_script() -> None:
    if not INSTALLED_SCRIPT.exists():
        pytest.skip("the package is not installed in this environment (no cipdplugin script)")
    result = run_cli(
        "check",
        "--plugin",
        json.dumps(plugin_cmd("admit")),
        ADMITTED_PIN,
        DENIED_PIN,
        executable=[str(INSTALLED_SCRIPT)],
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[0] == f"admitted  {ADMITTED_PIN}"
    assert result.stdout.splitlines()[1].startswith(f"denied    {DENIED_PIN}: ")


# -- Where the plugin comes from -----------------------------------------------


def test_plugin_from_environment_variable() -> None:
    result = run_cli("check", ADMITTED_PIN, DENIED_PIN, env={PLUGIN_ENV: json.dumps(plugin_cmd("admit"))})
    assert result.returncode == 1, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["admitted", "denied"]


def test_plugin_option_wins_over_environment_variable() -> None:
    result = check("admit", ADMITTED_PIN, env={PLUGIN_ENV: '["/nonexistent/plugin"]'})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        ("not json", "--plugin is not valid JSON"),
        ('{"cmd": "x"}', "--plugin must be a JSON list of strings, got an object"),
        ('"/bin/plugin"', "--plugin must be a JSON list of strings, got a string"),
        ("[]", "--plugin is an empty list"),
        ('["/bin/plugin", 3]', "--plugin: item 1 must be a string"),
        ('[""]', "the executable (item 0) must not be empty"),
    ],
)
def test_invalid_plugin_option_is_a_usage_error(plugin: str, expected: str) -> None:
    result = run_main("check", "--plugin", plugin, ADMITTED_PIN)
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stdout == ""


def test_invalid_environment_variable_is_a_usage_error() -> None:
    result = run_main("check", ADMITTED_PIN, env={PLUGIN_ENV: "[oops"})
    assert result.returncode == 2
    assert f"${PLUGIN_ENV} is not valid JSON" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("env", [{}, {PLUGIN_ENV: ""}], ids=["unset", "empty"])
def test_missing_plugin_is_a_usage_error(env: dict[str, str]) -> None:
    result = run_main("check", ADMITTED_PIN, env=env)
    assert result.returncode == 2
    assert "no plugin given" in result.stderr
    assert result.stdout == ""


def test_plugin_that_does_not_exist_fails_every_check() -> None:
    result = run_cli("check", "--json", "--plugin", '["/nonexistent/plugin"]', ADMITTED_PIN, DENIED_PIN)
    assert result.returncode == 3
    data = report(result)
    assert verdicts(result) == [("error", "UNAVAILABLE")] * 2
    assert all("/nonexistent/plugin" in entry["message"] for entry in data["pins"])


def test_plugin_crashing_midway_fails_the_remaining_pins() -> None:
    pins = [f"ok/tool{n}:{hex_id(n)}" for n in range(6)]
    result = check("crash-on-second", "--json", *pins)
    assert result.returncode == 3
    data = report(result)
    assert [entry["pin"] for entry in data["pins"]] == pins
    # Which checks got in before the crash is up to the plugin's threads.
    assert set(verdicts(result)) <= {("admitted", "OK"), ("error", "ABORTED")}
    assert data["totals"]["error"] >= len(pins) - 1


def test_timeout_reports_unanswered_pins_and_stops_the_plugin() -> None:
    result = check("stuck-handler", "--timeout", "0.5", "--json", ADMITTED_PIN, DENIED_PIN)
    assert result.returncode == 3
    assert verdicts(result) == [("error", "DEADLINE_EXCEEDED")] * 2
    assert "0.5 s" in report(result)["pins"][0]["message"]


def test_connect_timeout_fails_every_check_of_a_plugin_that_never_connects() -> None:
    # The run's own timeout is far away: only --connect-timeout can end it.
    result = check(
        "never-connect", "--connect-timeout", "1", "--timeout", "120", "--json", ADMITTED_PIN, DENIED_PIN
    )
    assert result.returncode == 3, result.stderr
    codes = {code for verdict, code in verdicts(result) if verdict == "error"}
    assert len(verdicts(result)) == 2
    assert codes and codes <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert all("connect" in entry["message"] for entry in report(result)["pins"])


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_connect_timeout_must_be_positive_seconds(value: str) -> None:
    result = check("admit", "--connect-timeout", value, ADMITTED_PIN)
    assert result.returncode == 2
    assert "--connect-timeout" in result.stderr


# -- Pins ----------------------------------------------------------------------


def test_pins_json_from_standard_input_in_file_order() -> None:
    pins = {"": [DENIED_PIN, ADMITTED_PIN], "tools": [f"ok/other:{SHA256_ID}"]}
    result = check("admit", "--json", "--pins-json", "-", stdin=ensure_output(pins))
    assert result.returncode == 1, result.stderr
    assert [entry["pin"] for entry in report(result)["pins"]] == [*pins[""], *pins["tools"]]
    assert verdicts(result) == [("denied", "FAILED_PRECONDITION"), ("admitted", "OK"), ("admitted", "OK")]


def test_pins_json_file_after_pin_arguments(tmp_path: Path) -> None:
    pins_file = tmp_path / "pins.json"
    pins_file.write_text(ensure_output({"sub": [DENIED_PIN]}), encoding="utf-8")
    result = check("admit", ADMITTED_PIN, "--pins-json", str(pins_file))
    assert result.returncode == 1, result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [
        ["admitted", ADMITTED_PIN],
        ["denied", f"{DENIED_PIN}:"],
    ]


def test_invalid_pins_are_reported_individually_and_not_checked() -> None:
    stdin = json.dumps(
        {
            "result": {
                "": [
                    {"package": "ok/json", "instance_id": "not-an-id"},
                    {"package": "ok/b", "instance_id": hex_id(5)},
                ]
            }
        }
    )
    result = check("admit", "UPPER:" + hex_id(6), ADMITTED_PIN, "a:b:c", "--pins-json", "-", stdin=stdin)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith(f"error     UPPER:{hex_id(6)}: INVALID_ARGUMENT: invalid package name 'UPPER'")
    assert lines[1] == f"admitted  {ADMITTED_PIN}"
    assert lines[2].startswith("error     a:b:c: INVALID_ARGUMENT: invalid pin 'a:b:c'")
    assert lines[3].startswith(
        "error     ok/json:not-an-id: INVALID_ARGUMENT: invalid instance ID 'not-an-id'"
    )
    assert lines[4] == f"admitted  ok/b:{hex_id(5)}"


def test_only_invalid_pins_still_report_without_a_plugin_run() -> None:
    result = run_cli("check", "--plugin", '["/nonexistent/plugin"]', "--json", "bad")
    assert result.returncode == 3
    assert verdicts(result) == [("error", "INVALID_ARGUMENT")]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", "got a list"),
        ('{"pins": []}', "no 'result' key"),
        ('{"result": null, "error": "boom"}', "records a failed cipd run, not pins: boom"),
        ('{"result": [1]}', "'result' must map subdirectories to lists, got a list"),
        ('{"result": {"sub": {}}}', "result['sub'] must be a list, got an object"),
        ('{"result": {"": ["x:y"]}}', "result[''][0] must be an object, got a string"),
        ('{"result": {"": [{"package": "ok/a"}]}}', "'instance_id' must be a string, got missing"),
        (
            '{"result": {"": [{"package": 1, "instance_id": "x"}]}}',
            "'package' must be a string, got a number",
        ),
    ],
)
def test_malformed_pins_file_is_a_usage_error(tmp_path: Path, content: str, expected: str) -> None:
    pins_file = tmp_path / "pins.json"
    pins_file.write_text(content, encoding="utf-8")
    result = check_main("admit", ADMITTED_PIN, "--pins-json", str(pins_file))
    assert result.returncode == 2
    assert f"pins file '{pins_file}'" in result.stderr
    assert expected in result.stderr
    assert result.stdout == ""


def test_missing_pins_file_is_a_usage_error(tmp_path: Path) -> None:
    result = check_main("admit", "--pins-json", str(tmp_path / "absent.json"))
    assert result.returncode == 2
    assert "cannot read pins file" in result.stderr
    assert "No such file or directory" in result.stderr


def test_no_pins_is_a_usage_error() -> None:
    result = check_main("admit")
    assert result.returncode == 2
    assert "no pins to check" in result.stderr


@pytest.mark.parametrize("content", ['{"result": {}}', '{"result": {"": []}}'])
def test_a_pins_file_with_nothing_to_deploy_exits_0(content: str) -> None:
    text = check("admit", "--pins-json", "-", stdin=content)
    assert (text.returncode, text.stdout) == (0, ""), text.stderr
    as_json = check("admit", "--json", "--pins-json", "-", stdin=content)
    assert as_json.returncode == 0, as_json.stderr
    assert report(as_json) == {"pins": [], "totals": {"admitted": 0, "denied": 0, "error": 0}}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--timeout", "0"], "must be a positive number of seconds"),
        (["--timeout", "soon"], "not a number of seconds"),
        (["--service-url", ""], "--service-url must not be empty"),
        (["--pins-json", "-", "--pins-json", "-"], "may be given only once"),
        (["-v", "-q"], "not allowed with argument"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], expected: str) -> None:
    result = check_main("admit", *args, ADMITTED_PIN)
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stdout == ""


# -- Metadata ------------------------------------------------------------------


def test_metadata_file_is_served_to_the_plugin(tmp_path: Path) -> None:
    metadata = tmp_path / "metadata.json"
    allowed = {"package": "ok/tool", "instance_id": hex_id(1), "metadata": [{"key": "allow", "value": "yes"}]}
    metadata.write_text(json.dumps({"instances": [allowed]}), encoding="utf-8")
    result = check("metadata", "--metadata", str(metadata), ADMITTED_PIN, f"ok/tool:{hex_id(9)}")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"admitted  {ADMITTED_PIN}",
        f"denied    ok/tool:{hex_id(9)}: no 'allow' metadata",
    ]


def test_without_metadata_file_an_unreachable_backend_fails_the_check() -> None:
    # Port 9 on loopback: nothing listens, and nothing leaves the machine.
    result = check(
        "metadata", "--json", "--timeout", "4", ADMITTED_PIN, env={"CIPD_SERVICE_URL": "http://127.0.0.1:9"}
    )
    assert result.returncode == 3
    assert verdicts(result) == [("error", "UNAVAILABLE")]
    assert "cannot reach http://127.0.0.1:9" in report(result)["pins"][0]["message"]


def test_malformed_metadata_file_is_a_usage_error(tmp_path: Path) -> None:
    metadata = tmp_path / "metadata.json"
    metadata.write_text('{"instances": {}}', encoding="utf-8")
    result = check_main("metadata", "--metadata", str(metadata), ADMITTED_PIN)
    assert result.returncode == 2
    assert "expected an object with an 'instances' list" in result.stderr
    assert result.stdout == ""


# -- Logs, progress and help ---------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "shown", "hidden"),
    [
        ([], ["a warning line", "an error line"], ["an info line", "a debug line"]),
        (["-v"], ["an info line", "a warning line"], ["a debug line"]),
        (["-vv"], ["a debug line", "an info line"], []),
        (["-q"], [], ["an error line", "a warning line"]),
    ],
)
def test_verbosity_controls_plugin_logs_on_stderr_only(
    flags: list[str], shown: list[str], hidden: list[str]
) -> None:
    result = check("log", *flags, ADMITTED_PIN)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"admitted  {ADMITTED_PIN}\n"
    for text in shown:
        assert text in result.stderr
    for text in hidden:
        assert text not in result.stderr


def test_verbose_says_it_waits_for_the_plugin_to_connect() -> None:
    quiet = check("admit", ADMITTED_PIN)
    verbose = check("admit", "-v", ADMITTED_PIN)
    assert (quiet.returncode, verbose.returncode) == (0, 0)
    assert "waiting for the plugin to connect" in verbose.stderr
    assert "waiting for the plugin to connect" not in quiet.stderr
    assert verbose.stdout == quiet.stdout == f"admitted  {ADMITTED_PIN}\n"


def test_help_documents_the_exit_codes_and_options() -> None:
    result = run_cli("check", "--help")
    assert result.returncode == 0
    assert "--connect-timeout SECONDS" in result.stdout
    assert "3  some check failed" in result.stdout
    assert "2  usage or configuration error" in result.stdout


def _read_terminal(master: int) -> str:
    chunks = []
    while select.select([master], [], [], 5)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_progress_is_shown_on_a_terminal_for_long_runs() -> None:
    pins = [f"ok/tool{n}:{hex_id(n)}" for n in range(25)]
    master, terminal = os.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "cipdplugin", "check", "--plugin", json.dumps(plugin_cmd("admit")), *pins],
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
        )
        os.close(terminal)
        terminal = -1
        progress = _read_terminal(master)
    finally:
        os.close(master)
        if terminal >= 0:
            os.close(terminal)
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 25
    assert "checked 25/25" in progress


def test_no_progress_when_stderr_is_not_a_terminal() -> None:
    pins = [f"ok/tool{n}:{hex_id(n)}" for n in range(25)]
    result = check("admit", *pins)
    assert result.returncode == 0
    assert result.stderr == ""


def test_help_explains_usage_with_an_example() -> None:
    result = run_cli("check", "--help")
    assert result.returncode == 0
    for text in ("example:", "exit status:", PLUGIN_ENV, "--pins-json", '"totals"', "cipd ensure"):
        assert text in result.stdout


def test_no_subcommand_prints_help_and_exits_2() -> None:
    result = run_main()
    assert result.returncode == 2
    assert "usage: cipdplugin" in result.stderr
    assert "check" in result.stderr
    assert result.stdout == ""


def test_allowlist_example_plugin() -> None:
    examples = REPO_ROOT / "examples"
    if not all((examples / name).exists() for name in ("allowlist_plugin.py", "metadata.json", "pins.txt")):
        pytest.skip("the allowlist example is not there")
    pins = [
        line
        for line in (REPO_ROOT / "examples" / "pins.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    result = run_cli(
        "check",
        "--json",
        "--plugin",
        json.dumps([sys.executable, str(ALLOWLIST_PLUGIN)]),
        "--metadata",
        str(REPO_ROOT / "examples" / "metadata.json"),
        *pins,
    )
    assert result.returncode == 1, result.stderr
    by_package = {entry["package"]: entry["verdict"] for entry in report(result)["pins"]}
    assert by_package["infra/tools/deployer/linux-amd64"] == "admitted"
    assert by_package["experimental/shiny-tool"] == "denied"


DEEP_JSON = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (["--plugin", DEEP_JSON, ADMITTED_PIN], "", "--plugin is nested too deeply"),
        # Parses, but its item is too deep for repr().
        (
            ["--plugin", "[" * 980 + "]" * 980, ADMITTED_PIN],
            "",
            "--plugin: item 0 must be a string, got a list",
        ),
        (["--pins-json", "-"], DEEP_JSON, "pins from standard input is nested too deeply"),
        (
            ["--pins-json", "-"],
            '{"result": ' + DEEP_JSON + "}",
            "pins from standard input is nested too deeply",
        ),
        (["--metadata", "DEEP_FILE", ADMITTED_PIN], "", "is nested too deeply to be a metadata file"),
        (["--timeout", "1e300", ADMITTED_PIN], "", "must be at most 3.1536e+07 seconds"),
        (["--timeout", "1e10", ADMITTED_PIN], "", "must be at most"),
        (["--timeout", "nan", ADMITTED_PIN], "", "must be a positive number of seconds"),
    ],
)
def test_hostile_inputs_are_usage_errors(tmp_path: Path, args: list[str], stdin: str, expected: str) -> None:
    # In a subprocess: how deep JSON may nest depends on the stack already in use.
    deep_file = tmp_path / "deep.json"
    deep_file.write_text(DEEP_JSON)
    args = [str(deep_file) if arg == "DEEP_FILE" else arg for arg in args]
    plugin = [] if args[0] == "--plugin" else ["--plugin", json.dumps(plugin_cmd("admit"))]
    result = run_cli("check", *plugin, *args, stdin=stdin)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cipdplugin")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]
    assert len(errors[0]) < 500
    assert result.stdout == ""


def test_deeply_nested_environment_variable_is_a_usage_error() -> None:
    result = run_main("check", ADMITTED_PIN, env={PLUGIN_ENV: DEEP_JSON})
    assert result.returncode == 2
    assert f"${PLUGIN_ENV} is nested too deeply" in result.stderr
    assert "Traceback" not in result.stderr


# -- Signals -------------------------------------------------------------------


def _stubborn_family(cli_pid: int) -> set[int]:
    """The CLI's descendants that ignore SIGTERM (the plugin and its children), once running."""
    found = set()
    for process in psutil.Process(cli_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError), open(f"/proc/{process.pid}/status") as status:
            for line in status:
                if line.startswith("SigIgn:") and int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
                    found.add(process.pid)
    return found


def _read_stderr_until(stream: IO[bytes], text: str, timeout: float = 30.0) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(0.0, remaining))
        chunk = os.read(stream.fileno(), 4096) if ready else b""
        if not chunk:
            break
        seen += chunk
    return seen.decode(errors="replace")


@pytest.mark.parametrize(
    ("first", "second", "status"), [("SIGINT", "SIGINT", 130), ("SIGTERM", "SIGINT", 143)]
)
def test_second_signal_does_not_abort_stopping_the_plugin(first: str, second: str, status: int) -> None:
    """The plugin ignores stdin EOF and SIGTERM, so closing takes the full 5 s."""
    environment = {name: value for name, value in os.environ.items() if name != PLUGIN_ENV}
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cipdplugin",
            "check",
            "--plugin",
            json.dumps(plugin_cmd("hold", "1")),
            ADMITTED_PIN,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment,
        cwd=REPO_ROOT,
    )
    try:
        assert cli.stderr is not None
        # The plugin, its child and its grandchild.
        assert wait_until(lambda: len(_stubborn_family(cli.pid)) == 3, 30)
        family = _stubborn_family(cli.pid)
        cli.send_signal(getattr(signal, first))
        output = _read_stderr_until(cli.stderr, "stopping the plugin")
        assert "stopping the plugin" in output
        for _ in range(3):
            cli.send_signal(getattr(signal, second))
        assert cli.wait(30) == status
        output += cli.stderr.read().decode(errors="replace")
    finally:
        cli.kill()
        cli.wait(10)
        if cli.stderr is not None:
            cli.stderr.close()
    assert "still stopping the plugin" in output
    assert "Traceback" not in output
    assert wait_until(lambda: not any(_running(pid) for pid in family), 10), [
        p for p in family if _running(p)
    ]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- Deadlines, several plugins, the audit log, warn-only ------------------------


def plugin_option(mode: str, *args: str) -> str:
    return json.dumps(plugin_cmd(mode, *args))


def test_check_timeout_fails_the_pin_a_plugin_never_answers() -> None:
    stuck = f"stuck/tool:{hex_id(9)}"
    result = run_cli(
        "check",
        "--plugin",
        plugin_option("silent", "stuck"),
        "--check-timeout",
        "0.5",
        "--json",
        stuck,
        ADMITTED_PIN,
        DENIED_PIN,
    )
    assert result.returncode == EXIT_CHECK_FAILED, result.stderr
    assert verdicts(result) == [
        ("error", "DEADLINE_EXCEEDED"),
        ("admitted", "OK"),
        ("denied", "FAILED_PRECONDITION"),
    ]
    assert "0.5 s check timeout" in report(result)["pins"][0]["message"]


def test_three_plugins_with_overlapping_scopes() -> None:
    pins = [
        f"{package}:{hex_id(n)}"
        for n, package in enumerate(["infra/a", "infra/tools/b", "infra/toolsx", "top/c"])
    ]
    result = run_cli(
        "check",
        "--json",
        "--plugin",
        plugin_option("deny-prefix", "infra/a"),
        "--plugin-scope",
        "infra",
        "--plugin",
        plugin_option("deny-prefix", "infra/tools,infra/toolsx"),
        "--plugin-scope",
        "infra/tools",
        "--plugin",
        plugin_option("deny-prefix", "top"),
        *pins,
    )
    assert result.returncode == 1, result.stderr
    entries = report(result)["pins"]
    assert [entry["verdict"] for entry in entries] == ["denied", "denied", "admitted", "denied"]
    # infra/toolsx is outside the second plugin's scope, although it would deny it.
    assert entries[1]["message"] == "plugin 'admission_plugin.py': infra/tools/b is under infra/tools"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--plugin-scope", "infra"], "--plugin-scope must follow the --plugin"),
        (["--plugin", '["x"]', "--plugin-scope", "a", "--plugin-scope", "b"], "given twice"),
        (["--plugin", '["x"]', "--plugin-scope", "Infra"], "invalid scope prefix 'Infra'"),
        (["--plugin", '["x"]', "--plugin-scope", ","], "at least one package prefix"),
        (["--plugin", '["x"]', "--plugin", "[1]"], "--plugin #2: item 0 must be a string"),
        (["--plugin", '["x"]', "--check-timeout", "0"], "must be a positive number of seconds"),
        (["--plugin", '["x"]', "--check-timeout", "inf"], "must be a positive number of seconds"),
        (["--plugin", '["x"]', "--audit-log", "/nonexistent/dir/audit.jsonl"], "cannot open the audit log"),
    ],
)
def test_bad_pipeline_options_are_usage_errors(args: list[str], expected: str) -> None:
    result = run_main("check", *args, ADMITTED_PIN)
    assert result.returncode == EXIT_ERROR
    assert expected in result.stderr
    assert result.stdout == ""


def test_audit_log_records_every_check(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    result = check("admit", "--audit-log", str(path), ADMITTED_PIN, DENIED_PIN, ERROR_PIN, ADMITTED_PIN)
    assert result.returncode == EXIT_CHECK_FAILED, result.stderr
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted((r["pin"], r["verdict"], r["enforced"]) for r in records) == sorted(
        [(ADMITTED_PIN, "admitted", True), (DENIED_PIN, "denied", True), (ERROR_PIN, "error", True)]
    )
    assert {r["plugin_version"] for r in records} == {"test-plugin 1.0"}
    # A second run appends.
    check("admit", "--audit-log", str(path), "--warn-only", DENIED_PIN)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 4
    assert (records[-1]["verdict"], records[-1]["enforced"]) == ("denied", False)


def test_warn_only_exit_statuses() -> None:
    only_denied = check("admit", "--warn-only", DENIED_PIN, ADMITTED_PIN)
    assert only_denied.returncode == 0, only_denied.stderr
    assert only_denied.stdout.splitlines() == [
        f"warned    {DENIED_PIN}: deny/tool is denied",
        f"admitted  {ADMITTED_PIN}",
    ]
    as_json = check("admit", "--warn-only", "--json", DENIED_PIN, ADMITTED_PIN)
    assert as_json.returncode == 0
    assert verdicts(as_json) == [("warned", "FAILED_PRECONDITION"), ("admitted", "OK")]
    assert report(as_json)["totals"] == {"admitted": 1, "denied": 0, "warned": 1, "error": 0}
    # A failed check still fails the run, with the status it has without --warn-only.
    failed = check("admit", "--warn-only", DENIED_PIN, ERROR_PIN)
    enforced = check("admit", DENIED_PIN, ERROR_PIN)
    assert failed.returncode == enforced.returncode == EXIT_CHECK_FAILED
    assert failed.stdout.splitlines()[0].startswith("warned ")
    assert check("admit", "--warn-only", "Bad:pin").returncode == enforced.returncode


# -- Exit statuses mean what they say (issue: nothing misleads) ------------------


def test_an_empty_executable_in_the_environment_variable_is_a_usage_error() -> None:
    result = run_cli("check", ADMITTED_PIN, env={PLUGIN_ENV: '[""]'})
    assert result.returncode == EXIT_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    assert f"${PLUGIN_ENV}: the executable (item 0) must not be empty" in result.stderr


def test_a_package_that_is_not_unicode_is_a_failed_check_in_both_modes() -> None:
    pins = json.dumps({"result": {"": [{"package": "a\ud800b", "instance_id": hex_id(1)}]}})
    assert "\\ud800" in pins  # the file holds the escape; json.loads makes a lone surrogate of it
    text = check("admit", "--pins-json", "-", ADMITTED_PIN, stdin=pins)
    assert text.returncode == EXIT_CHECK_FAILED, text.stderr
    assert "Traceback" not in text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("admitted")
    assert lines[1].startswith("error     a\\ud800b:") and "INVALID_ARGUMENT" in lines[1]
    as_json = check("admit", "--json", "--pins-json", "-", ADMITTED_PIN, stdin=pins)
    assert as_json.returncode == EXIT_CHECK_FAILED, as_json.stderr
    assert report(as_json)["pins"][1]["package"] == "a\ud800b"


def test_an_internal_error_is_exit_4_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an unforeseen state")

    monkeypatch.setattr("cipdplugin.cli.check.check_pins", broken)
    result = check_main("admit", ADMITTED_PIN)
    assert result.returncode == EXIT_INTERNAL
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "internal error" in result.stderr and "please report it" in result.stderr
    assert "RuntimeError: an unforeseen state" in result.stderr
    verbose = check_main("admit", "-vv", ADMITTED_PIN)
    assert verbose.returncode == EXIT_INTERNAL
    assert "Traceback (most recent call last)" in verbose.stderr


def test_help_documents_exit_status_4() -> None:
    result = run_main("check", "--help")
    assert result.returncode == 0
    assert "4  internal error" in result.stdout


def test_an_unknown_option_shows_the_usage_of_check() -> None:
    result = run_main("check", "--bogus", ADMITTED_PIN)
    assert result.returncode == EXIT_ERROR
    assert result.stderr.startswith("usage: cipdplugin check ")
    assert "unrecognized arguments: --bogus" in result.stderr
    top = run_main("--bogus", "check", ADMITTED_PIN)
    assert top.returncode == EXIT_ERROR
    assert "unrecognized arguments: --bogus" in top.stderr


def _check_into_a_closed_pipe(*args: str) -> tuple[int, str]:
    """Run ``check`` whose stdout reader has gone before the report is written."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CIPD_")}
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read the report
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "cipdplugin", "check", "--plugin", json.dumps(plugin_cmd("admit")), *args],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            env={**environment, "CIPD_CONFIG_FILE": "-"},
            cwd=REPO_ROOT,
        )
    finally:
        os.close(write_end)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr.decode()


@pytest.mark.parametrize(
    ("pins", "status"),
    [([ADMITTED_PIN], 0), ([ADMITTED_PIN, DENIED_PIN], 1), ([DENIED_PIN, ERROR_PIN], 3)],
    ids=["admitted", "denied", "failed"],
)
def test_a_broken_pipe_ends_quietly_with_the_status_of_the_verdicts(pins: list[str], status: int) -> None:
    for mode in ([], ["--json"]):
        returncode, stderr = _check_into_a_closed_pipe(*mode, *pins)
        assert returncode == status, stderr
        assert stderr == ""


def test_piped_into_head_the_status_is_still_the_verdicts(tmp_path: Path) -> None:
    # Far more than a pipe holds, so the writer is still writing when head leaves.
    pins = [f"ok/tool-{n}:{hex_id(n)}" for n in range(3000)] + [DENIED_PIN]
    pins_file = tmp_path / "pins.json"
    pins_file.write_text(ensure_output({"": pins}), encoding="utf-8")
    command = shlex.join(
        [
            *[sys.executable, "-m", "cipdplugin", "check"],
            *["--plugin", json.dumps(plugin_cmd("admit")), "--pins-json", str(pins_file)],
        ]
    )
    stderr_file = tmp_path / "stderr.txt"
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CIPD_")}
    done = subprocess.run(
        ["bash", "-c", f"{command} 2>{shlex.quote(str(stderr_file))} | head -1; echo ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**environment, "CIPD_CONFIG_FILE": "-"},
        cwd=REPO_ROOT,
    )
    first, status = done.stdout.splitlines()
    stderr = stderr_file.read_text()
    assert first.startswith("admitted  ok/tool-0:")
    assert int(status) == 1, stderr
    assert stderr == ""


# -- Plugin text cannot forge lines or drive the terminal -------------------------

FORGED = "fine\ncipdplugin: ERROR: Plugin 'policy': forged\r\x1b[2K\x1b]0;owned\x07\x9b1Aadmitted  x\u2028y"


def test_plugin_text_is_escaped_in_the_report_and_the_logs() -> None:
    command = json.dumps(plugin_cmd("say", json.dumps(FORGED)))
    result = run_cli("check", "--plugin", command, DENIED_PIN)
    assert result.returncode == 1, result.stderr
    # The report: one line, nothing a terminal acts on, the text still readable.
    assert result.stdout.count("\n") == 1
    assert result.stdout == (
        f"denied    {DENIED_PIN}: fine\\ncipdplugin: ERROR: Plugin 'policy': forged\\r\\x1b[2K"
        "\\x1b]0;owned\\x07\\x9b1Aadmitted  x\\u2028y\n"
    )
    # The logs: the Log record and the stderr lines, with nothing raw in them.
    for control in ("\r", "\x1b", "\x07", "\x9b", "\u2028"):
        assert control not in result.stderr
    lines = result.stderr.splitlines()
    assert not any(line.startswith("cipdplugin: ERROR: Plugin 'policy'") for line in lines), lines
    logged = [line for line in lines if line.startswith("cipdplugin: ERROR: Plugin 'admission_plugin.py': ")]
    assert logged and logged[0].endswith(
        "fine\\ncipdplugin: ERROR: Plugin 'policy': forged\\r\\x1b[2K"
        "\\x1b]0;owned\\x07\\x9b1Aadmitted  x\\u2028y"
    )


def test_the_json_report_keeps_the_exact_text() -> None:
    command = json.dumps(plugin_cmd("say", json.dumps(FORGED)))
    result = run_cli("check", "--json", "--plugin", command, DENIED_PIN)
    assert result.returncode == 1, result.stderr
    assert report(result)["pins"][0]["message"] == FORGED
