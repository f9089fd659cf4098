"""Sweeps: many runs of one base scenario, in parallel, resumable, with Pareto fronts and capacity
searches (:mod:`moesim.config.sweep` describes the file). Uses api, loader, workloads, report."""

from moesim.sweep.runner import SweepResult, load_sweep, run_sweep

__all__ = ["SweepResult", "load_sweep", "run_sweep"]
