"""Bad scenarios get located errors: file:line:col, field path, expected and found."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moesim.errors import ScenarioError
from moesim.loader import load_scenario

GOOD = """\
name: t
seed: 1
cluster: dgx-h100
model: mixtral-8x7b
routing: {kind: zipf, s: 1.0}
parallelism: {dp: 8, ep: 8}
policies: {capacity_factor: 1.25, overflow: drop}
workload: {kind: layer, tokens: 1024}
"""


def _errors(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, overrides)
    return [str(i) for i in info.value.issues]


def test_good_scenario_loads(write) -> None:
    """The baseline scenario used by these tests is valid."""
    s = load_scenario(write("ok.yaml", GOOD))
    assert s.model.experts == 8 and s.cluster.devices == 8


def test_top_k_above_experts_names_line_and_field(write) -> None:
    """top_k > experts is reported at the top_k line with the issue's exact wording."""
    text = GOOD.replace("model: mixtral-8x7b", "model:\n  preset: mixtral-8x7b\n  top_k: 9")
    p = write("x.yaml", text)
    assert _errors(p) == [f"{p}:6:3: model.top_k: must be <= model.experts (8), got 9"]


def test_unknown_key_gets_did_you_mean(write) -> None:
    """A misspelt key is rejected at its own line and column, with the closest field name."""
    p = write(
        "x.yaml",
        GOOD.replace(
            "workload: {kind: layer, tokens: 1024}", "workload:\n  kind: layer\n  tokenz: 1024"
        ),
    )
    errs = _errors(p)
    assert f"{p}:10:3: workload.tokenz: unknown key (did you mean 'tokens'?)" in errs


def test_many_errors_are_listed_together(write) -> None:
    """Every independent problem is reported in one go, each at its own place."""
    text = (
        GOOD.replace("s: 1.0", "s: -1")
        .replace("seed: 1", "seed: -5")
        .replace("tokens: 1024", "tokens: 0")
        .replace("overflow: drop", "overflow: spill")
    )
    p = write("x.yaml", text)
    errs = _errors(p)
    assert f"{p}:2:1: seed: must be >= 0, got -5" in errs
    assert f"{p}:5:23: routing.s: must be >= 0.0, got -1" in errs
    assert f"{p}:8:25: workload.tokens: must be >= 1, got 0" in errs
    assert any(e.startswith(f"{p}:7:35: policies.overflow: expected one of") for e in errs)
    assert len(errs) == 4


def test_cross_field_rules_all_reported(write) -> None:
    """Layout rules (ep divides experts, ep x etp divides dp x tp, devices) all show up."""
    p = write("x.yaml", GOOD.replace("{dp: 8, ep: 8}", "{dp: 4, ep: 3}"))
    errs = _errors(p)
    assert (
        f"{p}:6:1: parallelism: dp x tp x pp = 4 x 1 x 1 = 4 must equal the cluster's devices (8)"
        in errs
    )
    assert f"{p}:6:22: parallelism.ep: must divide model.experts (8), got 3" in errs
    assert any(
        e.startswith(f"{p}:6:22: parallelism.ep: ep x etp = 3 must divide dp x tp = 4")
        for e in errs
    )


def test_dropless_with_capacity_factor_rejected(write) -> None:
    """dropless has no capacity, so a capacity factor alongside it is a contradiction."""
    p = write("x.yaml", GOOD.replace("overflow: drop", "overflow: dropless"))
    assert _errors(p) == [
        f"{p}:7:12: policies.capacity_factor: must be null when policies.overflow is "
        "'dropless', got 1.25"
    ]


def test_unknown_workload_kind_lists_the_available_ones(write) -> None:
    """A workload kind moesim does not know is named with the kinds it does."""
    p = write("x.yaml", GOOD.replace("kind: layer", "kind: inference"))
    errs = _errors(p)
    assert len(errs) == 1 and errs[0].startswith(f"{p}:8:")
    assert "workload.kind: kind must be one of" in errs[0] and "'training'" in errs[0]


