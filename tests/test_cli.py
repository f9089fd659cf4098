"""The command line: run/check/schema/presets/show behave as the README says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from moesim import catalog
from moesim.cli import main

QUICK = str(Path(__file__).resolve().parent.parent / "scenarios" / "quickstart.yaml")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moesim", *args], capture_output=True, text=True, timeout=120
    )


def test_run_json_prints_only_the_summary(tmp_path: Path) -> None:
    """`run --json` prints exactly the summary JSON and writes the same to the run folder."""
    proc = _cli("run", QUICK, "--json", "--out", str(tmp_path), "--set", "workload.tokens=512")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tokens"] == 512 and summary["workload"] == "layer"
    (written,) = tmp_path.glob("quickstart/*/summary.json")
    assert json.loads(written.read_text()) == summary


def test_run_prints_a_table_and_the_run_folder(tmp_path: Path, capsys) -> None:
    """Plain `run` prints the readable table and where the run folder is."""
    assert main(["run", QUICK, "--out", str(tmp_path), "--set", "workload.tokens=256"]) == 0
    out = capsys.readouterr().out
    assert "layer time" in out and "critical path" in out
    assert f"run folder: {tmp_path}" in out


def test_seed_option_overrides_the_scenario(tmp_path: Path) -> None:
    """--seed changes the run's seed (and so its routing sample)."""
    a = json.loads(_cli("run", QUICK, "--json", "--no-write", "--seed", "1").stdout)
    b = json.loads(_cli("run", QUICK, "--json", "--no-write", "--seed", "2").stdout)
    assert a["seed"] == 1 and b["seed"] == 2 and a["expert_load"] != b["expert_load"]


def test_authoring_schema_accepts_every_file_as_written() -> None:
    """`moesim schema` accepts the scenario files as people write them (preset names,
    presets with overrides, include) and still rejects bad values."""
    import yaml

    schema = json.loads(_cli("schema").stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    # one validator for every file (jsonschema.validate would re-check the schema each call)
    validator = jsonschema.Draft202012Validator(schema)
    files = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))
    assert files
    for f in files:
        validator.validate(yaml.safe_load(f.read_text()))
    validator.validate({"include": "base.yaml", "seed": 3, "model": {"hf_config": "c.json"}})
    for bad in ({"seed": -1}, {"cluster": "dgx-h1000"}, {"model": {"preset": "nope"}}):
        try:
            validator.validate(bad)
        except jsonschema.ValidationError:
            continue
        raise AssertionError(f"{bad} passed the schema")


