"""Summaries, tables, traces, plots and report.md: pure functions of records, plus atomic file
writes. Uses failures, engine (record types), cost, system, derived, config."""
