"""Text a plugin chooses (log messages, stderr lines, denial messages) reaches
logs and terminals escaped: it can neither forge a line nor drive a terminal."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from cipdplugin import AdmissionDenied, Host, Pin
from cipdplugin.text import printable
from tests.conftest import Records, hex_id, plugin_cmd

FORGED = "ok\ncipdplugin: ERROR: Plugin 'x': forged\r\x1b[2K\x1b]0;t\x07\x9b\x85\u2028\u2029\u202e\x7f\x00"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, é and \U0001f600", "plain text, é and \U0001f600"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("\x00\x07\x7f\x85\x9b", "\\x00\\x07\\x7f\\x85\\x9b"),
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("\u202eevil\u2066", "\\u202eevil\\u2066"),
        ("name-\udcff", "name-\\udcff"),
        ("a \\x1b b", "a \\x1b b"),  # backslashes stay: escaping twice changes nothing more
    ],
)
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(shown) == shown
    assert len(shown.splitlines()) <= 1


def test_host_logs_show_plugin_text_escaped(logged_host: Callable[..., Host], records: Records) -> None:
    host = logged_host()
    plugin = host.new_admission_plugin(plugin_cmd("say", json.dumps(FORGED)))
    error = plugin.check_admission(Pin("a/b", hex_id(1))).exception(timeout=60)
    # The caller gets the exact text.
    assert isinstance(error, AdmissionDenied) and error.message == FORGED
    assert records.wait_for("Plugin 'admission_plugin.py': ok\\ncipdplugin")
    assert records.wait_for("stderr: cipdplugin: ERROR: Plugin 'x': forged\\r\\x1b[2K")
    host.close()
    for _, message in records.messages():
        assert message == printable(message), message
        assert len(message.splitlines()) <= 1
