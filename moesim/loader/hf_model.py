"""A model definition from a Hugging Face ``config.json``.

``model_from_hf_config`` maps the keys of the MoE architectures that transformers ships
(``model_type``: mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, olmoe, dbrx) onto
:class:`moesim.config.model.ModelConfig` fields, and says what it could not represent.
Plain data in, plain data out: the loader validates the result like any model mapping, so
overrides given beside ``hf_config:`` win, and the errors of a bad config point at the
scenario line that names it.

What each architecture's keys mean follows the transformers configuration classes
(``MixtralConfig``, ``Qwen2MoeConfig``, ``Qwen3MoeConfig``, ``DeepseekV2Config``,
``DeepseekV3Config``, ``OlmoeConfig``, ``DbrxConfig``): the FFNs of all of them are gated
(``act(x W1) * (x W3)``), so a ``silu`` activation is ``swiglu`` and ``gelu`` is ``geglu``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "dbrx")

_GATED_ACT = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_new": "geglu"}
_TORCH_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class HFConfigError(ValueError):
    """A config.json that cannot be turned into a model; the message names the keys."""


def _get(cfg: Mapping[str, Any], key: str, kind: type | tuple[type, ...] = int) -> Any:
    if key not in cfg:
        raise HFConfigError(f"missing key {key!r}")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise HFConfigError(f"key {key!r} must be {want}, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """What a value is, without echoing it (the file's contents stay out of messages)."""
    return {bool: "a boolean", str: "a string", float: "a number", int: "an integer"}.get(
        type(value), "a list" if isinstance(value, list) else "a mapping or null"
    )


def _activation(name: Any, key: str) -> str:
    if not isinstance(name, str) or name not in _GATED_ACT:
        raise HFConfigError(
            f"key {key!r}: the activation is not one of {', '.join(sorted(_GATED_ACT))}"
        )
    return _GATED_ACT[name]


def _dtype(cfg: Mapping[str, Any]) -> str:
    quant = cfg.get("quantization_config")
    if isinstance(quant, Mapping) and quant.get("quant_method") == "fp8":
        return "fp8"
    raw = cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))
    return _TORCH_DTYPE.get(str(raw), "bf16")


def _attention(cfg: Mapping[str, Any], heads: int, d_model: int, out: dict[str, Any]) -> None:
    """MHA or GQA from the key/value head count; head_dim only where it differs."""
    kv = cfg.get("num_key_value_heads") or heads
    out["attention"] = "gqa" if kv < heads else "mha"
    if kv < heads:
        out["kv_heads"] = kv
    head_dim = cfg.get("head_dim")
    if isinstance(head_dim, int) and head_dim != d_model // heads:
        out["head_dim"] = head_dim


def _common(cfg: Mapping[str, Any]) -> dict[str, Any]:
    d_model = _get(cfg, "hidden_size")
    heads = _get(cfg, "num_attention_heads")
    out: dict[str, Any] = {
        "layers": _get(cfg, "num_hidden_layers"),
        "d_model": d_model,
        "vocab_size": _get(cfg, "vocab_size"),
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "dtype": _dtype(cfg),
        "heads": heads,
        "activation": _activation(cfg.get("hidden_act", "silu"), "hidden_act"),
    }
    return out


def _experts(cfg: Mapping[str, Any], count: str, width: str) -> dict[str, Any]:
    """Routed experts, top-k and expert width from the architecture's key names."""
    return {
        "experts": _get(cfg, count),
        "top_k": _get(cfg, "num_experts_per_tok"),
        "expert_d_ff": _get(cfg, width),
    }


