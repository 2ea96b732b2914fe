"""``python -m dataplane.consumer run ...``: the same command as ``dsn consumer run``."""

from dataplane.cli import consumer

consumer(prog_name="dsn consumer")
