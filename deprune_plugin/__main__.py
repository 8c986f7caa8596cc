"""``python -m deprune_plugin ...`` runs the ``deprune`` command."""
from .app.cli import main

raise SystemExit(main())
