"""Bad handshakes on the plugin side: a clear message and exit code 2, never a traceback.

The parser is fuzzed with hypothesis; whole plugins built with the SDK are
run with invalid standard input.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cipdplugin.plugins import MAX_HANDSHAKE_BYTES, Handshake, HandshakeError, parse_handshake
from tests.conftest import plugin_cmd

#: JSON values of every type, for the fields of a handshake object.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)
port_values = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=0, max_value=70000).map(str)
    | st.text(max_size=8)
    | json_values
)
ticket_values = st.text(max_size=100) | json_values


def check_parse(line: bytes | str) -> None:
    """The parser's contract: a valid Handshake, or HandshakeError; nothing else."""
    try:
        handshake = parse_handshake(line)
    except HandshakeError as exc:
        assert str(exc)
        return
    assert isinstance(handshake, Handshake)
    assert type(handshake.port) is int
    assert 0 < handshake.port < 65536
    assert isinstance(handshake.ticket, str)
    assert handshake.ticket
    # Anything else, gRPC would refuse as a metadata value at the first call.
    assert all(" " <= char <= "~" for char in handshake.ticket)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
@example(b"")
@example(b"\xff\xfe{")
@example(b"[" * 60_000)
@example(b'{"port": 1, "ticket": "t"' + b"}" * 3)
def test_parse_handshake_arbitrary_bytes(line: bytes) -> None:
    check_parse(line)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
@example("NaN")
@example('{"port": NaN, "ticket": "t"}')
@example('{"port": Infinity, "ticket": "t"}')
def test_parse_handshake_arbitrary_text(line: str) -> None:
    check_parse(line)


@settings(max_examples=600, deadline=None)
@given(
    st.fixed_dictionaries({}, optional={"port": port_values, "ticket": ticket_values})
    | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    st.booleans(),
)
@example({"port": "²", "ticket": "t"}, False)
@example({"port": "9" * 5000, "ticket": "t"}, False)
@example({"port": True, "ticket": "t"}, True)
@example({"port": 1.0, "ticket": "t"}, False)
@example({"port": 65536, "ticket": "t"}, False)
@example({"port": "443", "ticket": "t"}, True)
def test_parse_handshake_json_objects(data: dict[str, Any], spaced: bool) -> None:
    # The Go host writes protojson, which may put spaces after separators.
    separators = (", ", ": ") if spaced else (",", ":")
    line = json.dumps(data, separators=separators, allow_nan=True)
    check_parse(line)
    check_parse(line.encode("utf-8"))


def test_parse_handshake_accepts_both_spellings() -> None:
    assert parse_handshake('{"port":443,"ticket":"abc"}') == Handshake(443, "abc")
    assert parse_handshake(b'{"port": "443", "ticket": "abc"}') == Handshake(443, "abc")
    assert parse_handshake('{"ticket":"abc","port":1,"extra":[1,2]}') == Handshake(1, "abc")


def run_plugin_with_stdin(data: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run the SDK test plugin with ``data`` as its whole standard input."""
    return subprocess.run(plugin_cmd("admit"), input=data, capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        pytest.param(b"hello there\n", "the handshake is not JSON", id="not-json"),
        pytest.param(b"", "stdin ended before the handshake line", id="empty"),
        pytest.param(
            b'{"port":1234,"ticket":"abc"}', "stdin ended before the handshake line", id="no-newline"
        ),
        pytest.param(b"[1, 2]\n", "must be a JSON object, got list", id="not-an-object"),
        pytest.param(b'{"port":"x","ticket":"abc"}\n', "no valid 'port'", id="port-string"),
        pytest.param(b'{"port":1234,"ticket":7}\n', "no valid 'ticket'", id="ticket-number"),
        pytest.param(b'{"port":1234,"ticket":""}\n', "no valid 'ticket'", id="ticket-empty"),
        pytest.param(b'{"port":1234,"ticket":"caf\\u00e9"}\n', "no valid 'ticket'", id="ticket-not-ascii"),
        pytest.param(b'{"port":1234,"ticket":"a\\nb"}\n', "no valid 'ticket'", id="ticket-control-char"),
        pytest.param(
            b'{"port":70000,"ticket":"abc"}\n', "no valid 'port' (1-65535): 70000", id="port-too-big"
        ),
        pytest.param(b'{"port":0,"ticket":"abc"}\n', "no valid 'port'", id="port-zero"),
        pytest.param(b'{"port":"\xc2\xb2","ticket":"abc"}\n', "no valid 'port'", id="port-superscript"),
        pytest.param(b"[" * 60_000 + b"\n", "the handshake is not JSON", id="deeply-nested"),
        pytest.param(
            b"x" * (MAX_HANDSHAKE_BYTES + 10),
            f"longer than {MAX_HANDSHAKE_BYTES} bytes",
            id="huge-line",
        ),
    ],
)
def test_plugin_rejects_bad_handshake(stdin: bytes, message: str) -> None:
    result = run_plugin_with_stdin(stdin)
    stderr = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == 2, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    # One line, naming the program, is all a user should need.
    assert stderr.strip().count("\n") == 0
    assert stderr.startswith("admission_plugin.py: ")
