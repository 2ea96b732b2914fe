"""The DSN control plane: the `dsn` command, and the REST service it will grow into."""
