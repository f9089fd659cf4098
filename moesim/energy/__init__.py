"""Energy and carbon: per-device power by state (``power``), energy of a run's timeline
(``account``) and the summary section (``summary``)."""
