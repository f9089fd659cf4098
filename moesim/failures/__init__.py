"""Failures over a run: plan, degraded system, MoE cost in a state, serving hooks, training run.
Uses the layers below it up to the engine (config, cost, system, engine); nothing above."""