def test_unknown_preset_suggests_the_closest(write) -> None:
    """A misspelt preset name is located and gets a suggestion."""
    p = write("x.yaml", GOOD.replace("model: mixtral-8x7b", "model: mixtral-8x7"))
    (err,) = _errors(p)
    assert err.startswith(f"{p}:4:1: model: unknown model preset 'mixtral-8x7'")
    assert "did you mean 'mixtral-8x7b'" in err


def test_set_override_errors_name_the_option(write) -> None:
    """Errors in --set values point at the command-line option, not at the file."""
    p = write("ok.yaml", GOOD)
    errs = _errors(p, ("workload.tokens=abc", "routing.kind=zipff"))
    assert any(
        e.startswith("--set workload.tokens=abc: workload.tokens: input should be a valid integer")
        for e in errs
    )
    assert any(
        e.startswith("--set routing.kind=zipff: routing.kind: kind must be one of") for e in errs
    )


def test_set_override_changes_a_preset_field(write) -> None:
    """--set reaches into a preset named by a plain string."""
    s = load_scenario(write("ok.yaml", GOOD), ["model.experts=16", "parallelism.ep=8"])
    assert s.model.experts == 16 and s.model.name == "mixtral-8x7b"


def test_include_merges_and_locates_errors_in_the_included_file(write) -> None:
    """Included files merge under the including file; their errors name their own path."""
    base = write("base.yaml", GOOD.replace("tokens: 1024", "tokens: -3"))
    top = write("top.yaml", "include: base.yaml\nname: top\n")
    errs = _errors(top)
    assert errs == [f"{base.resolve()}:8:25: workload.tokens: must be >= 1, got -3"]
    fixed = write(
        "top2.yaml", "include: base.yaml\nname: top2\nworkload: {kind: layer, tokens: 7}\n"
    )
    s = load_scenario(fixed)
    assert s.name == "top2" and s.workload.tokens == 7 and s.model.name == "mixtral-8x7b"


def test_include_cycle_is_an_error(write) -> None:
    """A file that includes itself (indirectly) is reported, not recursed forever."""
    write("a.yaml", "include: b.yaml\n")
    b = write("b.yaml", "include: a.yaml\n")
    errs = _errors(b)
    assert len(errs) == 1 and "include cycle" in errs[0]


def test_duplicate_keys_and_bad_yaml(write) -> None:
    """Duplicate keys and malformed YAML are located errors, not silent overwrites."""
    p = write("d.yaml", GOOD + "seed: 2\n")
    assert _errors(p) == [f"{p}:9:1: seed: duplicate key"]
    q = write("y.yaml", "name: [unclosed\n")
    (err,) = _errors(q)
    assert err.startswith(f"{q}:") and "invalid YAML" in err


def test_yaml_is_loaded_safely(write) -> None:
    """Python object tags are refused (safe loading), as a located error."""
    p = write(
        "evil.yaml", GOOD.replace("name: t", "name: !!python/object/apply:os.system ['true']")
    )
    (err,) = _errors(p)
    assert err.startswith(f"{p}:1:7:") and "invalid YAML" in err


def test_cli_exit_code_2_without_traceback(write) -> None:
    """The CLI prints located errors on stderr and exits 2, with no Python traceback."""
    p = write("x.yaml", GOOD.replace("s: 1.0", "s: -1"))
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "check", str(p)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert f"{p}:5:23: routing.s: must be >= 0.0, got -1" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "moesim", "run", "nope.yaml"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "nope.yaml: cannot read file" in missing.stderr


def test_included_preset_refined_by_a_mapping(write) -> None:
    """A mapping in the including file overrides fields of a preset named in the base."""
    write("base.yaml", GOOD)
    top = write(
        "top.yaml",
        "include: base.yaml\nmodel: {experts: 16}\ncluster: {accelerator: {memory_gib: 96}}\n",
    )
    s = load_scenario(top)
    assert s.model.name == "mixtral-8x7b" and s.model.experts == 16
    assert s.cluster.name == "dgx-h100" and s.cluster.accelerator.memory_gib == 96


