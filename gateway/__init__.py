"""The DSN gateway: a layer-7 ZeroMQ proxy between facility producers and HPC consumers."""
