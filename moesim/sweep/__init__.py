"""Sweeps: many runs of one base scenario, executed in parallel, resumable, with Pareto
fronts (:mod:`moesim.config.sweep` describes the file)."""

from moesim.sweep.runner import SweepResult, load_sweep, run_sweep

__all__ = ["SweepResult", "load_sweep", "run_sweep"]