def test_set_past_the_end_of_a_list_is_an_error(write) -> None:
    """--set on a list index that does not exist is reported, not silently ignored."""
    p = write(
        "ok.yaml",
        GOOD.replace("{dp: 8, ep: 8}", "{dp: 8, ep: 8, placement: [0, 1, 2, 3, 4, 5, 6, 7]}"),
    )
    errs = _errors(p, ("parallelism.placement.9=1",))
    assert errs == [
        "--set parallelism.placement.9=1: parallelism.placement[9]: no such list index: the list has 8 items"
    ]


def test_missing_include_is_located_at_the_include_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from moesim.errors import ScenarioError
    from moesim.loader import load_scenario

    f = tmp_path / "s.yaml"
    f.write_text("name: x\ninclude: [base.yaml, nothere.yaml]\n")
    (tmp_path / "base.yaml").write_text("seed: 1\n")
    try:
        load_scenario(f)
    except ScenarioError as exc:
        text = exc.render()
    else:
        raise AssertionError("a missing include passed")
    assert "s.yaml:2:" in text and "no such file: 'nothere.yaml'" in text


def test_set_with_broken_flow_yaml_says_so() -> None:
    from moesim.errors import ScenarioError
    from moesim.loader import load_scenario

    try:
        load_scenario("scenarios/quickstart.yaml", ["routing={kind: zipf"])
    except ScenarioError as exc:
        assert "not valid YAML" in exc.render() and "--set routing={kind: zipf" in exc.render()
    else:
        raise AssertionError("a broken --set value passed")
    # a quoted string that starts with a bracket is fine
    s = load_scenario("scenarios/quickstart.yaml", ['description="[draft] x"'])
    assert s.description == "[draft] x"


def test_changing_a_kind_by_set_explains_the_leftover_fields() -> None:
    from moesim.errors import ScenarioError
    from moesim.loader import load_scenario

    try:
        load_scenario("scenarios/quickstart.yaml", ["routing.kind=dirichlet", "routing.alpha=0.3"])
    except ScenarioError as exc:
        text = exc.render()
    else:
        raise AssertionError("a leftover zipf field passed")
    assert "routing.s: unknown key" in text and "replace the whole mapping" in text


def test_a_typo_in_a_preset_override_points_at_the_users_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A cluster of kind 'nodes' also has a field 'nodes': the union tag must not be taken
    for the field (the error once pointed into the catalog file)."""
    from moesim.errors import ScenarioError
    from moesim.loader import load_scenario

    body = "name: x\ncluster: {{preset: dgx-h100, {}}}\nmodel: mixtral-8x7b\nparallelism: {{dp: 8, ep: 8}}\nworkload: {{kind: layer, tokens: 64}}\n"
    for field, expected in (
        ("nodez: 2", "cluster.nodez: unknown key (did you mean 'nodes'?)"),
        ("nodes: 0", "cluster.nodes: must be >= 1, got 0"),
    ):
        f = tmp_path / "s.yaml"
        f.write_text(body.format(field))
        try:
            load_scenario(f)
        except ScenarioError as exc:
            text = exc.render()
        else:
            raise AssertionError(field)
        assert "s.yaml:2:" in text and expected in text and "catalog" not in text


def test_unknown_keys_from_set_are_located_at_the_set() -> None:
    from moesim.errors import ScenarioError
    from moesim.loader import load_scenario

    try:
        load_scenario("scenarios/quickstart.yaml", ["nosuch.field=1"])
    except ScenarioError as exc:
        text = exc.render()
    else:
        raise AssertionError("an unknown section passed")
    assert "--set nosuch.field=1: nosuch: unknown key" in text
