"""Cost models, pure (no SimPy): device/link primitives (compute, collectives, fairshare, fluid,
layer_inputs) below the System, workload costs over a System (layer_cost, iteration,
training, attention, offload) above it. Uses system, topology, derived, routing, config."""
