"""moesim plan: closed-form pruning, simulation of the survivors, the shared feasibility
verdict, resuming, and the chosen configuration checked by a plain run."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
from test_capacity import SCENARIO

from moesim.cli import main
from moesim.config.sweep import Bound
from moesim.report.feasibility import KEEP_UP, MIN_REQUESTS, judge
from moesim.sweep.plan_run import run_command, run_plan

#: the capacity tests' small serving scenario on H200s cut to 10 GiB: one device cannot
#: hold the four Mixtral layers' weights, two can (ep 2)
SMALL = SCENARIO.replace(
    "cluster: {preset: h200x2, launch: graph}",
    "cluster: {preset: h200x2, launch: graph, accelerator: {preset: h200-sxm, memory_gib: 10, "
    "usable_memory_gib: 10}}",
).replace("duration_s: 2", "duration_s: 3")


def _plain_run(command: str, out: Path) -> dict:
    """The summary of the ``moesim run`` line the plan printed, run as typed."""
    args = shlex.split(command)
    assert args[:2] == ["moesim", "run"], command
    assert main([*args[1:], "--out", str(out)]) == 0
    (summary,) = out.glob("*/*/summary.json")
    return json.loads(summary.read_text())


def test_plan_prunes_simulates_and_answers(tmp_path: Path) -> None:
    """One device is pruned for memory without simulation; the answer is feasible by the
    shared rules, and a plain run of its configuration agrees; every simulated candidate
    marked feasible keeps up and meets the p99 targets; a rerun reuses every point."""
    base = tmp_path / "small.yaml"
    base.write_text(SMALL)
    r = run_plan(base, 200, 200.0, 20.0, devices=[1, 2], out=tmp_path / "out", beyond=1)
    (one,) = [p for p in r.pruned if p.candidate.devices == 1]
    assert "the weights do not fit" in one.reason
    assert r.rows and all(row.candidate.devices == 2 for row in r.rows)
    assert r.feasible, [row.reason for row in r.rows]
    for row in r.rows:
        if row.feasible:
            assert row.figures["ttft_ms_p99"] <= 200 and row.figures["tpot_ms_p99"] <= 20
    best = r.best("devices")[0]
    summary = _plain_run(run_command(r, best), tmp_path / "check")
    # the printed line reproduces the plan's simulation of that configuration
    assert summary["ttft_ms"]["p99"] == best.figures["ttft_ms_p99"]
    assert summary["tpot_ms"]["p99"] == best.figures["tpot_ms_p99"]
    verdict = judge(
        summary,
        constraints={
            "ttft_ms.p99": Bound(max=200),
            "tpot_ms.p99": Bound(max=20),
        },
        min_requests=MIN_REQUESTS,
    )
    assert verdict.feasible, verdict.reason
    assert summary["steady_state"]["keep_up"] >= KEEP_UP
    again = run_plan(base, 200, 200.0, 20.0, devices=[1, 2], out=tmp_path / "out", beyond=1)
    assert again.ran == 0 and again.reused == len(r.rows)
    assert [x.reason for x in again.rows] == [x.reason for x in r.rows]


def test_an_overloaded_plan_has_no_feasible_answer(tmp_path: Path) -> None:
    """At a rate over what two devices serve every simulated candidate is rejected with
    the keep-up rule; far over it, the closed-form compute bound prunes them unsimulated."""
    base = tmp_path / "small.yaml"
    base.write_text(SMALL)
    r = run_plan(base, 800, 200.0, 20.0, devices=[2], out=tmp_path / "out")
    assert r.rows and not r.feasible and not r.pruned
    assert all("falls behind" in row.reason for row in r.rows)
    # far beyond: the devices' peak FLOP/s cannot carry the load; nothing is simulated
    r = run_plan(base, 20000, 200.0, 20.0, devices=[2], out=tmp_path / "out")
    assert not r.rows and r.pruned
    assert all(p.reason.startswith("compute: the load needs") for p in r.pruned)


def test_plan_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command prints the answer first, the rejected candidates with their reasons,
    and writes plan.csv (flat, a reason per candidate) and plan.json."""
    base = tmp_path / "small.yaml"
    base.write_text(SMALL)
    args = ["plan", str(base), "--rate", "200", "--slo", "ttft_ms=200,tpot_ms=20"]
    args += ["--devices", "1,2", "--out", str(tmp_path / "out"), "--quiet", "--workers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.index("cheapest by fewest devices") < out.index("pruned without simulation")
    assert "moesim run" in out
    folder = tmp_path / "out" / "plans" / "cap"
    lines = (folder / "plan.csv").read_text().splitlines()
    assert lines[0].startswith("accelerator,devices,dp,tp,ep")
    assert all("{" not in x for x in lines)
    assert any(",pruned,False," in x for x in lines)
    assert json.loads((folder / "plan.json").read_text())["best"]["devices"]


def test_plan_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --slo or a non-serving scenario: a one-line error and exit 2, no traceback."""
    base = tmp_path / "small.yaml"
    base.write_text(SMALL)
    assert main(["plan", str(base), "--rate", "1", "--slo", "ttfb=3"]) == 2
    assert "unknown target" in capsys.readouterr().err
    quick = Path(__file__).parent.parent / "scenarios" / "quickstart.yaml"
    assert main(["plan", str(quick), "--rate", "1", "--out", str(tmp_path)]) == 2
    assert "plan needs a serving workload, got layer" in capsys.readouterr().err


@pytest.mark.slow
def test_the_issue_question_in_one_command(tmp_path: Path) -> None:
    """Issue 14: how many H100s, in which layout, serve Mixtral-8x22B at 30 requests/s
    within p99 TTFT 1 s and TPOT 60 ms, at what energy? The plan's answer is checked by a
    plain run of the chosen configuration."""
    base = Path(__file__).parent.parent / "scenarios" / "mixtral-serving-dgx-h100.yaml"
    r = run_plan(base, 30, 1000.0, 60.0, overrides=["model=mixtral-8x22b"], out=tmp_path, workers=2)
    assert r.feasible
    best = r.best("devices")[0]
    assert best.figures["energy_per_token_j_steady"] > 0
    # smaller device counts were simulated or pruned, and all rejected
    smaller = [x for x in r.rows if x.candidate.devices < best.candidate.devices]
    assert smaller and not any(x.feasible for x in smaller)
    summary = _plain_run(run_command(r, best), tmp_path / "check")
    # the printed line reproduces the plan's simulation of that configuration
    assert summary["ttft_ms"]["p99"] == best.figures["ttft_ms_p99"]
    assert summary["tpot_ms"]["p99"] == best.figures["tpot_ms_p99"]
    v = judge(
        summary,
        constraints={"ttft_ms.p99": Bound(max=1000), "tpot_ms.p99": Bound(max=60)},
        min_requests=MIN_REQUESTS,
    )
    assert v.feasible, v.reason


def test_progress_bar_on_a_terminal_lines_elsewhere() -> None:
    """The runner's [k/n] lines advance a bar on a terminal and print as lines elsewhere."""
    import io

    from moesim.report.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = Progress("plan", tty)
    bar.message("plan x: 3 points, 0 already done, 3 to run")
    for k in (1, 2, 3):
        bar.message(f"[{k}/3] point {k} (devices=2) 0.1 s")
    bar.close()
    text = tty.getvalue()
    assert "3 to run" in text and "3/3" in text and "plan" in text
    log = io.StringIO()
    lines = Progress("plan", log)
    lines.message("[1/3] point 1 (devices=2) 0.1 s")
    assert log.getvalue() == "[1/3] point 1 (devices=2) 0.1 s\n"


def test_capacity_factors_are_searched_and_their_drops_shown(tmp_path: Path) -> None:
    """A capacity factor on a dropless base drops the overflow (not a loader error) and
    the answer states the share of token choices dropped; null stays dropless."""
    base = tmp_path / "small.yaml"
    base.write_text(SMALL)
    r = run_plan(base, 200, 200.0, 20.0, devices=[2], capacity_factors=[1.0, None], out=tmp_path)
    assert not r.pruned and r.rows
    capped = [x for x in r.rows if x.candidate.capacity_factor == 1.0]
    free = [x for x in r.rows if x.candidate.capacity_factor is None]
    assert capped and len(capped) == len(free)
    assert all((x.figures["dropped_fraction"] or 0) > 0 for x in capped)
    assert all(x.figures["dropped_fraction"] == 0 for x in free)


def test_each_accelerator_gets_its_own_answer_and_prices_rank_by_cost(tmp_path: Path) -> None:
    """With two accelerators the search stops per accelerator: the small-memory H200 is
    still simulated at two devices after one H100 serves the load; prices give a cost
    ranking; an unknown accelerator is a located error before anything runs."""
    from moesim.errors import ScenarioError

    base = tmp_path / "small.yaml"
    base.write_text(SMALL)
    r = run_plan(
        base,
        200,
        200.0,
        20.0,
        devices=[1, 2],
        accelerators=["h200-sxm", "h100-sxm"],
        prices={"h100-sxm": 2.5, "h200-sxm": 3.5},
        out=tmp_path,
    )
    best = {x.candidate.accelerator: x.candidate.devices for x in reversed(r.best("devices"))}
    assert best == {"h100-sxm": 1, "h200-sxm": 2}
    costs = [x.figures["usd_per_million_tokens"] for x in r.best("cost")]
    assert costs == sorted(costs) and all(c > 0 for c in costs)
    with pytest.raises(ScenarioError, match="unknown accelerator preset 'a100'"):
        run_plan(base, 200, 200.0, 20.0, accelerators=["a100"], out=tmp_path)


def test_a_kv_starved_layout_is_never_feasible(tmp_path: Path) -> None:
    """Out of memory at run time: with 6.1 GiB per device the two devices hold the weights
    (the loader and the closed-form checks pass them) but dp 2 leaves each device KV for a
    few sequences: it falls behind, the reason names the KV cache, and a plain run of the
    same configuration is judged the same; tp 2 halves the weights and the KV per token on
    each device and serves the load."""
    base = tmp_path / "small.yaml"
    base.write_text(
        SMALL.replace(
            "memory_gib: 10, usable_memory_gib: 10", "memory_gib: 6.1, usable_memory_gib: 6.1"
        )
    )
    r = run_plan(base, 200, 200.0, 20.0, devices=[2], out=tmp_path / "out", workers=1)
    assert not r.pruned
    rows = {(x.candidate.dp, x.candidate.tp): x for x in r.rows}
    starved = rows[(2, 1)]
    assert not starved.feasible
    assert "falls behind" in starved.reason and "the KV cache is the limit" in starved.reason
    assert rows[(1, 2)].feasible, rows[(1, 2)].reason
    assert [x.candidate for x in r.best("devices")] == [rows[(1, 2)].candidate]
    summary = _plain_run(run_command(r, starved), tmp_path / "check")
    v = judge(summary, constraints={"ttft_ms.p99": Bound(max=200), "tpot_ms.p99": Bound(max=20)})
    assert v.reason == starved.reason


def test_expert_tensor_parallelism_is_searched(tmp_path: Path) -> None:
    """--etp 1,2: on two devices every expert either whole on one device (ep 2) or split
    over both (ep 1 x etp 2); both fit and are simulated, the etp layouts are labelled and
    in plan.csv's etp column, and a plain run of the best etp layout gives its p99s."""
    base = tmp_path / "small.yaml"
    base.write_text(SMALL)
    args = ["plan", str(base), "--rate", "200", "--slo", "ttft_ms=200,tpot_ms=20"]
    args += ["--devices", "2", "--etp", "1,2", "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*args, "--workers", "1"]) == 0
    folder = tmp_path / "out" / "plans" / "cap"
    rows = list(csv.DictReader((folder / "plan.csv").open()))
    layouts = {(r["dp"], r["tp"], r["ep"], r["etp"]) for r in rows}
    assert layouts == {
        ("2", "1", "2", "1"),
        ("1", "2", "2", "1"),
        ("2", "1", "1", "2"),
        ("1", "2", "1", "2"),
    }
    assert all(r["stage"] == "simulated" for r in rows)
    r = run_plan(base, 200, 200.0, 20.0, devices=[2], etps=[2], out=tmp_path / "out")
    assert r.reused == len(r.rows) == 2 and r.feasible  # the command's points, reused
    best = r.best("energy")[0]
    assert best.candidate.etp == 2 and " etp2" in best.candidate.label
    assert "parallelism={dp: " in run_command(r, best) and "etp: 2}" in run_command(r, best)
    summary = _plain_run(run_command(r, best), tmp_path / "check")
    assert summary["tpot_ms"]["p99"] == best.figures["tpot_ms_p99"]
    assert main(["plan", str(base), "--rate", "200", "--etp", "0"]) == 2
