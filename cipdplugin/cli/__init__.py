"""The ``cipdplugin`` command line; ``check.py`` holds the ``check`` command.

This module only wires the console-script entry point.
"""

from cipdplugin.cli.check import main

__all__ = ["main"]
