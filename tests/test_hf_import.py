"""Hugging Face config.json import: it reproduces the curated catalog presets, and bad
configs give located errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesim import catalog
from moesim.cli import main
from moesim.config.model import ModelConfig
from moesim.errors import ScenarioError
from moesim.loader import load_scenario
from moesim.loader.hf_model import HFConfigError, model_from_hf_config

HF = Path(__file__).parent / "data" / "hf"
PRESETS = sorted(p.name for p in HF.iterdir() if p.is_dir())
IGNORED = {"name", "source", "sources"}


def _shape(m: ModelConfig) -> dict[str, object]:
    return {k: v for k, v in m.model_dump().items() if k not in IGNORED}


@pytest.mark.parametrize("preset", PRESETS)
def test_import_reproduces_the_catalog_preset(preset: str) -> None:
    cfg = json.loads((HF / preset / "config.json").read_text())
    fields, _ = model_from_hf_config(cfg, preset, "test")
    imported = ModelConfig.model_validate(fields)
    curated = ModelConfig.model_validate({"name": preset, **catalog.raw_preset("models", preset)})
    assert _shape(imported) == _shape(curated)


def test_deepseek_v3_notes_the_mtp_module() -> None:
    cfg = json.loads((HF / "deepseek-v3" / "config.json").read_text())
    _, notes = model_from_hf_config(cfg, "v3", "test")
    assert any("multi-token prediction" in n for n in notes)


def test_unsupported_and_missing_keys_are_named() -> None:
    with pytest.raises(HFConfigError, match="key 'model_type' is not a supported one"):
        model_from_hf_config({"model_type": "llama"}, "x", "t")
    cfg = json.loads((HF / "mixtral-8x7b" / "config.json").read_text())
    del cfg["num_local_experts"]
    with pytest.raises(HFConfigError, match="missing key 'num_local_experts'"):
        model_from_hf_config(cfg, "x", "t")
    cfg = json.loads((HF / "qwen1.5-moe-a2.7b" / "config.json").read_text())
    cfg["mlp_only_layers"] = [3, 7]
    with pytest.raises(HFConfigError, match="only leading dense blocks"):
        model_from_hf_config(cfg, "x", "t")


def test_qwen_leading_dense_layers_map_to_first_dense_layers() -> None:
    cfg = json.loads((HF / "qwen1.5-moe-a2.7b" / "config.json").read_text())
    cfg["mlp_only_layers"] = [0, 1]
    fields, _ = model_from_hf_config(cfg, "x", "t")
    m = ModelConfig.model_validate(fields)
    assert m.first_dense_layers == 2 and m.dense_d_ff == 5632


def _scenario(tmp_path: Path, model: str) -> Path:
    f = tmp_path / "s.yaml"
    f.write_text(
        "name: hf\ncluster: dgx-h100\n"
        f"model: {model}\n"
        "parallelism: {dp: 8, ep: 8}\nworkload: {kind: layer, tokens: 64}\n"
    )
    return f


def test_scenario_names_a_config_and_overrides_win(tmp_path: Path) -> None:
    (tmp_path / "mx").mkdir()
    (tmp_path / "mx" / "config.json").write_text((HF / "mixtral-8x7b" / "config.json").read_text())
    s = load_scenario(_scenario(tmp_path, "{hf_config: mx/config.json, experts: 16}"))
    assert s.model.name == "mx" and s.model.experts == 16 and s.model.kv_heads == 8
    assert "mx/config.json" in s.model.source


def test_bad_config_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64}))
    with pytest.raises(ScenarioError) as exc:
        load_scenario(_scenario(tmp_path, "{hf_config: bad.json}"))
    text = exc.value.render()
    assert "s.yaml:3" in text and "model.hf_config" in text and "missing key" in text
    with pytest.raises(ScenarioError, match=r"nowhere\.json"):
        load_scenario(_scenario(tmp_path, "{hf_config: nowhere.json}"))


def test_import_model_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import-model", str(HF / "olmoe-1b-7b" / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "experts: 64" in out and "total params" in out and "6.9" in out
    assert main(["import-model", str(HF / "nowhere.json")]) == 2
