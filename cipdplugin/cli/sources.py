"""Where ``cipdplugin check`` gets its plugin, backend and metadata.

The command line wins; then the machine's CIPD client options, read as the
Go client reads them (``load_client_options``: ``CIPD_ADMISSION_PLUGIN``,
``CIPD_SERVICE_URL``, ``CIPD_PROXY_URL`` and the config file). Metadata
comes from ``--metadata`` (offline) or else from the backend itself.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from cipdplugin import (
    Config,
    LuciAuthTokenSource,
    PrpcRepository,
    load_client_options,
)
from cipdplugin.backend import DEFAULT_TIMEOUT
from cipdplugin.cli.inputs import PluginSpec, UsageError, load_config, plugin_specs
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
        help="send no credentials to the backend (by default https backends get a luci-auth token)",
    )


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

    credentials = "with luci-auth credentials"
    if args.no_auth:
        credentials = "without credentials (--no-auth)"
    elif options.proxy_url is not None:
        credentials = "without credentials (the proxy holds them)"
    elif options.service_url.startswith("http://"):
        credentials = "without credentials (plain http)"
    token_source = LuciAuthTokenSource() if credentials.startswith("with ") else None
    # Half the run's limit: a failing backend is reported as such, not as a timeout.
    timeout = min(DEFAULT_TIMEOUT, args.timeout / 2)
    backend = PrpcRepository.from_options(options, token_source=token_source, timeout=timeout)
    via = f" through the CIPD proxy {options.proxy_url}" if options.proxy_url else ""
    origins.append(f"metadata from the backend{via}, {credentials}")
    return Sources(cmdline, Config(options.service_url, backend), origins, backend, specs)


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
