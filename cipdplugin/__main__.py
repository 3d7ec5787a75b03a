"""``python -m cipdplugin``: the command line."""

from cipdplugin.cli import main

raise SystemExit(main())
