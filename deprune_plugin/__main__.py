"""``python -m deprune_plugin ...`` runs the ``deprune`` command."""
from .cli import main

raise SystemExit(main())
