"""Regression tests for issue 13 (hardening): one per crash class of the fuzzing report, each
asserting a located error (file:line:col and field path), exit 2 and no traceback, bounded
resources, contained file access, sweeps that survive failing points, and Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moesim.errors import ScenarioError
from moesim.loader import load_scenario

GOOD = """name: t
cluster: dgx-h100
model: mixtral-8x7b
parallelism: {dp: 8, ep: 8}
workload: {kind: layer, tokens: 1024}
"""
ROOT = Path(__file__).parent.parent


def _write(tmp_path: Path, text: str | bytes, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, "utf-8")
    return p


def _error(path: Path, *overrides: str, **kw: object) -> str:
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path, list(overrides), **kw)  # type: ignore[arg-type]
    return str(exc.value)


@pytest.mark.parametrize(
    ("extra", "where", "text"),
    [
        ("description: " + "[" * 600 + "]" * 600, ":6:", "nested more than 64 levels"),
        ("description: &a [*a]", ":6:", "refers to a mapping or list that contains it"),
        ("x: &x {<<: *x}", ":6:", "refers to a mapping or list that contains it"),
        ("seed: " + "9" * 4301, ":6:7: seed:", "more digits than Python converts"),
        ("seed: !!int abc", ":6:7: seed:", "not a valid int"),
        ("output: {trace: !!bool maybe}", ":6:17: output.trace:", "not a valid boolean"),
        ("energy: {pue: !!float x}", ":6:15: energy.pue:", "not a valid float"),
        ("description: 2001-02-30", ":6:14: description:", "not a valid date"),
        ("? [a]\n: 1", ":6:3:", "a key must be a plain value"),
    ],
)
def test_yaml_failures_are_located(tmp_path: Path, extra: str, where: str, text: str) -> None:
    """Deep nesting, self-referencing aliases and scalars PyYAML's constructors reject are
    located errors, not RecursionError/ValueError/KeyError."""
    p = _write(tmp_path, GOOD + extra + "\n")
    err = _error(p)
    assert f"{p}{where}" in err and text in err


def test_alias_bomb_is_bounded_before_positions(tmp_path: Path) -> None:
    """Six levels of ten-fold aliases (a million nodes) are refused at once, located."""
    bomb = "a0: &a0 [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7)
    )
    p = _write(tmp_path, GOOD + bomb)
    err = _error(p)
    assert f"{p}:9:" in err and "aliases expand to more than 10000 nodes" in err


def test_alias_bomb_in_a_sweep_set_is_bounded(tmp_path: Path) -> None:
    """A sweep whose ``set`` holds an alias bomb is a located error of the sweep file."""
    from moesim.sweep.runner import load_sweep

    base = _write(tmp_path, GOOD)
    bomb = "\n".join(
        f"  k{i}: &k{i} [{','.join([f'*k{i - 1}'] * 10) if i else '1,1,1,1,1,1,1,1,1,1'}]"
        for i in range(5)
    )
    p = _write(tmp_path, f"name: s\nbase: {base.name}\nset:\n{bomb}\nmetrics: [x]\n", "sweep.yaml")
    with pytest.raises(ScenarioError, match="aliases expand to more than"):
        load_sweep(p)


@pytest.mark.parametrize(
    ("raw", "where", "text"),
    [
        (b"name: q\xff\n", ":1:8:", "not UTF-8 text (byte 0xff)"),
        (b"name: q\x01\n", ":1:8:", "character U+0001 is not allowed"),
        (b"name: q\x00\n", ":1:8:", "character U+0000 is not allowed"),
    ],
)
def test_bytes_yaml_cannot_hold_are_located(
    tmp_path: Path, raw: bytes, where: str, text: str
) -> None:
    """Non-UTF-8 bytes, NUL and control characters are located errors."""
    p = _write(tmp_path, raw)
    err = _error(p)
    assert f"{p}{where}" in err and text in err


def test_profile_that_is_not_utf8_is_located(tmp_path: Path) -> None:
    """A ``cluster.profile`` file holding non-UTF-8 bytes is a located error of the profile
    (it was read a second time as text, raising UnicodeDecodeError)."""
    _write(tmp_path, b"name: q\xff\n", "p.yaml")
    p = _write(
        tmp_path, GOOD.replace("cluster: dgx-h100", "cluster: {preset: dgx-h100, profile: p.yaml}")
    )
    assert f"{tmp_path / 'p.yaml'}:1:8: not UTF-8 text" in _error(p)


@pytest.mark.parametrize(
    ("override", "text"),
    [
        ("workload.tokens=true", "workload.tokens: expected a number, got a boolean (true)"),
        ("energy.pue=.inf", "energy.pue: input should be a finite number"),
        ("energy.pue=.nan", "energy.pue: input should be a finite number"),
        ("routing={kind: zipf, s: -.inf}", "routing.s: input should be a finite number"),
    ],
)
def test_booleans_and_non_finite_numbers_are_refused(
    tmp_path: Path, override: str, text: str
) -> None:
    """A boolean is not a number and +/-inf and NaN are not finite numbers."""
    err = _error(_write(tmp_path, GOOD), override)
    assert f"--set {override}: {text}" in err


@pytest.mark.parametrize(
    ("scenario", "override", "field"),
    [
        ("quickstart", "workload.tokens=2147483648", "workload.tokens"),
        ("quickstart", "workload.tokens=1.0e+8", "workload.tokens"),
        ("quickstart", "model.experts=1000000", "model.experts"),
        ("quickstart", "cluster={preset: dgx-h100, nodes: 10000}", "cluster"),
        ("mixtral-training-h100", "workload.microbatches=9223372036854775808", "microbatches"),
        ("mixtral-serving-dgx-h100", "workload.duration_s=1e308", "workload.duration_s"),
        ("training-checkpoint-restart-h100", "workload.duration_s=1e308", "duration_s"),
    ],
)
def test_resource_bounds_are_checked_at_load_time(scenario: str, override: str, field: str) -> None:
    """Scenarios that would exhaust memory or never end are refused before the run, with
    the limit, the reason and the override."""
    err = _error(ROOT / "scenarios" / f"{scenario}.yaml", override)
    assert field in err and "over the limit of" in err and "--no-limits" in err


def test_no_limits_lifts_the_bounds() -> None:
    """``limits=False`` (``--no-limits``) loads a scenario over a bound."""
    s = load_scenario(
        ROOT / "scenarios" / "quickstart.yaml", ["workload.tokens=8388608"], limits=False
    )
    assert s.workload.tokens == 8388608  # type: ignore[union-attr]


def test_huge_capacity_factor_runs() -> None:
    """A capacity factor of 1e19 means no drops (capacity clamped at tokens x top_k), not an
    int64 overflow."""
    from moesim.api import run

    s = load_scenario(
        ROOT / "scenarios" / "quickstart.yaml",
        ["policies.capacity_factor=1e19", "workload.tokens=512"],
    )
    assert run(s).summary["dropped_tokens"] == 0


def test_negative_zero_sigma_runs() -> None:
    """A lognormal ``sigma: -0.0`` is 0 (numpy refuses -0.0)."""
    from moesim.config.serving import LognormalLength

    assert str(LognormalLength(kind="lognormal", mean=10, sigma=-0.0).sigma) == "0.0"


@pytest.mark.parametrize("what", ["fifo", "dir", "loop", "outside", "big"])
def test_file_inputs_are_regular_contained_and_capped(tmp_path: Path, what: str) -> None:
    """A trace path at a FIFO, a folder, a symlink loop, outside the scenario's folder or
    over the size cap is a located error naming the field, and never hangs."""
    from moesim.loader import files

    sc = tmp_path / "sc"
    sc.mkdir()
    target = sc / "t.csv"
    if what == "fifo":
        os.mkfifo(target)
    elif what == "dir":
        target.mkdir()
    elif what == "loop":
        os.symlink(sc / "u.csv", sc / "t.csv")
        os.symlink(sc / "t.csv", sc / "u.csv")
    elif what == "outside":
        (tmp_path / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,1,1\n")
        target = tmp_path / "t.csv"
    else:
        with open(target, "wb") as f:
            f.truncate(files.MAX_TRACE_BYTES + 1)
    rel = os.path.relpath(target, sc)
    p = _write(
        sc,
        "name: t\ncluster: dgx-h100\nmodel: mixtral-8x7b\nparallelism: {dp: 8, ep: 8}\n"
        "workload:\n  kind: serving\n  duration_s: 1\n"
        f"  arrival: {{kind: trace, path: {rel}}}\n"
        "  slo: {ttft_ms: 500, tpot_ms: 50}\n",
    )
    err = _error(p)
    assert f"{p}:8:" in err and "workload.arrival.path" in err
    expected = {
        "fifo": "not a regular file",
        "dir": "a folder",
        "loop": "a loop of symbolic links",
        "outside": "outside the scenario's folder",
        "big": "larger than 64 MiB",
    }[what]
    assert expected in err
    if what == "outside":
        s = load_scenario(p, allow_paths=[tmp_path])
        assert s.workload.arrival.arrival_s == (0.0,)  # type: ignore[union-attr]


def test_include_symlink_loop_and_escape_are_located(tmp_path: Path) -> None:
    """An include through a symlink loop or out of the scenario's folder is located."""
    os.symlink(tmp_path / "b.yaml", tmp_path / "a.yaml")
    os.symlink(tmp_path / "a.yaml", tmp_path / "b.yaml")
    p = _write(tmp_path, "include: a.yaml\n" + GOOD)
    assert f"{p}:1:1: include: cannot read file" in _error(p)
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "base.yaml").write_text(GOOD)
    q = _write(sub, "include: ../base.yaml\nname: u\n")
    assert "outside the scenario's folder" in _error(q)
    assert load_scenario(q, allow_paths=[tmp_path]).name == "u"


