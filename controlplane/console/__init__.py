"""The web console: pages served under ``/ui`` by the control plane itself, acting through the
same REST API, authorization and audit as every other client (``auth``: sign-in and cookies;
``web``: the pages and their routes)."""
