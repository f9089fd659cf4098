"""Frozen, validated scenario types, one module per concern (cluster, hardware, model, routing,
parallelism, policies, workloads, energy, failures, output). Uses only units; no I/O."""
