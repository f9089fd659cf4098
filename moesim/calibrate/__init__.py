"""Measuring and fitting: harnesses on this host and on GPUs, profiles fitted from records, and
fidelity tables. Uses api, loader, system, engine, cost, reference, catalog, config."""
