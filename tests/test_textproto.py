"""Unknown fields and extensions are blanked out of text-format protos, positions kept."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from cipdplugin.protocol.config_pb2 import ClientConfig
from cipdplugin.textproto import blank_unknown, parse_discarding_unknown


@pytest.mark.parametrize(
    ("text", "remaining"),
    [
        ('version: 2 plugins { admission { cmd: "/p" } }', 'plugins { admission { cmd: "/p" } }'),
        ("[a.b]: 1, plugins { }", "plugins { }"),
        ('plugins { [x.y] < z: ">" > }', "plugins { }"),
        ('plugins { 7 [ {a: 1}, {b: "}"} ] }', "plugins { }"),
        (
            'plugins { admission { cmd: "/p" env: "A" "B"; args: "x" } }',
            'plugins { admission { cmd: "/p" args: "x" } }',
        ),
        ("1 { 1 { 1: '/p' 9: -2.5e3 } }", "1 { 1 { 1: '/p' } }"),
        ("unknown {\n  deep { x: 1 }\n}\nplugins {}", "plugins {}"),
    ],
)
def test_unknown_parts_become_spaces(text: str, remaining: str) -> None:
    blanked = blank_unknown(text, ClientConfig())
    assert " ".join(blanked.split()) == remaining
    # Same length and lines: every kept token is where it was.
    assert len(blanked) == len(text)
    assert [i for i, c in enumerate(blanked) if c == "\n"] == [i for i, c in enumerate(text) if c == "\n"]


@pytest.mark.parametrize("text", ["plugins {", "plugins { admission { cmd: } }", "[a.b: 1", "} {"])
def test_text_it_cannot_follow_is_left_for_the_parser(text: str) -> None:
    assert blank_unknown(text, ClientConfig()) == text
    with pytest.raises(text_format.ParseError):
        parse_discarding_unknown(text, ClientConfig())


def test_known_fields_parse_around_unknown_ones() -> None:
    config = ClientConfig()
    parse_discarding_unknown(
        '# newer client\nmirror: [{url: "x"}]\n'
        'plugins { admission { cmd: "/p" args: ["a", "b"] timeout: 5 } }',
        config,
    )
    assert (config.plugins.admission.cmd, list(config.plugins.admission.args)) == ("/p", ["a", "b"])


def test_errors_keep_their_line_after_blanking() -> None:
    with pytest.raises(text_format.ParseError) as caught:
        parse_discarding_unknown("[x.y] {\n a: 1\n}\nplugins { admission { cmd: 3 } }", ClientConfig())
    assert caught.value.GetLine() == 4
