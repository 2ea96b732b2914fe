"""The control plane's persistent state: one SQLite database in the state directory, or the
PostgreSQL database ``database_url`` names.

``engine`` opens it (``sqlite`` and ``postgresql`` are its two backends), migrates it (the steps
are in ``migrations``, written once for both, as every statement is: ``dialect`` translates them
for PostgreSQL) and runs every read and group-committed write; each feature's SQL is a repository
of plain async functions over the engine's ``Store``: ``projects``, ``tokens``, ``admins``,
``signing_keys`` and ``audit`` here, templates and sessions beside their features
(``controlplane.templates.repository``, ``controlplane.sessions``).
"""
