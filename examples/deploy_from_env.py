#!/usr/bin/env python3
"""A deployment script for a machine set up for the CIPD client.

It finds the admission plugin and the backend exactly as the Go CIPD client
does (``CIPD_ADMISSION_PLUGIN``, ``CIPD_SERVICE_URL``, ``CIPD_PROXY_URL`` and
the config file, ``/etc/chrome-infra/cipd.cfg`` or ``$CIPD_CONFIG_FILE``),
lets the plugin read instance metadata from the backend itself, and
"deploys" only the pins the plugin admits.

    python3 examples/deploy_from_env.py infra/tools/foo/linux-amd64:<instance_id> ...

For an https backend it authenticates with ``luci-auth`` (log in once with
``luci-auth login``); ``--no-auth`` sends no credentials. Exit status, as
``cipdplugin check``'s: 0 if every pin was admitted, 1 if some were denied
(and no check failed), 2 if the configuration or a pin is invalid, 3 if a
check failed (the plugin crashed, timed out or answered an error).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Run from a checkout without installing: make the package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cipdplugin import (
    AdmissionDenied,
    Config,
    ConfigError,
    Host,
    InvalidPinError,
    LuciAuthTokenSource,
    Pin,
    PrpcRepository,
    load_client_options,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pins", nargs="+", metavar="PIN", help='"package:instance_id"')
    parser.add_argument("--no-auth", action="store_true", help="send no credentials to the backend")
    parser.add_argument("--verbose", "-v", action="store_true", help="show the plugin's log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="  log: %(message)s")

    try:
        options = load_client_options()
        pins = [Pin.parse(text) for text in args.pins]
    except (ConfigError, InvalidPinError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not options.admission_plugin:
        print("error: no admission plugin is configured on this machine", file=sys.stderr)
        return 2

    # The Go client sends no credentials through a proxy (it holds its own)
    # nor to plain-http development backends; PrpcRepository does the same.
    token_source = None if args.no_auth else LuciAuthTokenSource()
    print(f"Backend {options.service_url}, plugin {' '.join(options.admission_plugin)}")
    status = 0
    backend = PrpcRepository.from_options(options, token_source=token_source)
    # The host closes before the backend: plugins may list metadata until then.
    with backend, Host(Config(options.service_url, backend)) as host:
        plugin = host.new_admission_plugin(options.admission_plugin)
        checks = [(pin, plugin.check_admission(pin)) for pin in pins]
        for pin, check in checks:
            error = check.exception(timeout=120)
            if error is None:
                print(f"  deployed  {pin}")
            elif isinstance(error, AdmissionDenied):
                print(f"  denied    {pin}: {error.message}")
                status = max(status, 1)
            else:
                print(f"  error     {pin}: {error}")
                status = 3
    return status


if __name__ == "__main__":
    sys.exit(main())
