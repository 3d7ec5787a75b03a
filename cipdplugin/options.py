"""Client options, loaded the way the Go CIPD client loads them.

On a machine set up for the Go CIPD client, the admission plugin, the backend
URL and the proxy come from the environment and a configuration file:

``CIPD_ADMISSION_PLUGIN``
    The plugin command line as a JSON list of strings. An empty value, ``[]``
    and ``null`` all count as unset (the Go client decodes them to no
    command). Anything else that is not a list of strings is an error.
``CIPD_SERVICE_URL``
    The backend, ``https://chrome-infra-packages.appspot.com`` by default,
    normalised to ``scheme://host[:port]``: a path other than ``/`` or a
    scheme other than http and https is an error; user info, a query and a
    fragment are dropped.
``CIPD_PROXY_URL``
    ``unix://<absolute path>``: talk to the backend through a local proxy on
    that unix socket. Nothing else is accepted.
``CIPD_CONFIG_FILE``
    The configuration file: ``-`` reads none; any other non-empty value must
    be an absolute path to a file that exists and parses. Unset or empty
    means ``/etc/chrome-infra/cipd.cfg``, which may be missing, but must
    parse when it exists.

The file is a text-format ``cipd.client.config.ClientConfig``
(``cipdplugin/protocol/config.proto``)::

    plugins {
      admission {
        cmd: "/opt/cipd/plugin"
        args: "--policy=strict"
      }
    }

Unknown fields and extensions are ignored, as the Go client ignores them, so
that files written for newer clients still load. The plugin comes from the
file only when neither the caller nor the environment names one; an empty
``cmd`` means no plugin. The file is read (and must be valid) even then.

Decisions where the Go client is silent or lenient: an item of
``CIPD_ADMISSION_PLUGIN`` that is not a string (``[null]``) is an error here,
where the Go client would read an empty string; so is an empty executable
(``[""]``), which the Go client would fail to start; a service URL without
a host is an error here, where the Go client fails on its first call. The
file must be a regular file of at most 1 MiB: a FIFO or a device is refused
before it is read, so that loading never hangs.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import text_format

from cipdplugin.cmdline import CommandLineError, checked_cmdline, parse_cmdline
from cipdplugin.config import DEFAULT_SERVICE_URL
from cipdplugin.constants import MAX_CONFIG_FILE_BYTES
from cipdplugin.files import UnusableFile, read_regular_file
from cipdplugin.protocol.config_pb2 import ClientConfig
from cipdplugin.textproto import parse_discarding_unknown

ADMISSION_PLUGIN_ENV = "CIPD_ADMISSION_PLUGIN"
SERVICE_URL_ENV = "CIPD_SERVICE_URL"
PROXY_URL_ENV = "CIPD_PROXY_URL"
CONFIG_FILE_ENV = "CIPD_CONFIG_FILE"
#: Put in front of the backend client's User-Agent, as the Go client does
#: (``ClientOptions.LoadFromEnv``); read by ``PrpcRepository`` with the
#: proxy variables (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``).
USER_AGENT_PREFIX_ENV = "CIPD_HTTP_USER_AGENT_PREFIX"
#: Where the Go client looks for its configuration file on Linux and macOS.
DEFAULT_CONFIG_FILE = "/etc/chrome-infra/cipd.cfg"
#: The value of ``CIPD_CONFIG_FILE`` that means "read no file".
NO_CONFIG_FILE = "-"

_PORT = re.compile(r"[0-9]*")
# Control characters and spaces cannot appear in a URL the Go client accepts.
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


class ConfigError(ValueError):
    """The environment or the configuration file is invalid.

    The message names the variable or the file, and for parse errors the
    position (``file:line:column``).
    """


@dataclass(frozen=True)
class ClientOptions:
    """Where a CIPD client deploys from, and which admission plugin it runs.

    Attributes:
        service_url: the backend, normalised to ``scheme://host[:port]``.
        admission_plugin: the plugin's command line; empty means no plugin.
        proxy_url: ``unix://<absolute path>`` of a local backend proxy, or None.
        config_file: the configuration file that was read, or None.
    """

    service_url: str = DEFAULT_SERVICE_URL
    admission_plugin: tuple[str, ...] = ()
    proxy_url: str | None = None
    config_file: str | None = None

    def __post_init__(self) -> None:
        # A list would make the frozen options mutable (and unhashable).
        object.__setattr__(self, "admission_plugin", tuple(self.admission_plugin))


def load_client_options(
    environ: Mapping[str, str] | None = None,
    *,
    service_url: str | None = None,
    admission_plugin: Sequence[str] | None = None,
    default_config_file: str = DEFAULT_CONFIG_FILE,
) -> ClientOptions:
    """Load the options as the Go client does: arguments, then environment, then file.

    Args:
        environ: the environment to read; None means ``os.environ``.
        service_url: wins over ``CIPD_SERVICE_URL``; normalised the same way.
        admission_plugin: wins over ``CIPD_ADMISSION_PLUGIN`` and the file. An
            empty sequence counts as not given, as in the Go client.
        default_config_file: the file read when ``CIPD_CONFIG_FILE`` is unset
            or empty (for tests and unusual layouts).

    Raises:
        ConfigError: a variable, an argument or the configuration file is
            invalid; the message says which and why.
    """
    env = os.environ if environ is None else environ

    plugin: tuple[str, ...] = ()
    if admission_plugin is not None:
        plugin = _explicit_plugin(admission_plugin)
    if not plugin:
        plugin = _plugin_from_env(env.get(ADMISSION_PLUGIN_ENV, ""))

    if service_url is not None:
        url = normalise_service_url(service_url, "service_url")
    else:
        url = normalise_service_url(env.get(SERVICE_URL_ENV, "") or DEFAULT_SERVICE_URL, SERVICE_URL_ENV)

    proxy = env.get(PROXY_URL_ENV, "") or None
    if proxy is not None:
        proxy_socket_path(proxy, PROXY_URL_ENV)

    config_path, allow_missing = _config_path(env.get(CONFIG_FILE_ENV, ""), default_config_file)
    config_file: str | None = None
    if config_path is not None:
        config = _read_config(config_path, allow_missing)
        if config is not None:
            config_file = config_path
            admission = config.plugins.admission
            if not plugin and admission.cmd:
                plugin = (admission.cmd, *admission.args)

    return ClientOptions(service_url=url, admission_plugin=plugin, proxy_url=proxy, config_file=config_file)


def normalise_service_url(url: str, source: str) -> str:
    """``url`` as ``scheme://host[:port]``; ``source`` names it in errors.

    Raises:
        ConfigError: not an http or https URL of a host, or it has a path.
    """
    shown = f"{source}={url!r}"
    if not url:
        raise ConfigError(f"{source} must not be empty")
    if _UNSAFE.search(url):
        raise ConfigError(f"bad {shown}: a URL cannot contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket
        raise ConfigError(f"bad {shown}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"bad {shown}: expecting an http:// or https:// URL")
    if parts.path not in ("", "/"):
        raise ConfigError(f"bad {shown}: expecting a root URL (scheme://host[:port]), not one with a path")
    host = parts.netloc.rpartition("@")[2]
    port = host.rpartition("]")[2].partition(":")[2] if host.startswith("[") else host.partition(":")[2]
    if not host or host.startswith(":") or host == "[]":
        raise ConfigError(f"bad {shown}: no host")
    if not _PORT.fullmatch(port) or (host.startswith("[") and "]" not in host):
        raise ConfigError(f"bad {shown}: invalid host or port {host!r}")
    return f"{scheme}://{host}"


def proxy_socket_path(proxy_url: str, source: str) -> str:
    """The absolute socket path of a ``unix://`` proxy URL; ``source`` names it in errors.

    Raises:
        ConfigError: another scheme, a host, or a relative or missing path.
    """
    shown = f"bad {source}={proxy_url!r}"
    if _UNSAFE.search(proxy_url):
        raise ConfigError(f"{shown}: a URL cannot contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(proxy_url)
    except ValueError as exc:
        raise ConfigError(f"{shown}: {exc}") from None
    if parts.scheme.lower() != "unix":
        raise ConfigError(f"{shown}: only unix:///absolute/path/to/socket is supported")
    path = urllib.parse.unquote(parts.path)
    if parts.netloc or not path:
        raise ConfigError(f"{shown}: expecting unix:///absolute/path/to/socket")
    path = os.path.normpath(path)
    if not os.path.isabs(path):
        raise ConfigError(f"{shown}: the socket path must be absolute")
    return path


def _explicit_plugin(command: Sequence[str]) -> tuple[str, ...]:
    try:
        return checked_cmdline(command, source="admission_plugin", allow_empty=True)
    except CommandLineError as exc:
        raise ConfigError(str(exc)) from None


def _plugin_from_env(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    try:
        return parse_cmdline(text, source=f"${ADMISSION_PLUGIN_ENV}", allow_empty=True)
    except CommandLineError as exc:
        raise ConfigError(str(exc)) from None


def _config_path(from_env: str, default: str) -> tuple[str | None, bool]:
    """The file to read (None: none) and whether it may be missing."""
    if from_env == NO_CONFIG_FILE:
        return None, False
    if from_env:
        path = os.path.normpath(from_env)
        if not os.path.isabs(path):
            raise ConfigError(f"bad {CONFIG_FILE_ENV}={from_env!r}: must be an absolute path")
        return path, False
    return default, True


def _read_config(path: str, allow_missing: bool) -> ClientConfig | None:
    """The parsed file; None if it is missing and ``allow_missing``."""
    try:
        blob = read_regular_file(path, limit=MAX_CONFIG_FILE_BYTES)
    except FileNotFoundError:
        if allow_missing:
            return None
        raise ConfigError(f"CIPD config file {path!r} (from ${CONFIG_FILE_ENV}) does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read CIPD config file {path!r}: {exc.strerror or exc}") from None
    except UnusableFile as exc:
        raise ConfigError(f"cannot read CIPD config file {path!r}: it {exc}") from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = blob.count(b"\n", 0, exc.start) + 1
        column = exc.start - (blob.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"cannot parse CIPD config file {path}:{line}:{column}: not UTF-8 text") from None
    config = ClientConfig()
    try:
        parse_discarding_unknown(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"cannot parse CIPD config file {path}:{_parse_error_text(exc)}") from None
    except (ValueError, RecursionError) as exc:  # what some protobuf versions raise for odd input
        raise ConfigError(f"cannot parse CIPD config file {path}: {exc}") from None
    return config


def _parse_error_text(exc: text_format.ParseError) -> str:
    """``line:column: message`` from a ``ParseError``, whose text varies by version."""
    text = str(exc)
    line, column = exc.GetLine(), exc.GetColumn()
    if line is None:
        return f" {text}"
    prefix = f"{line}:{column} : "
    message = text[len(prefix) :] if text.startswith(prefix) else text
    return f"{line}:{column}: {message}"
