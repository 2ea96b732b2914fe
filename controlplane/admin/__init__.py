"""``dsn admin``: set up a state directory and administer the running control plane.

``bootstrap`` works on the state directory itself (init, the checks before serving, offline audit
verification); ``client`` is the authenticated REST client the other commands use; ``output``
prints their answers; ``commands`` is the click command tree.
"""
