"""DSN endpoints: the wire protocol, the producer SDK and synthetic camera, and the HPC consumer."""
