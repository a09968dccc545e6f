"""The whole system on one machine: the launcher of ``facegrid up`` and the processes the
tests and benchmarks start (Triton, Milvus, nats-server). No service imports it.
"""
