"""The simulation: SimPy processes and the network (flows, exchanges, an MoE layer, the serving
loop, the training pipeline). Uses cost, system, topology, routing, layout, config."""
