"""``python -m dataplane.consumer run ...``: the same command as ``dsn consumer run``, without
loading anything but the data plane (job scripts start every MPI rank this way)."""

from dataplane.consumer.cli import consumer

consumer(prog_name="dsn consumer", auto_envvar_prefix="DSN_CONSUMER")
