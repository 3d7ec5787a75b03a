"""Host names as they go on the wire: ASCII, checked once, when a client is built.

A service URL that passed option loading may still name a host no request can
reach (``https://a..b``, ``http://€.example``); these are refused here, with a
message, instead of failing later inside a call. Internationalised names are
converted the way Go's ``idna.Lookup`` (IDNA 2008, non-transitional) converts
them, which the Go client applies to non-ASCII hosts: lower case, NFC, one
Punycode label at a time (``bücher.example`` is ``xn--bcher-kva.example``,
``ß.de`` stays ``xn--zca.de``). Symbols and punctuation, which IDNA 2008 does
not allow in a label, are refused.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

_ASCII_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")
#: Unicode categories a label may use besides "-": letters, marks, digits.
_LABEL_CATEGORIES = ("L", "M", "Nd")
_MAX_LABEL = 63
_MAX_NAME = 253


@dataclass(frozen=True)
class Origin:
    """Where a service URL points: scheme, ASCII host (no brackets) and port."""

    scheme: str
    host: str
    port: int
    explicit_port: bool

    @property
    def authority(self) -> str:
        """``host[:port]`` for the Host header, as the URL gave it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.explicit_port else host

    @property
    def address(self) -> str:
        """``host:port`` always, for CONNECT."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_origin(url: str) -> Origin:
    """The origin of a normalised ``scheme://host[:port]`` URL.

    Raises:
        ValueError: the host is not a valid name or address, or the port is out of range.
    """
    scheme, _, authority = url.partition("://")
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, _, port_text = authority.partition(":")
        host = ascii_host(host)
    default = 443 if scheme == "https" else 80
    if not port_text:
        return Origin(scheme, host, default, explicit_port=False)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range (1 to 65535)")
    return Origin(scheme, host, port, explicit_port=True)


def ascii_host(host: str) -> str:
    """``host`` as an ASCII name or address, lower case.

    Raises:
        ValueError: an empty or overlong label, or a character no host name may hold.
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host  # a fully qualified name's root dot
    if not name:
        raise ValueError("the host name is empty")
    labels = [_ascii_label(label) for label in name.split(".")]
    text = ".".join(labels)
    if len(text) > _MAX_NAME:
        raise ValueError(f"the host name is longer than {_MAX_NAME} characters")
    return text


def _ascii_label(label: str) -> str:
    if not label:
        raise ValueError("the host name has an empty label (two dots in a row, or a leading dot)")
    if label.isascii():
        text = label.lower()
        if not _ASCII_LABEL.fullmatch(text):
            raise ValueError(
                f"the label {label!r} may only hold letters, digits, '-' and '_', "
                "and may not begin or end with '-'"
            )
    else:
        normal = unicodedata.normalize("NFC", label.lower())
        for char in normal:
            if char != "-" and not unicodedata.category(char).startswith(_LABEL_CATEGORIES):
                raise ValueError(
                    f"the label {label!r} holds {char!r} (U+{ord(char):04X}), "
                    "which IDNA does not allow in a host name"
                )
        text = "xn--" + normal.encode("punycode").decode("ascii")
    if len(text) > _MAX_LABEL:
        raise ValueError(f"the label {label!r} is longer than {_MAX_LABEL} characters")
    return text