def test_foreign_file_contents_are_not_echoed(tmp_path: Path) -> None:
    """A trace CSV's header and cells and an hf_config's values stay out of messages."""
    (tmp_path / "t.csv").write_text("SECRET1,SECRET2\nSECRET3,x\n")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "SECRET4"}))
    p = _write(
        tmp_path,
        GOOD.replace("model: mixtral-8x7b", "model: {hf_config: config.json}"),
    )
    assert "SECRET" not in _error(p)
    trace = _write(
        tmp_path,
        GOOD.replace(
            "workload: {kind: layer, tokens: 1024}",
            "workload: {kind: serving, duration_s: 1, arrival: {kind: trace, path: t.csv}, "
            "slo: {ttft_ms: 1, tpot_ms: 1}}",
        ),
        "u.yaml",
    )
    err = _error(trace)
    assert "SECRET" not in err and "missing column(s)" in err


def test_deep_hf_config_json_is_located(tmp_path: Path) -> None:
    """A 100,000-deep hf_config JSON is a located error, not a RecursionError."""
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    p = _write(tmp_path, GOOD.replace("model: mixtral-8x7b", "model: {hf_config: config.json}"))
    err = _error(p)
    assert f"{p}:3:" in err and "model.hf_config" in err and "not valid JSON" in err


