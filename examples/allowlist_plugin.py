#!/usr/bin/env python3
"""An example admission plugin: an allowlist of instance digests kept in metadata.

Policy:

* packages under ``experimental/`` are never deployed;
* any other instance is admitted only if it carries an ``allowed-sha256``
  metadata entry equal to its own SHA-256 hex digest. Every such entry is
  visited (page by page), and a denial says how many were looked at.

Run it through a host (``examples/deploy.py``, or
``cipdplugin check --plugin '["python3", "examples/allowlist_plugin.py"]'``);
run by hand it waits for the host's handshake on stdin.
"""

from __future__ import annotations

import logging
import os
import sys

import grpc

# Run from a checkout without installing: make the package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cipdplugin.plugins import admission
from cipdplugin.protocol.cipd_pb2 import SHA256

ALLOW_KEY = "allowed-sha256"
log = logging.getLogger("allowlist")


def check(request: admission.Request, info: admission.InstanceInfo) -> None:
    """Admit ``request`` or raise ``admission.Denied`` saying why not."""
    if request.package == "experimental" or request.package.startswith("experimental/"):
        raise admission.Denied("experimental packages are not allowed")
    if request.instance.hash_algo != SHA256:
        raise admission.Denied("only SHA-256 instances can be checked against the allowlist")
    digest = request.instance.hex_digest
    looked_at = 0
    for entry in info.metadata(keys=[ALLOW_KEY]):
        looked_at += 1
        if entry.value.decode("utf-8", errors="replace").strip().lower() == digest:
            log.info("%s is allowlisted", request.pin)
            return
        if request.stopping.is_set():
            raise admission.Error("the plugin is stopping", code=grpc.StatusCode.ABORTED)
    raise admission.Denied(
        f"no {ALLOW_KEY} entry matches the instance digest ({looked_at} entries looked at)"
    )


if __name__ == "__main__":
    raise SystemExit(admission.run(check, version="allowlist-example 1.0"))
