"""Text from plugins made safe to show: one line, no terminal control.

A plugin chooses its log messages, its stderr lines and its denial
messages. Shown as they are, a newline forges a log line of its own, and an
escape sequence (ESC, CSI, OSC) can make a terminal rewrite what it shows,
say a "denied" line as "admitted". ``printable`` escapes them wherever such
text reaches a terminal, a log line or the text report; the ``--json``
report and the audit log keep the exact text, JSON-escaped.

Both sides may use it, so it imports only ``re``.
"""

from __future__ import annotations

import re

#: What ``printable`` escapes: the C0 and C1 controls and DEL (ESC, CR, LF,
#: U+0085 NEL and U+009B CSI among them), the Unicode line and paragraph
#: separators, the bidirectional overrides and isolates (which reorder what
#: follows them on the line), and lone surrogates (from undecodable file
#: names; no stream can encode them).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character shown as a visible escape.

    ``"a\\nb\\x1b[31m"`` becomes ``"a\\\\nb\\\\x1b[31m"``: LF, CR and TAB as
    ``\\n``, ``\\r`` and ``\\t``, other characters below U+0100 as ``\\xNN``,
    the rest as ``\\uNNNN``. Backslashes are left alone, so escaping twice
    changes nothing more. The result is a single line that a terminal shows
    as written.
    """
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)
