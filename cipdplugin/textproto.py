"""Protobuf text format, parsed the way Go's prototext parses with DiscardUnknown.

The Go CIPD client ignores fields and extensions its config schema does not
know, so that files written for newer clients still load. Python's
``text_format`` can skip unknown fields, but how well depends on the
protobuf version (4.25 fails on a list of messages), and it rejects any
extension on a message that declares no extension range (a proto3 message
cannot declare one). So unknown fields and extensions are blanked out first,
guided by the message's descriptor, and only then parsed.

Blanking replaces characters with spaces and keeps newlines, so every
remaining token keeps its line and column and parse errors point at the
right place. Text whose structure the scan cannot follow is parsed as is,
for the parser to report.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# Enough of the text format's tokens to follow its structure.
_TOKEN = re.compile(
    r"""(?P<space>\s+|\#[^\n]*)"""
    r"""|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')"""
    r"""|(?P<word>[\w.+\-/]+)"""
    r"""|(?P<punct>.)""",
    re.DOTALL,
)
_CLOSE = {"{": "}", "<": ">", "[": "]"}
_Token = re.Match[str]
# A message descriptor: the pure-Python and upb implementations have no common type.
_Descriptor = Any


def parse_discarding_unknown(text: str, message: Message) -> None:
    """Parse ``text`` into ``message``, ignoring unknown fields and extensions.

    Fields may also be named by number, as Go's prototext allows.

    Raises:
        google.protobuf.text_format.ParseError: the known part is malformed.
    """
    text_format.Parse(
        blank_unknown(text, message),
        message,
        allow_unknown_extension=True,
        allow_field_number=True,
        allow_unknown_field=True,
    )


def blank_unknown(text: str, message: Message) -> str:
    """``text`` with every field ``message``'s type does not know replaced by spaces."""
    tokens = [token for token in _TOKEN.finditer(text) if token.lastgroup != "space"]
    spans = _unknown_spans(tokens, message.DESCRIPTOR)
    if not spans:
        return text
    pieces, position = [], 0
    for start, end in spans:
        pieces.append(text[position:start])
        pieces.append(re.sub(r"[^\n]", " ", text[start:end]))
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _unknown_spans(tokens: list[_Token], descriptor: _Descriptor) -> list[tuple[int, int]] | None:
    """Character spans of unknown fields (with their separator); None if lost."""
    spans: list[tuple[int, int]] = []
    # The messages being read, innermost last, with the token that closes each.
    stack: list[tuple[_Descriptor, str | None]] = [(descriptor, None)]
    index = 0
    while index < len(tokens):
        current, closer = stack[-1]
        token = tokens[index]
        value = token.group()
        if value == closer:
            stack.pop()
            index += 1
            continue
        if value in (",", ";"):
            index += 1
            continue
        if value == "[":  # an extension, or an Any's type URL
            field, name_end = None, _skip_balanced(tokens, index)
        elif token.lastgroup == "word":
            field, name_end = _field(current, value), index + 1
        else:
            return None
        if name_end is None:
            return None
        if field is not None and field.message_type is not None:
            opening = name_end
            if opening < len(tokens) and tokens[opening].group() == ":":
                opening += 1
            if opening < len(tokens) and tokens[opening].group() in ("{", "<"):
                stack.append((field.message_type, _CLOSE[tokens[opening].group()]))
                index = opening + 1
                continue
        end = _skip_value(tokens, name_end)
        if end is None:
            return None
        if field is None:
            if end < len(tokens) and tokens[end].group() in (",", ";"):
                end += 1
            spans.append((token.start(), tokens[end - 1].end()))
        index = end
    return spans


def _field(descriptor: _Descriptor, name: str) -> FieldDescriptor | None:
    fields = descriptor.fields_by_number if name.isdigit() else descriptor.fields_by_name
    field: FieldDescriptor | None = fields.get(int(name) if name.isdigit() else name)
    return field


def _skip_value(tokens: list[_Token], index: int) -> int | None:
    """The index after the value starting at ``index`` (after an optional ``:``)."""
    if index < len(tokens) and tokens[index].group() == ":":
        index += 1
    if index >= len(tokens):
        return None
    token = tokens[index]
    if token.group() in _CLOSE:
        return _skip_balanced(tokens, index)
    if token.lastgroup == "string":  # adjacent strings are one value
        while index < len(tokens) and tokens[index].lastgroup == "string":
            index += 1
        return index
    if token.lastgroup == "word":
        return index + 1
    return None


def _skip_balanced(tokens: list[_Token], index: int) -> int | None:
    """The index after the bracket opened at ``index`` closes; None if it never does."""
    expected: list[str] = []
    for position in range(index, len(tokens)):
        value = tokens[position].group()
        if value in _CLOSE:
            expected.append(_CLOSE[value])
        elif expected and value == expected[-1]:
            expected.pop()
            if not expected:
                return position + 1
    return None
