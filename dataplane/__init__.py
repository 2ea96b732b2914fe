"""The endpoints of the data plane: the producer SDK and the synthetic 4D Camera, the spool file
format, and the HPC consumer (``dataplane.consumer``). It imports only ``common``."""