def _mixtral(cfg: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    out = _common(cfg)
    out.update(_experts(cfg, "num_local_experts", "intermediate_size"))
    _attention(cfg, out["heads"], out["d_model"], out)
    return out


def _sparse_step(cfg: Mapping[str, Any], out: dict[str, Any], notes: list[str]) -> None:
    """Qwen's ``decoder_sparse_step`` and ``mlp_only_layers`` as frequency / leading dense."""
    step = cfg.get("decoder_sparse_step", 1) or 1
    out["moe_layer_frequency"] = step
    dense_only = sorted(set(cfg.get("mlp_only_layers") or []))
    if dense_only:
        if step != 1 or dense_only != list(range(len(dense_only))):
            raise HFConfigError(
                "mlp_only_layers with decoder_sparse_step: only leading "
                "dense blocks (0, 1, ..., k-1) with every later block MoE can be represented"
            )
        out["first_dense_layers"] = len(dense_only)
    if step != 1 or dense_only:
        out["dense_d_ff"] = _get(cfg, "intermediate_size")


def _qwen2_moe(cfg: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    out = _common(cfg)
    out.update(
        **_experts(cfg, "num_experts", "moe_intermediate_size"),
        attention_bias=True,
    )
    shared = cfg.get("shared_expert_intermediate_size") or 0
    if shared:
        out.update(shared_experts=1, shared_expert_d_ff=shared, shared_expert_gate=True)
    _sparse_step(cfg, out, notes)
    _attention(cfg, out["heads"], out["d_model"], out)
    return out


def _qwen3_moe(cfg: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    out = _common(cfg)
    out.update(
        **_experts(cfg, "num_experts", "moe_intermediate_size"),
        attention_bias=bool(cfg.get("attention_bias", False)),
    )
    _sparse_step(cfg, out, notes)
    _attention(cfg, out["heads"], out["d_model"], out)
    notes.append(
        "qwen3_moe: the per-head q/k RMSNorms (head_dim scales each) are not counted "
        "(moesim's qk_norm means norms over the full q and k widths, as OLMoE has)"
    )
    return out


def _deepseek(cfg: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    out = _common(cfg)
    out.update(
        **_experts(cfg, "n_routed_experts", "moe_intermediate_size"),
        attention="mla",
        kv_lora_rank=_get(cfg, "kv_lora_rank"),
        qk_nope_head_dim=_get(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=_get(cfg, "qk_rope_head_dim"),
        v_head_dim=_get(cfg, "v_head_dim"),
        router="sigmoid" if cfg.get("scoring_func", "softmax") == "sigmoid" else "softmax",
        expert_bias=cfg.get("topk_method") == "noaux_tc",
    )
    if cfg.get("q_lora_rank"):
        out["q_lora_rank"] = cfg["q_lora_rank"]
    shared = cfg.get("n_shared_experts") or 0
    if shared:
        out["shared_experts"] = shared
    first = cfg.get("first_k_dense_replace", 0) or 0
    freq = cfg.get("moe_layer_freq", 1) or 1
    if first or freq != 1:
        out.update(first_dense_layers=first, moe_layer_frequency=freq)
        out["dense_d_ff"] = _get(cfg, "intermediate_size")
    groups, limited = cfg.get("n_group"), cfg.get("topk_group")
    if isinstance(groups, int) and isinstance(limited, int) and groups > 1:
        out.update(expert_groups=groups, topk_groups=limited)
    if cfg.get("num_nextn_predict_layers"):
        notes.append(
            f"{cfg['model_type']}: the {cfg['num_nextn_predict_layers']} multi-token "
            "prediction layer(s) (num_nextn_predict_layers) are not part of the model"
        )
    return out


def _olmoe(cfg: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    out = _common(cfg)
    out.update(
        **_experts(cfg, "num_experts", "intermediate_size"),
        qk_norm=True,
    )
    _attention(cfg, out["heads"], out["d_model"], out)
    return out


def _dbrx(cfg: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    ffn = _get(cfg, "ffn_config", dict)
    attn = _get(cfg, "attn_config", dict)
    heads = _get(cfg, "n_heads")
    d_model = _get(cfg, "d_model")
    act = ffn.get("ffn_act_fn", {"name": "silu"})
    out: dict[str, Any] = {
        "layers": _get(cfg, "n_layers"),
        "d_model": d_model,
        "vocab_size": _get(cfg, "vocab_size"),
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "dtype": _dtype(cfg),
        "heads": heads,
        "experts": _get(ffn, "moe_num_experts"),
        "top_k": _get(ffn, "moe_top_k"),
        "expert_d_ff": _get(ffn, "ffn_hidden_size"),
        "activation": _activation(
            act.get("name") if isinstance(act, Mapping) else act, "ffn_config.ffn_act_fn"
        ),
    }
    kv = attn.get("kv_n_heads", heads)
    out["attention"] = "gqa" if kv < heads else "mha"
    if kv < heads:
        out["kv_heads"] = kv
    return out


_BUILDERS: dict[str, Callable[[Mapping[str, Any], list[str]], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "olmoe": _olmoe,
    "dbrx": _dbrx,
}


def model_from_hf_config(
    cfg: Mapping[str, Any], name: str, source: str
) -> tuple[dict[str, Any], list[str]]:
    """Model fields (plain data, to be validated as a ModelConfig) and notes on what the
    mapping left out. Raises :class:`HFConfigError` naming the offending key."""
    if not isinstance(cfg, Mapping):
        raise HFConfigError("a config.json must hold a JSON object")
    kind = cfg.get("model_type")
    if kind not in _BUILDERS:
        raise HFConfigError(f"key 'model_type' is not a supported one: {', '.join(SUPPORTED)}")
    notes: list[str] = []
    out = _BUILDERS[kind](cfg, notes)
    data = {"name": name, "source": source, **out}
    return data, notes
