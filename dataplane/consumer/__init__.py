"""The HPC consumer: receive loop, frame assembly, threshold agreement, gather, HDF5 writer.

``assembly``, ``scanwork`` and ``outcome`` are pure; ``agreement`` and ``gather`` are the MPI
adapters; ``runner`` owns the ZeroMQ socket and the loop that joins them; ``writer`` and
``report`` are the outputs.
"""