def test_schema_validates_the_example_scenarios() -> None:
    """`moesim schema --resolved` is a JSON Schema that the resolved examples satisfy."""
    proc = _cli("schema", "--resolved")
    schema = json.loads(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    import moesim

    resolved = moesim.load_scenario(QUICK).model_dump(mode="json")
    validator.validate(resolved)
    bad = dict(resolved, seed=-1)
    try:
        validator.validate(bad)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("a negative seed passed the schema")


def test_presets_lists_every_catalog_entry(capsys) -> None:
    """`moesim presets` lists every preset of every kind."""
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for kind in catalog.KINDS:
        for name in catalog.names(kind):
            assert f"  {name} " in out


def test_show_model_prints_published_scale(capsys) -> None:
    """`moesim show model mixtral-8x7b` prints the derived totals (46.7B / 12.9B)."""
    assert main(["show", "model", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46.70 B" in out and "12.88 B" in out


def test_show_unknown_preset_exits_2(capsys) -> None:
    """An unknown preset name is a clear error with a suggestion, exit 2."""
    assert main(["show", "model", "mixtral-8x7"]) == 2
    assert "did you mean 'mixtral-8x7b'" in capsys.readouterr().err


#: what `check` must not import: the simulation engine and plotting (seconds of imports);
#: `--help` also leaves numpy, pydantic and yaml alone
ENGINE = ("simpy", "scipy", "matplotlib", "networkx")
HELP_EXTRA = ("numpy", "pydantic", "yaml")


def _imported_by(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """The ``names`` a fresh interpreter has imported after ``moesim.cli.main(argv)``."""
    code = (
        "import sys\n"
        "from moesim.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {names!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_help_imports_no_heavy_package() -> None:
    """`--help` imports neither the engine's packages, numpy, pydantic nor yaml (it answers at once)."""
    assert _imported_by(["--help"], ENGINE + HELP_EXTRA) == []


def test_check_does_not_import_the_engine() -> None:
    """`check` validates without importing simpy, scipy, matplotlib or networkx."""
    assert _imported_by(["check", QUICK], ENGINE) == []
    # the probe does see imports: check validates with pydantic
    assert _imported_by(["check", QUICK], ("pydantic", "yaml")) == ["pydantic", "yaml"]


@pytest.mark.timing
def test_help_and_check_answer_quickly() -> None:
    """`--help` and `check` answer within a second of wall time (needs an idle machine)."""
    t0 = time.perf_counter()
    assert _cli("--help").returncode == 0
    t1 = time.perf_counter()
    proc = _cli("check", QUICK)
    t2 = time.perf_counter()
    assert proc.returncode == 0 and "ok" in proc.stdout
    assert t1 - t0 < 1.0 and t2 - t1 < 1.0, (t1 - t0, t2 - t1)


def test_resolved_scenario_is_plain_yaml(tmp_path: Path) -> None:
    """The run folder's scenario.yaml is plain YAML that safe_load reads."""
    assert main(["run", QUICK, "--out", str(tmp_path), "--set", "workload.tokens=128"]) == 0
    (path,) = tmp_path.glob("quickstart/*/scenario.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["model"]["name"] == "mixtral-8x7b" and data["workload"]["tokens"] == 128


def test_compare_shows_both_summaries_and_differences(tmp_path: Path, capsys) -> None:
    """`moesim compare` runs both scenarios and reports B - A for numeric fields."""
    b = tmp_path / "b.yaml"
    b.write_text(Path(QUICK).read_text().replace("s: 1.0", "s: 0.0"))
    assert main(["compare", QUICK, str(b), "--set", "workload.tokens=1024", "--all"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("dropped_tokens "))
    a_val, b_val = (int(v) for v in line.split()[1:3])
    assert a_val > b_val  # Zipf(1) drops more than uniform at the same capacity
    assert f"{b_val - a_val:+d}" in line


def test_compare_table_stays_readable() -> None:
    """Long text (sources) is shortened, seeds are not differenced, per-device times are
    not summed."""
    from moesim.report.compare import CELL_WIDTH, compare_table

    a = {"seed": 3, "power_source": "x" * 500, "device_finish_ms": [1.0, 2.0], "t_ms": 2.0}
    b = {"seed": 7, "power_source": "y" * 500, "device_finish_ms": [1.0, 3.0], "t_ms": 3.0}
    out = compare_table(a, b, "A", "B")
    lines = out.splitlines()
    assert max(len(x) for x in lines) < 3 * CELL_WIDTH + 40
    seed = next(x for x in lines if x.startswith("seed"))
    assert "differs" in seed and "%" not in seed
    assert not any(x.startswith("device_finish_ms.sum") for x in lines)
    assert any(x.startswith("device_finish_ms.max") for x in lines)
    assert "+1 (+50.0%)" in next(x for x in lines if x.startswith("t_ms"))


def test_show_cluster_gives_the_planning_figures(capsys) -> None:  # type: ignore[no-untyped-def]
    """`moesim show cluster` states per-device and total memory, compute and bandwidths,
    computed from the presets (8 x 80 GiB = 0.625 TiB; 8 NDR NICs over 8 GPUs = 50 GB/s)."""
    assert main(["show", "cluster", "h100-rail"]) == 0
    out = capsys.readouterr().out
    assert "80 GiB at 3350 GB/s" in out and "2.5 TiB" in out
    assert "18 x nvlink4 = 450 GB/s" in out
    assert "8 x ib-ndr per node = 50 GB/s per device" in out
    assert main(["show", "cluster", "tpu-v3-32"]) == 0
    assert "per neighbour" in capsys.readouterr().out


def test_help_shows_defaults_worth_showing(capsys: pytest.CaptureFixture[str]) -> None:
    """Options with a value default show it in --help; flags and None defaults do not."""
    with pytest.raises(SystemExit):
        main(["capacity", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "share of requests within SLO (default: 0.99)" in out
    assert "(default: True)" not in out and "(default: None)" not in out
    assert "(default: False)" not in out


def test_shell_completion_names_the_commands(tmp_path: Path) -> None:
    """With argcomplete (a dev dependency; the `completion` extra for users), the command
    line completes subcommands and options as a shell asks for them (in a subprocess:
    argcomplete takes over the process's standard streams)."""
    pytest.importorskip("argcomplete")
    out = tmp_path / "completions.txt"
    script = (
        "import sys, argcomplete\n"
        "from moesim.cli import _parser\n"
        "with open(sys.argv[1], 'w') as out:\n"
        "    argcomplete.autocomplete(_parser(), exit_method=lambda code=0: None, "
        "output_stream=out)\n"
    )

    def complete(line: str) -> set[str]:
        env = {
            **os.environ,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_IFS": "\n",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
        }
        subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True)
        return {w.strip() for w in out.read_text().split("\n") if w.strip()}

    assert {"calibrate", "capacity"} <= complete("moesim ca")
    assert "--tolerance" in complete("moesim capacity x.yaml --tol")
