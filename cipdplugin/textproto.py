"""Protobuf text format, parsed the way Go's prototext parses with DiscardUnknown.

The Go CIPD client ignores fields and extensions its config schema does not
know, so that files written for newer clients still load. Python's
``text_format`` can skip unknown fields, but how well depends on the
protobuf version (4.25 fails on a list of messages), and it rejects any
extension on a message that declares no extension range (a proto3 message
cannot declare one). So the text is read here first, guided by the
message's descriptor: every unknown field and extension is checked and
blanked out, and only then does ``text_format`` parse what is left.

Blanking replaces characters with spaces and keeps newlines, so every
remaining token keeps its line and column and parse errors point at the
right place.

The reading follows ``text_format``'s tokens and grammar, so that text it
rejects is rejected here too, unknown parts included: an unterminated
string, a bad escape or number, a bracket closed by another kind (``[ }``),
a missing separator in a list. Where the grammar allows more than
``text_format`` skips, this reads what the text format specification and
Go's prototext accept: a list of messages after a field name without a
colon (``name [{...}]``), and any domain in an ``Any`` type URL.

Reading takes time linear in the text: tokens never backtrack (a string
runs to its closing quote or to the end of its line), and each token is
looked at once. Nesting deeper than ``MAX_DEPTH`` is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

from google.protobuf import text_encoding, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

#: Nesting of messages and lists beyond which a text is refused (as
#: protobuf's C++ text parser does by default).
MAX_DEPTH = 100

# text_format's tokens: whitespace and comments between them; identifiers;
# numbers (checked later); strings, which end at their closing quote or at
# the end of their line (so that an unterminated one costs one pass); any
# other character alone. No token spans lines.
_TOKEN = re.compile(
    r"(?P<skip>(?:\s|\#[^\n]*)+)"
    r"|(?P<identifier>[a-zA-Z_][0-9a-zA-Z_+-]*)"
    r"|(?P<number>(?:[0-9+-]|\.[0-9])[0-9a-zA-Z_.+-]*)"
    r"""|(?P<string>"[^"\n\\]*(?:\\.[^"\n\\]*)*(?:"|\\?$)|'[^'\n\\]*(?:\\.[^'\n\\]*)*(?:'|\\?$))"""
    r"|(?P<other>.)",
    re.MULTILINE,
)
# What text_format takes as a field name, and as an identifier value.
_NAME = re.compile(r"\w")
_IDENTIFIER = re.compile(r"[^\d\W]")
_CLOSE = {"{": "}", "<": ">"}
# A message descriptor: the pure-Python and upb implementations have no common type.
_Descriptor = Any


class _Token(NamedTuple):
    kind: str  # a group of _TOKEN, or "end"
    text: str
    start: int
    end: int


def parse_discarding_unknown(text: str, message: Message) -> None:
    """Parse ``text`` into ``message``, ignoring unknown fields and extensions.

    Fields may also be named by number, as Go's prototext allows.

    Raises:
        google.protobuf.text_format.ParseError: the text is malformed, in a
            known part or an unknown one.
    """
    text_format.Parse(
        blank_unknown(text, message),
        message,
        allow_unknown_extension=True,
        allow_field_number=True,
        allow_unknown_field=True,
    )


def blank_unknown(text: str, message: Message) -> str:
    """``text`` with every field ``message``'s type does not know replaced by spaces.

    Raises:
        google.protobuf.text_format.ParseError: the text is malformed. The
            values of known fields are left for ``text_format`` to check.
    """
    reader = _Reader(text)
    reader.message(message.DESCRIPTOR, None, 0)
    if not reader.spans:
        return text
    pieces, position = [], 0
    for start, end in reader.spans:
        pieces.append(text[position:start])
        pieces.append(re.sub(r"[^\n]", " ", text[start:end]))
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


class _Reader:
    """Reads a text-format message with one token of lookahead, noting unknown fields."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._matches = _TOKEN.finditer(text)
        self._token = self._scan()
        # The character spans of unknown fields of known messages, in order.
        self.spans: list[tuple[int, int]] = []
        # Where the last token taken ends.
        self._taken_end = 0

    # -- Tokens ------------------------------------------------------------------

    def _scan(self) -> _Token:
        for match in self._matches:
            kind = match.lastgroup
            assert kind is not None
            if kind != "skip":
                return _Token(kind, match.group(), match.start(), match.end())
        return _Token("end", "", len(self._text), len(self._text))

    def _take(self) -> _Token:
        token = self._token
        self._taken_end = token.end
        self._token = self._scan()
        return token

    def _at(self, *texts: str) -> bool:
        return self._token.kind != "end" and self._token.text in texts

    def _expect(self, text: str) -> None:
        if not self._at(text):
            raise self._error(f'Expected "{text}".')
        self._take()

    def _error(self, message: str, token: _Token | None = None) -> text_format.ParseError:
        start = (token or self._token).start
        line = self._text.count("\n", 0, start) + 1
        column = start - (self._text.rfind("\n", 0, start) + 1) + 1
        return text_format.ParseError(message, line, column)

    # -- Grammar -----------------------------------------------------------------

    def message(self, descriptor: _Descriptor | None, closer: str | None, depth: int) -> None:
        """Fields up to ``closer`` (None: the end of the text), which is taken.

        ``descriptor`` is None inside an unknown field: all of it is blanked.
        """
        if depth > MAX_DEPTH:
            raise self._error(f"nested more than {MAX_DEPTH} levels deep")
        while True:
            if self._token.kind == "end":
                if closer is None:
                    return
                raise self._error(f'Expected "{closer}".')
            if closer is not None and self._at(closer):
                self._take()
                return
            if self._at("}", ">"):  # the closer of another kind of bracket
                raise self._error(
                    f'Expected "{closer}".'
                    if closer
                    else f"Expected identifier or number, got {self._token.text}."
                )
            self._field(descriptor, depth)

    def _field(self, descriptor: _Descriptor | None, depth: int) -> None:
        first = self._token
        field = None
        if self._at("["):  # an extension or an Any's type URL: never a field we know
            self._take()
            self._dotted_name()
            if self._at("/"):
                self._take()
                self._dotted_name()
            self._expect("]")
        elif first.kind != "string" and _NAME.match(first.text):
            self._take()
            if descriptor is not None:
                field = self._lookup(descriptor, first)
        else:
            raise self._error(f"Expected identifier or number, got {first.text}.")

        if field is None:
            self._unknown_contents(depth)
        elif field.message_type is not None:
            self._known_message(field.message_type, depth)
        else:
            self._expect(":")
            if self._at("["):
                self._list(depth, scalar=self._known_scalar)
            else:
                self._known_scalar()
        if self._at(",", ";"):
            self._take()
        if field is None and descriptor is not None:
            self.spans.append((first.start, self._taken_end))

    def _lookup(self, descriptor: _Descriptor, name: _Token) -> FieldDescriptor | None:
        if not name.text.isdigit():
            found: FieldDescriptor | None = descriptor.fields_by_name.get(name.text)
            return found
        try:
            number = text_format.ParseInteger(name.text, is_signed=True, is_long=True)
        except ValueError as exc:
            raise self._error(str(exc), name) from None
        found = descriptor.fields_by_number.get(number)
        return found

    def _dotted_name(self) -> None:
        self._identifier()
        while self._at("."):
            self._take()
            self._identifier()

    def _identifier(self) -> None:
        if self._token.kind == "string" or not _IDENTIFIER.match(self._token.text):
            raise self._error(f"Expected identifier, got {self._token.text}.")
        self._take()

    def _known_message(self, descriptor: _Descriptor, depth: int) -> None:
        if self._at(":"):
            self._take()
        if self._at("["):
            self._list(depth, message=descriptor)
        elif self._at("{", "<"):
            self._message_value(descriptor, depth)
        else:
            raise self._error('Expected "{".')

    def _unknown_contents(self, depth: int) -> None:
        if self._at(":"):
            self._take()
            if self._at("{", "<"):
                self._message_value(None, depth)
            elif self._at("["):
                self._list(depth, message=None, scalar=self._unknown_scalar)
            else:
                self._unknown_scalar()
        elif self._at("{", "<"):
            self._message_value(None, depth)
        elif self._at("["):
            self._list(depth, message=None)
        else:
            raise self._error('Expected "{".')

    def _message_value(self, descriptor: _Descriptor | None, depth: int) -> None:
        opening = self._take().text
        self.message(descriptor, _CLOSE[opening], depth + 1)

    def _list(
        self,
        depth: int,
        *,
        message: _Descriptor | None = None,
        scalar: Callable[[], None] | None = None,
    ) -> None:
        """``[a, b, ...]`` of messages (of type ``message``; None: unknown) or, given
        ``scalar`` (the reader of one), of scalars too."""
        if depth + 1 > MAX_DEPTH:
            raise self._error(f"nested more than {MAX_DEPTH} levels deep")
        self._expect("[")
        if self._at("]"):
            self._take()
            return
        while True:
            if self._at("{", "<"):
                self._message_value(message, depth + 1)
            elif scalar is not None:
                scalar()
            else:
                raise self._error('Expected "{".')
            if self._at("]"):
                self._take()
                return
            self._expect(",")

    def _known_scalar(self) -> None:
        """A known field's value: its type is for ``text_format`` to check."""
        if self._token.kind == "string":
            self._strings()
        elif self._token.kind in ("identifier", "number") or (
            self._token.kind == "other" and _IDENTIFIER.match(self._token.text)
        ):
            self._take()
        else:
            raise self._error(f"Invalid field value: {self._token.text}")

    def _unknown_scalar(self) -> None:
        """An unknown field's value, checked as ``text_format`` checks what it skips."""
        token = self._token
        if token.kind == "string":
            self._strings()
            return
        if token.kind != "end" and (_IDENTIFIER.match(token.text) or _is_number(token.text)):
            self._take()
            return
        raise self._error(f"Invalid field value: {token.text}")

    def _strings(self) -> None:
        """One string, or several adjacent ones (they are one value)."""
        while self._token.kind == "string":
            token = self._token
            body = token.text[1:-1]
            # Closed only by a quote that no backslash escapes.
            escaped = (len(body) - len(body.rstrip("\\"))) % 2 == 1
            if len(token.text) < 2 or token.text[-1] != token.text[0] or escaped:
                raise self._error(f"String missing ending quote: {token.text!r}")
            try:
                text_encoding.CUnescape(token.text[1:-1])
            except ValueError as exc:  # UnicodeDecodeError too: a trailing backslash
                raise self._error(f"Invalid string {token.text!r}: {exc}") from None
            self._take()


def _is_number(text: str) -> bool:
    for parse in (
        lambda: text_format.ParseInteger(text, is_signed=True, is_long=True),
        lambda: text_format.ParseInteger(text, is_signed=False, is_long=True),
        lambda: text_format.ParseFloat(text),
    ):
        try:
            parse()
        except ValueError:
            continue
        return True
    return False
