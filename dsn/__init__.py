"""The ``dsn`` command: the command tree over the three packages, and the demo that joins them.

It sits on top of the import graph: ``common`` <- ``dataplane`` <- ``gateway``, ``common`` <-
``controlplane``, and ``dsn`` over all of them. Nothing below imports it.
"""
