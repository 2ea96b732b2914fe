"""The DSN gateway: a layer-7 ZeroMQ proxy between facility producers and HPC consumers. It imports
``common`` and the data plane's spool format, never the control plane."""
