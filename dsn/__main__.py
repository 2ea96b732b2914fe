"""``python -m dsn`` runs the ``dsn`` command (where the console script is not on PATH)."""

from dsn.cli import main

main()
