"""Where ``cipdplugin check`` gets its plugin, backend, credentials and metadata.

The command line wins; then the machine's CIPD client options, read as the
Go client reads them (``load_client_options``: ``CIPD_ADMISSION_PLUGIN``,
``CIPD_SERVICE_URL``, ``CIPD_PROXY_URL`` and the config file). Metadata
comes from ``--metadata`` (offline) or else from the backend itself, with
the credentials the Go client would pick (``default_token_source``), through
the machine's proxies (``HTTPS_PROXY``, ``NO_PROXY``...).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from cipdplugin import (
    Config,
    PrpcRepository,
    default_token_source,
    load_client_options,
)
from cipdplugin.backend import DEFAULT_TIMEOUT, GCE_SERVICE_ACCOUNT, TokenSource
from cipdplugin.cli.inputs import PluginSpec, UsageError, load_config, plugin_specs
from cipdplugin.deadline import checked_timeout
from cipdplugin.options import (
    ADMISSION_PLUGIN_ENV as PLUGIN_ENV,
)
from cipdplugin.options import (
    CONFIG_FILE_ENV,
    NO_CONFIG_FILE,
    SERVICE_URL_ENV,
    normalise_service_url,
)

_log = logging.getLogger("cipdplugin.cli")


@dataclass
class Sources:
    """What a run uses, and where each piece came from (for ``-v``).

    Close it (or use it as a context manager) to close the backend's connections.
    """

    cmdline: list[str]  # the first plugin's
    config: Config
    origins: list[str] = field(default_factory=list)
    backend: PrpcRepository | None = None
    #: Every plugin with its scope; by default, ``cmdline`` covering every package.
    plugins: list[PluginSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.plugins:
            self.plugins = [PluginSpec(tuple(self.cmdline))]

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def log_origins(self) -> None:
        """Say where each piece came from, at info level (shown with ``-v``)."""
        for origin in self.origins:
            _log.info("%s", origin)


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """The options this module reads (besides ``--plugin``, ``--service-url`` and ``--metadata``)."""
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="send no credentials to the backend (by default https backends get a token, "
        "chosen as the Go CIPD client chooses: see 'credentials' below)",
    )
    parser.add_argument(
        "--service-account-json",
        metavar="PATH|:gce",
        help="credentials from a service account JSON key (needs cipdplugin[google-auth]), "
        "or ':gce' for the GCE metadata server",
    )
    parser.add_argument(
        "--backend-timeout",
        type=_backend_seconds,
        metavar="SECONDS",
        help=f"limit for each backend call, retries and the token included "
        f"(default: {DEFAULT_TIMEOUT:g}, or half of --timeout if that is less)",
    )


def _backend_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    try:
        return checked_timeout(value, "--backend-timeout")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve_sources(args: argparse.Namespace, environ: Mapping[str, str]) -> Sources:
    """The plugin command line, the host's config and their origins.

    Raises:
        UsageError: a malformed option, or no plugin anywhere.
        ConfigError: the environment or the CIPD config file is invalid.
    """
    service_url = None
    if args.service_url is not None:
        if not args.service_url:
            raise UsageError("--service-url must not be empty")
        service_url = normalise_service_url(args.service_url, "--service-url")
    # Several --plugin options (with scopes) replace the client options' one plugin.
    specs = plugin_specs(args.plugin) if args.plugin else []
    plugin = list(specs[0].cmdline) if specs else None
    if plugin is not None:
        # The config file can give nothing but a plugin: with --plugin it is not
        # read at all, so that a broken or blocking one cannot stop the run.
        environ = {**environ, CONFIG_FILE_ENV: NO_CONFIG_FILE}
    options = load_client_options(environ, service_url=service_url, admission_plugin=plugin)
    if not options.admission_plugin:
        read = f"{options.config_file} has none" if options.config_file else "none was read"
        raise UsageError(
            f"no plugin given: use --plugin JSON_LIST, set {PLUGIN_ENV}, or configure "
            f"plugins.admission in the CIPD config file ({read})"
        )
    cmdline = list(options.admission_plugin)
    specs = specs or [PluginSpec(tuple(cmdline))]

    origin = _plugin_origin(args, environ, options.config_file)
    origins = [
        f"plugin command from {origin}: {list(spec.cmdline)}"
        + (f", for packages under {', '.join(spec.scope)}" if spec.scope else "")
        for spec in specs
    ]
    origins.append(f"service URL {options.service_url} from {_url_origin(args, environ)}")
    if args.metadata is not None:
        origins.append(f"metadata from {args.metadata}")
        return Sources(cmdline, load_config(options.service_url, args.metadata), origins, plugins=specs)

    token_source, credentials = _credentials(args, options.proxy_url, options.service_url, environ)
    # By default half the run's limit: a failing backend is reported as such, not as a timeout.
    timeout = args.backend_timeout or min(DEFAULT_TIMEOUT, args.timeout / 2)
    backend = PrpcRepository.from_options(
        options, token_source=token_source, timeout=timeout, environ=environ
    )
    via = f" through the CIPD proxy {options.proxy_url}" if options.proxy_url else ""
    origins.append(f"metadata from the backend{via}, {credentials}")
    origins.append(f"backend calls go to {backend.target}, each within {timeout:g} s")
    return Sources(cmdline, Config(options.service_url, backend), origins, backend, specs)


def _credentials(
    args: argparse.Namespace, proxy_url: str | None, service_url: str, environ: Mapping[str, str]
) -> tuple[TokenSource | None, str]:
    """The token source for the backend (None: no credentials), and how ``-v`` says it.

    Raises:
        UsageError: --no-auth and --service-account-json together.
        ConfigError: the service account key cannot be used.
    """
    key = args.service_account_json
    if args.no_auth and key:
        raise UsageError("--no-auth and --service-account-json contradict each other")
    if args.no_auth:
        return None, "without credentials (--no-auth)"
    if proxy_url is not None:
        return None, "without credentials (the CIPD proxy holds them)"
    if service_url.startswith("http://"):
        return None, "without credentials (plain http)"
    if key is not None and not key:
        raise UsageError("--service-account-json must not be empty")
    source = default_token_source(environ, service_account_json=key)
    chosen = "--service-account-json" if key else "as the Go CIPD client chooses"
    if key == GCE_SERVICE_ACCOUNT:
        chosen = "--service-account-json :gce"
    return source, f"with credentials from {source.description} ({chosen})"


def _plugin_origin(args: argparse.Namespace, environ: Mapping[str, str], config_file: str | None) -> str:
    if args.plugin:
        return "--plugin"
    # The variable alone, as the options read it (``[]`` and ``null`` name no plugin).
    alone = {PLUGIN_ENV: environ.get(PLUGIN_ENV, ""), CONFIG_FILE_ENV: NO_CONFIG_FILE}
    if load_client_options(alone).admission_plugin:
        return f"${PLUGIN_ENV}"
    return f"the CIPD config file {config_file}"


def _url_origin(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.service_url is not None:
        return "--service-url"
    if environ.get(SERVICE_URL_ENV):
        return f"${SERVICE_URL_ENV}"
    return "the default"
