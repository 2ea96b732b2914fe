"""The control plane's persistent state: one SQLite database in the state directory.

``engine`` opens it, migrates it (the steps are in ``migrations``) and runs every read and
group-committed write; each feature's SQL is a repository of plain async functions over the
engine's ``Store``: ``projects``, ``tokens``, ``admins``, ``signing_keys`` and ``audit`` here,
templates and sessions beside their features (``controlplane.templates.repository``,
``controlplane.sessions``).
"""
