"""``load_client_options``: every rule of the Go client's LoadFromEnv, with
temporary files and an explicit environment."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

import cipdplugin
from cipdplugin import DEFAULT_SERVICE_URL, ClientOptions, ConfigError, load_client_options

PLUGIN_FILE = 'plugins { admission { cmd: "/opt/cipd/plugin" args: "--strict" args: "-v" } }\n'


@pytest.fixture
def default_file(tmp_path: Path) -> Path:
    """Where the tests put "/etc/chrome-infra/cipd.cfg" (not created)."""
    return tmp_path / "etc" / "cipd.cfg"


def load(environ: dict[str, str], default: Path | None = None, **kwargs: object) -> ClientOptions:
    where = str(default) if default is not None else "/nonexistent/cipd.cfg"
    return load_client_options(environ, default_config_file=where, **kwargs)  # type: ignore[arg-type]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error(environ: dict[str, str], default: Path | None = None, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load(environ, default, **kwargs)
    return str(caught.value)


# -- Defaults and the value type ---------------------------------------------------


def test_nothing_set_gives_the_defaults() -> None:
    assert load({}) == ClientOptions(DEFAULT_SERVICE_URL, (), None, None)
    assert DEFAULT_SERVICE_URL == "https://chrome-infra-packages.appspot.com"


def test_none_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIPD_SERVICE_URL", "http://127.0.0.1:8080/")
    monkeypatch.setenv("CIPD_CONFIG_FILE", "-")
    monkeypatch.setenv("CIPD_ADMISSION_PLUGIN", '["/bin/p"]')
    monkeypatch.delenv("CIPD_PROXY_URL", raising=False)
    assert load_client_options() == ClientOptions("http://127.0.0.1:8080", ("/bin/p",), None, None)


def test_options_are_frozen_and_hold_a_tuple() -> None:
    options = ClientOptions("https://x", ["a", "b"])  # type: ignore[arg-type]
    assert options.admission_plugin == ("a", "b")
    assert hash(options) == hash(ClientOptions("https://x", ("a", "b")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.service_url = "https://y"  # type: ignore[misc]


def test_exported_at_top_level() -> None:
    for name in (
        "ClientOptions",
        "ConfigError",
        "load_client_options",
        "PrpcRepository",
        "LuciAuthTokenSource",
    ):
        assert name in cipdplugin.__all__
    assert issubclass(ConfigError, ValueError)


# -- CIPD_ADMISSION_PLUGIN -------------------------------------------------------------


def test_plugin_from_the_environment() -> None:
    assert load({"CIPD_ADMISSION_PLUGIN": '["/bin/plugin", "-x", ""]'}).admission_plugin == (
        "/bin/plugin",
        "-x",
        "",
    )


@pytest.mark.parametrize("value", ["", "[]", "null", " [ ] "])
def test_empty_plugin_values_count_as_unset(value: str, default_file: Path) -> None:
    write(default_file, PLUGIN_FILE)
    options = load({"CIPD_ADMISSION_PLUGIN": value}, default_file)
    assert options.admission_plugin == ("/opt/cipd/plugin", "--strict", "-v")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[oops", "$CIPD_ADMISSION_PLUGIN is not valid JSON"),
        ("/bin/plugin", "$CIPD_ADMISSION_PLUGIN is not valid JSON"),
        ('["a"] x', "$CIPD_ADMISSION_PLUGIN is not valid JSON"),
        ('{"cmd": "a"}', "$CIPD_ADMISSION_PLUGIN must be a JSON list of strings, got an object"),
        ('"/bin/plugin"', "$CIPD_ADMISSION_PLUGIN must be a JSON list of strings, got a string"),
        ("3", "$CIPD_ADMISSION_PLUGIN must be a JSON list of strings, got a number"),
        ('["/bin/plugin", 3]', "$CIPD_ADMISSION_PLUGIN: item 1 must be a string, got a number 3"),
        ("[null]", "$CIPD_ADMISSION_PLUGIN: item 0 must be a string"),
        ('["\\ud800"]', "$CIPD_ADMISSION_PLUGIN: item 0 is not valid Unicode text"),
        ("[" * 50_000 + "]" * 50_000, "$CIPD_ADMISSION_PLUGIN is nested too deeply"),
        ("[" * 400 + "]" * 400, "$CIPD_ADMISSION_PLUGIN: item 0 must be a string, got a list [[[["),
    ],
)
def test_invalid_plugin_variable(value: str, expected: str) -> None:
    assert expected in error({"CIPD_ADMISSION_PLUGIN": value})


def test_explicit_plugin_wins_over_environment_and_file(default_file: Path) -> None:
    write(default_file, PLUGIN_FILE)
    environ = {"CIPD_ADMISSION_PLUGIN": '["/from/env"]'}
    assert load(environ, default_file, admission_plugin=["/explicit", "a"]).admission_plugin == (
        "/explicit",
        "a",
    )
    # An empty command counts as not given, as in the Go client.
    assert load(environ, default_file, admission_plugin=[]).admission_plugin == ("/from/env",)


def test_explicit_plugin_must_be_strings() -> None:
    assert "admission_plugin must be a list of strings" in error({}, admission_plugin="/bin/plugin")
    assert "admission_plugin: item 1 must be a string" in error({}, admission_plugin=["/bin/p", 1])


# -- CIPD_SERVICE_URL ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "normalised"),
    [
        ("", DEFAULT_SERVICE_URL),
        ("https://cipd.example.com", "https://cipd.example.com"),
        ("https://cipd.example.com/", "https://cipd.example.com"),
        ("HTTP://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://user:secret@cipd.example.com:8443/?q=1#top", "https://cipd.example.com:8443"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
    ],
)
def test_service_url_is_normalised(value: str, normalised: str) -> None:
    assert load({"CIPD_SERVICE_URL": value}).service_url == normalised


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://cipd.example.com/prpc", "expecting a root URL"),
        ("https://cipd.example.com//", "expecting a root URL"),
        ("ftp://cipd.example.com", "expecting an http:// or https:// URL"),
        ("unix:///tmp/cipd.sock", "expecting an http:// or https:// URL"),
        ("cipd.example.com", "expecting an http:// or https:// URL"),
        ("https://", "no host"),
        ("https://cipd.example.com:port", "invalid host or port"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("https://cipd example.com", "spaces or control characters"),
    ],
)
def test_invalid_service_url(value: str, expected: str) -> None:
    message = error({"CIPD_SERVICE_URL": value})
    assert "CIPD_SERVICE_URL" in message and expected in message


def test_explicit_service_url_wins_and_is_checked() -> None:
    environ = {"CIPD_SERVICE_URL": "https://from-env.example.com"}
    assert load(environ, service_url="http://127.0.0.1:1/").service_url == "http://127.0.0.1:1"
    message = error(environ, service_url="https://x.example.com/path")
    assert "service_url" in message and "expecting a root URL" in message


# -- CIPD_PROXY_URL ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["unix:///run/cipd/proxy.sock", "unix:/run/cipd/proxy.sock"])
def test_proxy_url_is_kept(value: str) -> None:
    assert load({"CIPD_PROXY_URL": value}).proxy_url == value


def test_empty_proxy_url_is_none() -> None:
    assert load({"CIPD_PROXY_URL": ""}).proxy_url is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://127.0.0.1:8080", "only unix:///absolute/path/to/socket is supported"),
        ("/run/cipd/proxy.sock", "only unix:///absolute/path/to/socket is supported"),
        ("unix://run/cipd/proxy.sock", "expecting unix:///absolute/path/to/socket"),
        ("unix://", "expecting unix:///absolute/path/to/socket"),
        ("unix:proxy.sock", "the socket path must be absolute"),
    ],
)
def test_invalid_proxy_url(value: str, expected: str) -> None:
    message = error({"CIPD_PROXY_URL": value})
    assert "CIPD_PROXY_URL" in message and expected in message


# -- CIPD_CONFIG_FILE and the file --------------------------------------------------------


def test_dash_reads_no_file(default_file: Path) -> None:
    write(default_file, "this does not parse {")
    assert load({"CIPD_CONFIG_FILE": "-"}, default_file) == ClientOptions(DEFAULT_SERVICE_URL)


def test_named_file_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "cipd.cfg", PLUGIN_FILE)
    options = load({"CIPD_CONFIG_FILE": str(path)})
    assert options.admission_plugin == ("/opt/cipd/plugin", "--strict", "-v")
    assert options.config_file == str(path)


def test_named_file_path_is_cleaned(tmp_path: Path) -> None:
    path = write(tmp_path / "cipd.cfg", PLUGIN_FILE)
    options = load({"CIPD_CONFIG_FILE": f"{tmp_path}/sub/../cipd.cfg"})
    assert options.config_file == str(path)


def test_named_file_must_be_absolute(tmp_path: Path) -> None:
    message = error({"CIPD_CONFIG_FILE": "cipd.cfg"})
    assert "CIPD_CONFIG_FILE" in message and "must be an absolute path" in message


def test_named_file_must_exist(tmp_path: Path) -> None:
    message = error({"CIPD_CONFIG_FILE": str(tmp_path / "missing.cfg")})
    assert "CIPD_CONFIG_FILE" in message and "missing.cfg" in message and "does not exist" in message


def test_named_file_must_be_a_file(tmp_path: Path) -> None:
    assert f"cannot read CIPD config file '{tmp_path}'" in error({"CIPD_CONFIG_FILE": str(tmp_path)})


def test_missing_default_file_is_fine(default_file: Path) -> None:
    for environ in ({}, {"CIPD_CONFIG_FILE": ""}):
        assert load(environ, default_file) == ClientOptions(DEFAULT_SERVICE_URL, (), None, None)


def test_default_file_is_read(default_file: Path) -> None:
    write(default_file, PLUGIN_FILE)
    assert load({}, default_file) == ClientOptions(
        DEFAULT_SERVICE_URL, ("/opt/cipd/plugin", "--strict", "-v"), None, str(default_file)
    )


def test_default_file_that_does_not_parse_is_an_error(default_file: Path) -> None:
    write(default_file, "plugins {\n  admission { cmd: 3 }\n}\n")
    message = error({}, default_file)
    assert f"{default_file}:2:" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_default_file_is_an_error(default_file: Path) -> None:
    write(default_file, PLUGIN_FILE).chmod(0)
    message = error({}, default_file)
    assert str(default_file) in message and "Permission denied" in message


def test_default_path_that_is_a_directory_is_an_error(default_file: Path) -> None:
    default_file.mkdir(parents=True)
    assert "is a directory, not a regular file" in error({}, default_file)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("plugins {", 1),
        ("plugins { admission { cmd: 3 } }", 1),
        ("plugins {}\nplugins {}\n", 2),
        ('plugins { admission { cmd: "a" cmd: "b" } }', 1),
        # Positions stay right after an ignored extension.
        ("# comment\n[ext.thing]: 1\n\nplugins { admission { cmd: 7 } }", 4),
    ],
)
def test_parse_errors_name_the_file_and_position(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path / "cipd.cfg", text)
    message = error({"CIPD_CONFIG_FILE": str(path)})
    assert re.match(f"cannot parse CIPD config file {re.escape(str(path))}:{line}:[0-9]+: \\S", message), (
        message
    )


def test_not_utf8_is_a_parse_error(tmp_path: Path) -> None:
    path = tmp_path / "cipd.cfg"
    path.write_bytes(b'plugins {\n admission { cmd: "\xff" } }')
    assert f"{path}:2:20: not UTF-8 text" in error({"CIPD_CONFIG_FILE": str(path)})


def test_the_file_plugin_only_when_the_environment_names_none(tmp_path: Path) -> None:
    path = write(tmp_path / "cipd.cfg", PLUGIN_FILE)
    options = load({"CIPD_CONFIG_FILE": str(path), "CIPD_ADMISSION_PLUGIN": '["/from/env"]'})
    assert options.admission_plugin == ("/from/env",)
    assert options.config_file == str(path)


def test_the_file_must_parse_even_when_the_environment_names_a_plugin(tmp_path: Path) -> None:
    path = write(tmp_path / "cipd.cfg", "plugins {")
    assert "cannot parse" in error({"CIPD_CONFIG_FILE": str(path), "CIPD_ADMISSION_PLUGIN": '["/p"]'})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "plugins {}",
        "plugins { admission {} }",
        'plugins { admission { args: "-v" } }',
    ],
)
def test_empty_cmd_means_no_plugin(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "cipd.cfg", text)
    options = load({"CIPD_CONFIG_FILE": str(path)})
    assert options.admission_plugin == ()
    assert options.config_file == str(path)


@pytest.mark.parametrize(
    "text",
    [
        # Fields a newer client may know.
        'version: 2\nplugins { admission { cmd: "/p" timeout: "5s" env { key: "A" value: "b" } } }\n'
        'mirrors: ["x"]',
        # Extensions and Any-style names.
        "[cipd.future.ext]: 1\n"
        'plugins { [x.y] { a: 1 } admission { cmd: "/p" [type.googleapis.com/a.B] { c: "}" } } }',
        # Field numbers, separators, other quoting.
        "1 { 1 { 1: '/p'; 99: 3, } }",
        # Unknown field numbers and nested lists of messages.
        'plugins { 7: "x" admission { cmd: "/p" 5 { z: [1, -2.5, inf] } } } other: [{a: 1}, {b: "2"}]',
        # Lists of messages without the colon, and inside an unknown message.
        'extra [{a: 1}] plugins { admission { cmd: "/p" } } 9 { deep: [<b: 2>] }',
    ],
)
def test_unknown_fields_and_extensions_are_ignored(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "cipd.cfg", text)
    assert load({"CIPD_CONFIG_FILE": str(path)}).admission_plugin == ("/p",)


def test_all_together(tmp_path: Path) -> None:
    path = write(tmp_path / "cipd.cfg", PLUGIN_FILE)
    options = load(
        {
            "CIPD_CONFIG_FILE": str(path),
            "CIPD_SERVICE_URL": "http://127.0.0.1:8000/",
            "CIPD_PROXY_URL": "unix:///run/proxy.sock",
        }
    )
    assert options == ClientOptions(
        "http://127.0.0.1:8000", ("/opt/cipd/plugin", "--strict", "-v"), "unix:///run/proxy.sock", str(path)
    )
