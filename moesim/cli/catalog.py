"""The catalog commands: schema, presets, show, import-model."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from moesim.errors import EXIT_SCENARIO_ERROR


def schema(args: argparse.Namespace) -> int:
    from moesim.loader.schema import authoring_schema, resolved_schema

    schema = resolved_schema() if args.resolved else authoring_schema()
    print(json.dumps(schema, indent=2))
    return 0


def presets(args: argparse.Namespace) -> int:
    from moesim import catalog

    kinds = [args.kind] if args.kind else list(catalog.KINDS)
    for kind in kinds:
        print(f"{kind}:")
        for name in catalog.names(kind):
            src = str(catalog.raw_preset(kind, name).get("source", ""))
            print(f"  {name:<22} {textwrap.shorten(src, 90, placeholder=' ...')}")
    return 0


def show(args: argparse.Namespace) -> int:
    from moesim import catalog

    kind = {
        "accelerator": "accelerators",
        "link": "links",
        "switch": "switches",
        "cluster": "clusters",
        "model": "models",
    }[args.kind]
    if args.name not in catalog.names(kind):  # type: ignore[arg-type]
        import difflib

        close = difflib.get_close_matches(args.name, catalog.names(kind), n=1)  # type: ignore[arg-type]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(
            f"moesim: unknown {args.kind} {args.name!r}{hint}; see `moesim presets {kind}`",
            file=sys.stderr,
        )
        return EXIT_SCENARIO_ERROR
    raw = catalog.raw_preset(kind, args.name)  # type: ignore[arg-type]
    if args.kind == "model":
        show_model(raw)
    elif args.kind == "cluster":
        show_cluster(args.name)
    else:
        print(json.dumps(raw, indent=2))
    return 0


def import_model(args: argparse.Namespace) -> int:
    """Print the model a config.json maps to as YAML (paste it under ``model:``, or write
    ``model: {hf_config: PATH}``), then its derived figures as comments."""
    import yaml
    from pydantic import ValidationError

    from moesim.config.model import ModelConfig
    from moesim.errors import Location
    from moesim.loader.attachments import hf_model_fields
    from moesim.loader.files import MAX_JSON_BYTES, read_input
    from moesim.loader.hf_model import HFConfigError

    path = Path(args.config)
    raw = read_input(path, MAX_JSON_BYTES, Location(str(path)), "")  # located ScenarioError
    try:
        name = args.name or path.resolve().parent.name or path.stem
        fields, _notes = hf_model_fields(raw, name, str(path))
        ModelConfig.model_validate(fields)
    except (HFConfigError, ValidationError) as exc:
        print(f"moesim: {path}: {exc}", file=sys.stderr)
        return EXIT_SCENARIO_ERROR
    print(yaml.safe_dump(fields, sort_keys=False), end="")
    print("# derived:")
    show_model(fields, prefix="#   ")
    return 0


def show_model(raw: dict[str, Any], prefix: str = "") -> None:
    from moesim.config.model import ModelConfig
    from moesim.derived.model_figures import figures

    m = ModelConfig.model_validate(raw)
    f = figures(m)
    gib = 1024**3
    rows = [
        ("model", m.name),
        ("source", m.source),
        ("layers", f"{m.layers} ({f.moe_layers} MoE, {f.dense_layers} dense)"),
        ("d_model / expert d_ff", f"{m.d_model} / {m.expert_d_ff}"),
        ("experts / top_k / shared", f"{m.experts} / {m.top_k} / {m.shared_experts}"),
        ("attention", f"{m.attention}, {m.heads} heads"),
        ("total params", f"{f.total_params / 1e9:.2f} B"),
        ("active params", f"{f.active_params / 1e9:.2f} B"),
        (
            "FLOPs / token (fwd)",
            f"{f.flops_per_token_forward / 1e9:.2f} GFLOP "
            f"(+{f.head_flops_per_token / 1e9:.2f} output head)",
        ),
        ("weight bytes", f"{f.weight_bytes / gib:.2f} GiB ({m.dtype})"),
        ("one expert", f"{f.expert_params / 1e6:.2f} M params, {f.expert_bytes / 2**20:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{prefix}{k.ljust(width)}  {v}" for k, v in rows))


def show_cluster(name: str) -> None:
    from pydantic import TypeAdapter

    from moesim.config.cluster import ClusterConfig, NodesCluster, TorusCluster
    from moesim.loader.presets import expand_presets

    data: dict[str, Any] = {"cluster": name}
    expand_presets(data, {})
    c = TypeAdapter(ClusterConfig).validate_python(data["cluster"])
    rows = [
        ("cluster", c.name),
        ("source", c.source),
        ("devices", str(c.devices)),
        ("accelerator", c.accelerator.name),
    ]
    from moesim.catalog.hardware import link

    a = c.accelerator
    bf16 = a.peak_tflops.for_dtype("bf16")
    rows += [
        (
            "per device",
            f"{a.memory_gib:g} GiB at {a.memory_bandwidth_gbps:g} GB/s, {bf16:g} TFLOPS bf16 "
            f"dense, {a.tdp_w:g} W TDP",
        ),
        (
            "in total",
            f"{c.devices * a.memory_gib / 1024:.4g} TiB, {c.devices * bf16 / 1000:.4g} PFLOPS "
            f"bf16, {c.devices * a.tdp_w / 1000:.4g} kW of device TDP",
        ),
    ]
    if a.ports:
        up = sum(p.count * link(p.link).bandwidth_gbps for p in a.ports)
        ports = " + ".join(f"{p.count} x {p.link}" for p in a.ports)
        rows.append(("scale-up links", f"{ports} = {up:g} GB/s per direction per device"))
    if a.host_link:
        hl = link(a.host_link)
        eff = hl.effective_bandwidth_gbps
        measured = f" ({eff:g} GB/s measured)" if eff else ""
        rows.append(("host link", f"{a.host_link}: {hl.bandwidth_gbps:g} GB/s{measured}"))
    if isinstance(c, NodesCluster):
        rows += [
            ("nodes", f"{c.nodes} x {c.accelerators_per_node}"),
            ("scale-up", f"{c.scale_up.kind} {c.scale_up.switch or ''}"),
        ]
        if c.fabric.kind == "none" or not c.fabric.nic:
            rows.append(("fabric", "none (a single node)"))
        else:
            nic = link(c.fabric.nic).bandwidth_gbps
            per_dev = nic * c.fabric.nics_per_node / c.accelerators_per_node
            rows.append(
                (
                    "fabric",
                    f"{c.fabric.kind} ({c.fabric.switch}), {c.fabric.nics_per_node} x "
                    f"{c.fabric.nic} per node = {per_dev:g} GB/s per device, "
                    f"oversubscription {c.fabric.oversubscription:g}",
                )
            )
    elif isinstance(c, TorusCluster):
        ici = link(c.link).bandwidth_gbps * c.links_per_neighbor
        rows += [
            ("torus", " x ".join(map(str, c.dims)) + (" (wraparound)" if c.wraparound else "")),
            ("link", f"{c.link} x {c.links_per_neighbor} = {ici:g} GB/s per neighbour"),
        ]
    h = c.host
    rows.append(
        (
            "host",
            f"{h.dram_gib:g} GiB DRAM at {h.dram_bandwidth_gbps:g} GB/s, NVMe {h.nvme_tib:g} "
            f"TiB ({h.nvme_read_gbps:g} GB/s read)",
        )
    )
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
