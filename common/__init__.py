"""What the control plane, the gateway and the endpoints share, and nothing else.

The contracts between processes: the wire protocol (``protocol``), the DSN configuration schema
(``config``), the state stream's codec (``clone``), ZAP requests and replies (``zap``), the scan
result record (``results``) and the PLAIN credentials of a session (``credentials``). And the
few helpers every process needs, each written once in its strongest form: private files and
directories (``privatefs``), token files (``tokenfile``), CURVE key files (``keys``), strict YAML
(``strictyaml``), JSON-lines logs (``logs``), the REST client (``restclient``), process groups
(``processes``), free ports (``ports``) and the command-line parameter types (``clitypes``).

It imports none of the other packages.
"""