@pytest.mark.parametrize("what", ["deep", "fifo"])
def test_import_model_reads_like_the_loader(tmp_path: Path, what: str, capsys) -> None:
    """``moesim import-model`` on a 100,000-deep JSON or a FIFO exits 2 with one message
    (it was a RecursionError and a read that never ends)."""
    from moesim import cli

    f = tmp_path / "config.json"
    if what == "deep":
        f.write_text("[" * 100_000 + "]" * 100_000)
    else:
        os.mkfifo(f)
    assert cli.main(["import-model", str(f)]) == 2
    err = capsys.readouterr().err
    assert ("not valid JSON" if what == "deep" else "not a regular file") in err


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moesim", *args], capture_output=True, text=True, cwd=cwd
    )


def test_out_or_output_dir_at_a_file_is_an_error(tmp_path: Path) -> None:
    """``--out`` or ``output.dir`` naming a file: exit 2, one message, no traceback, no run."""
    (tmp_path / "f").write_text("")
    p = _write(tmp_path, GOOD + "output: {dir: f}\n")
    for args in (["--out", str(tmp_path / "f")], []):
        proc = _cli("run", str(p), *args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr


def test_run_folder_is_complete_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write interrupted part-way leaves no run folder and no temporary folder behind."""
    from moesim.api import Result, run

    result = run(load_scenario(_write(tmp_path, GOOD)))

    def boom(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Result, "write_report", boom)
    with pytest.raises(KeyboardInterrupt):
        result.write(tmp_path / "out", report=True)
    assert list((tmp_path / "out" / "t").iterdir()) == []
    folder = result.write(tmp_path / "out")
    assert {f.name for f in folder.iterdir()} >= {"summary.json", "scenario.yaml", "run.json"}


def test_summary_json_is_strict(tmp_path: Path) -> None:
    """Written and printed summaries never hold NaN or Infinity (null instead)."""
    from moesim.report.files import dumps

    text = dumps({"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(text) == {"a": None, "b": [None, 1.5]}


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Ctrl-C during a run prints one line and exits 130 (no traceback)."""
    from moesim import cli
    from moesim.cli import simulate

    def interrupted(_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(simulate, "run", interrupted)
    code = cli.main(["run", str(ROOT / "scenarios" / "quickstart.yaml")])
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == "moesim: interrupted"


SWEEP = """name: hard
base: ../base.yaml
grid:
  workload.tokens: [512, 999999999, 1024]
metrics: [time_ms]
"""


def _sweep(tmp_path: Path, workers: int, *flags: str) -> tuple[int, Path, str]:
    (tmp_path / "base.yaml").write_text(GOOD)
    (tmp_path / "sw").mkdir(exist_ok=True)
    (tmp_path / "sw" / "s.yaml").write_text(SWEEP)
    out = tmp_path / f"out{workers}"
    from moesim import cli

    code = cli.main(
        [
            "sweep",
            str(tmp_path / "sw" / "s.yaml"),
            "--workers",
            str(workers),
            "--out",
            str(out),
            "--quiet",
            *flags,
        ]
    )
    return code, out / "sweeps" / "hard", ""


def test_sweep_records_a_failing_point_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A point that fails is recorded as failed (point file, CSV, sweep.json), the others
    run, and a rerun retries it only with --retry-failed."""
    from moesim.sweep import runner

    # the sweep validates every point first: let the bad point through to the run
    real_plan = runner.plan

    def lenient(cfg, base, positions, file, opts=None):  # type: ignore[no-untyped-def]
        return real_plan(cfg, base, positions, file, runner.Options(limits=False))

    monkeypatch.setattr(runner, "plan", lenient)
    code, folder, _ = _sweep(tmp_path, 1)
    assert code == 0
    bad = json.loads((folder / "points" / "0001.json").read_text())
    assert bad["status"] == "failed" and "over the limit" in bad["error"]
    assert json.loads((folder / "points" / "0002.json").read_text())["status"] == "ok"
    csv = (folder / "results.csv").read_text().splitlines()
    assert csv[0].endswith("status,error") and ",failed," in csv[2]
    doc = json.loads((folder / "sweep.json").read_text())
    assert [p["status"] for p in doc["points"]] == ["ok", "failed", "ok"]
    calls: list[int] = []
    real_run = runner._run_point
    monkeypatch.setattr(runner, "_run_point", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    _sweep(tmp_path, 1)
    assert calls == []  # the failed point stays failed
    _sweep(tmp_path, 1, "--retry-failed")
    assert len(calls) == 1  # only the failed point reran


@pytest.mark.slow
def test_sweep_point_files_identical_across_workers(tmp_path: Path) -> None:
    """``--workers 1`` and ``--workers 2`` write byte-identical point files (serving
    points share layer costs in one process; the summaries do not show it)."""
    (tmp_path / "base.yaml").write_text(
        (ROOT / "scenarios" / "mixtral-serving-dgx-h100.yaml").read_text()
    )
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "name: w\nbase: base.yaml\nset: {workload.duration_s: 1, workload.warmup_s: 0,"
        " workload.prompt_tokens: {kind: constant, value: 64},"
        " workload.output_tokens: {kind: constant, value: 8}}\n"
        "grid: {workload.arrival.rate_per_s: [5, 20]}\nmetrics: [ttft_ms.p99]\n"
    )
    from moesim.sweep.runner import run_sweep

    a = run_sweep(sweep, 1, tmp_path / "a").folder / "points"
    b = run_sweep(sweep, 2, tmp_path / "b").folder / "points"
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir()) and len(names) == 2
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes()


def test_sweep_values_that_are_yaml_dates_are_located(tmp_path: Path) -> None:
    """A YAML date in a sweep's ``set`` (found by the fuzz) is a located error of the point,
    not a TypeError from JSON."""
    from moesim.sweep.runner import load_sweep, plan

    base = _write(tmp_path, GOOD)
    p = _write(
        tmp_path,
        f"name: s\nbase: {base.name}\nset:\n  energy.pue: 2001-02-03\nmetrics: [time_ms]\n",
        "sweep.yaml",
    )
    cfg, positions = load_sweep(p)
    with pytest.raises(ScenarioError) as exc:
        plan(cfg, base, positions, str(p))
    assert f"{p}:4:3: point 0" in str(exc.value) and "energy.pue" in str(exc.value)
