"""Energy and carbon, pure functions of records: power by state, device-seconds and joules,
the summary section. Uses failures, engine records, system, cost, catalog, config."""
