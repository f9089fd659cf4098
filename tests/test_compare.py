"""moesim compare: inputs first, normalised outputs, warnings for misleading pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_feasibility import TRAINING

from moesim.cli import main
from moesim.report.compare import normalised, scenario_diff, warnings


def test_compare_inputs_first_then_normalised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two training layouts with different global batches and PUEs: both warned about,
    the differing inputs listed before the outputs, tokens/s per device shown, raw fields
    only with --all."""
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(TRAINING + "energy: {pue: 1.2}\n")
    b.write_text(
        TRAINING.replace("micro_batch_sequences: 1", "micro_batch_sequences: 2")
        + "energy: {pue: 1.58}\n"
    )
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the runs train different global batches (32768 vs 65536" in out
    assert "WARNING: different PUEs (1.2 vs 1.58)" in out
    assert out.index("inputs that differ (2)") < out.index("outputs, normalised")
    assert "workload.micro_batch_sequences  1" in out and "energy.pue" in out
    assert "tokens/s per device" in out and "step_time_ms " not in out
    assert main(["compare", str(a), str(b), "--all"]) == 0
    assert "step_time_ms " in capsys.readouterr().out


def test_no_warning_for_a_fair_pair() -> None:
    """The same batch and facility: no warning; identical scenarios: no input differs."""
    s = {"workload": "training", "tokens_per_step": 4096, "devices": 8, "tokens_per_s": 800.0}
    r = {"energy": {"pue": 1.2, "carbon_intensity_g_per_kwh": 300}, "seed": 1}
    assert warnings(s, s, r, r) == []
    assert scenario_diff(r, r) == []
    assert scenario_diff(r, {**r, "seed": 2}) == [("seed", 1, 2)]
    assert dict(normalised(s))["tokens/s per device"] == 100.0
