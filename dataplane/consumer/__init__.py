"""The HPC consumer: receive loop, frame assembly, threshold agreement, gather, HDF5 writer.

``assembly``, ``scanwork`` and ``outcome`` are pure; ``agreement`` and ``gather`` are the MPI
adapters; ``runner`` owns the ZeroMQ socket and the loop that joins them; ``writer`` and
``report`` are the outputs; ``controlplane`` (the REST client) and ``registration`` (ephemeral
endpoints, leases) let a job join a session whose consumers are not known in advance.
"""
