"""``python -m controlplane`` runs the ``dsn`` command (used where the console script is not on PATH)."""

from controlplane.cli import main

main()
