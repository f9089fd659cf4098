"""``python -m moesim`` runs the command line."""

from moesim.cli import main

raise SystemExit(main())
