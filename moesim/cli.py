"""The ``moesim`` command line: run, check, schema, presets, show.

Heavy libraries (simpy, scipy, networkx, matplotlib) are imported only by the commands that
need them, so ``--help``, ``check`` and ``schema`` answer quickly. Scenario errors print as
``file:line:col: field.path: message`` on stderr and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moesim import __version__
from moesim.errors import ScenarioError

EXIT_SCENARIO_ERROR = 2
_FIT_MODELS = ("olmoe-1b-7b",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moesim",
        description="A discrete-event simulator of Mixture-of-Experts systems.",
    )
    p.add_argument("--version", action="version", version=f"moesim {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def scenario_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("scenario", help="scenario YAML file")
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="override a field, e.g. --set model.top_k=1 (repeatable; YAML values)",
        )
        sp.add_argument("--seed", type=int, default=None, help="override the scenario's seed")

    r = sub.add_parser("run", help="simulate a scenario and write a run folder")
    scenario_args(r)
    r.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="parent of run folders (default: the scenario's output.dir, 'reports')",
    )
    r.add_argument("--json", action="store_true", help="print only the summary JSON on stdout")
    r.add_argument("--no-write", action="store_true", help="do not write a run folder")
    r.add_argument(
        "--report",
        action="store_true",
        help="also write report.md with plots and the inputs' sources into the run folder",
    )

    cmp = sub.add_parser("compare", help="run two scenarios and show their summaries side by side")
    cmp.add_argument("a", help="scenario A")
    cmp.add_argument("b", help="scenario B")
    cmp.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="F=V",
        help="override applied to both scenarios (repeatable)",
    )
    cmp.add_argument("--seed", type=int, default=None)
    cmp.add_argument("--json", action="store_true", help="print both summaries as JSON")

    c = sub.add_parser("check", help="validate a scenario without running it")
    scenario_args(c)

    sc = sub.add_parser("schema", help="print the JSON Schema of the scenario language")
    sc.add_argument(
        "--resolved",
        action="store_true",
        help="the schema of a resolved scenario (a run folder's scenario.yaml) instead of "
        "the one of files as written (presets by name, include, hf_config)",
    )

    pr = sub.add_parser("presets", help="list the built-in presets")
    pr.add_argument(
        "kind", nargs="?", choices=["accelerators", "links", "switches", "clusters", "models"]
    )

    ca = sub.add_parser("calibrate", help="measure a device and fit a cost-model profile")
    ca.add_argument(
        "--backend",
        choices=["numpy", "torch"],
        help="measure this host (numpy) or a CUDA GPU (torch)",
    )
    ca.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE.jsonl",
        help="fit from measurements taken elsewhere (e.g. on a GPU machine)",
    )
    ca.add_argument(
        "--size",
        choices=["ci", "full"],
        default="full",
        help="numpy: how much to measure (ci: under a minute)",
    )
    ca.add_argument("--out", metavar="PROFILE.yaml", help="where to write the profile")
    ca.add_argument("--measurements", metavar="FILE.jsonl", help="also keep the raw records")
    ca.add_argument(
        "--fit-models",
        default=",".join(_FIT_MODELS),
        help="models whose measured layers fit the routing glue (held out of the fidelity report)",
    )
    ca.add_argument(
        "--collectives",
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="measured collectives to fit as well (repeatable)",
    )
    ca.add_argument("--seed", type=int, default=0, help="seed of the measured inputs")

    fi = sub.add_parser("fidelity", help="predicted vs measured MoE layers (held-out shapes)")
    fi.add_argument("--backend", choices=["numpy"], help="measure held-out layers on this host")
    fi.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE.jsonl",
        help="use layers measured elsewhere (moesim.calibrate.torch_bench)",
    )
    fi.add_argument(
        "--size",
        choices=["ci", "full"],
        default="full",
        help="numpy: how many held-out layers to measure (ci: under a minute)",
    )
    fi.add_argument(
        "--profile",
        metavar="PROFILE.yaml",
        help="the profile to predict with (default: the device's shipped one)",
    )
    fi.add_argument(
        "--exclude", default=",".join(_FIT_MODELS), help="models to leave out (the calibration set)"
    )
    fi.add_argument("--markdown", metavar="FILE.md", help="write the table as Markdown")
    fi.add_argument("--measurements", metavar="FILE.jsonl", help="keep the raw records")
    fi.add_argument("--title", help="title of the Markdown section")
    fi.add_argument(
        "--seed", type=int, default=0, help="first seed of the simulator's routing samples"
    )

    sh = sub.add_parser("show", help="show one preset with its derived figures")
    sh.add_argument("kind", choices=["accelerator", "link", "switch", "cluster", "model"])
    sh.add_argument("name")

    sw = sub.add_parser(
        "sweep", help="run many variants of a scenario (resumable), with a Pareto front"
    )
    sw.add_argument("sweep", help="sweep file (YAML): base scenario, grid/zip, metrics")
    sw.add_argument("--workers", type=int, help="runs at once (default: the file's workers)")
    sw.add_argument("--out", help="parent of sweeps/<name>/ (default: the file's output_dir)")
    sw.add_argument("--fresh", action="store_true", help="rerun points already finished")
    sw.add_argument("--quiet", action="store_true", help="no progress lines")

    cap = sub.add_parser(
        "capacity", help="the highest arrival rate a serving scenario sustains within its SLO"
    )
    scenario_args(cap)
    cap.add_argument("--target", type=float, default=0.99, help="share of requests within SLO")
    cap.add_argument("--start-rate", type=float, help="first rate tried (default: the file's)")
    cap.add_argument("--max-rate", type=float, default=1e4, help="stop growing at this rate")
    cap.add_argument("--tolerance", type=float, default=0.05, help="relative bracket width")
    cap.add_argument(
        "--seeds", type=int, default=1, help="arrival samples a rate must pass (worst counts)"
    )
    cap.add_argument("--json", action="store_true", help="print the probes as JSON")

    im = sub.add_parser(
        "import-model",
        help="turn a Hugging Face config.json into a model definition (YAML) with its figures",
    )
    im.add_argument(
        "config",
        help="path to a config.json (mixtral, qwen2_moe, qwen3_moe, "
        "deepseek_v2, deepseek_v3, olmoe, dbrx)",
    )
    im.add_argument("--name", help="model name (default: the config's folder name)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = {
            "run": _run,
            "check": _check,
            "schema": _schema,
            "presets": _presets,
            "show": _show,
            "calibrate": _calibrate,
            "compare": _compare,
            "fidelity": _fidelity,
            "import-model": _import_model,
            "sweep": _sweep,
            "capacity": _capacity,
        }[args.command]
        return handler(args)
    except ScenarioError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_SCENARIO_ERROR
    except BrokenPipeError:  # e.g. `moesim schema | head`
        return 0


def _load(args: argparse.Namespace) -> Any:
    from moesim.loader import load_scenario

    return load_scenario(args.scenario, args.overrides, args.seed)


def _run(args: argparse.Namespace) -> int:
    from moesim.api import run

    scenario = _load(args)
    result = run(scenario)
    run_dir = None if args.no_write else result.write(args.out)
    if args.report and run_dir is None:
        print("moesim: --report needs a run folder; ignored with --no-write", file=sys.stderr)
    if run_dir is not None and args.report:
        result.write_report(run_dir)
    if args.json:
        print(json.dumps(result.summary, indent=2, sort_keys=True))
        if run_dir is not None:
            print(f"run folder: {run_dir}", file=sys.stderr)
    else:
        print(result.table())
        from moesim.energy.summary import energy_lines

        if result.summary.get("energy"):
            print(energy_lines(result.summary))
        if result.summary.get("failures"):
            from moesim.report.failures import failures_lines

            print(failures_lines(result.summary))
        if run_dir is not None:
            print(f"\nrun folder: {run_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from moesim.api import run
    from moesim.loader import load_scenario
    from moesim.report.compare import compare_table

    a = load_scenario(args.a, args.overrides, args.seed)
    b = load_scenario(args.b, args.overrides, args.seed)
    sa, sb = run(a).summary, run(b).summary
    if args.json:
        print(json.dumps({"a": sa, "b": sb}, indent=2, sort_keys=True))
    else:
        print(compare_table(sa, sb, f"A: {args.a}", f"B: {args.b}"))
    return 0


def _check(args: argparse.Namespace) -> int:
    s = _load(args)
    print(f"{args.scenario}: ok ({s.model.name} on {s.cluster.name}, workload {s.workload.kind})")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from moesim.config.schema import authoring_schema, resolved_schema

    schema = resolved_schema() if args.resolved else authoring_schema()
    print(json.dumps(schema, indent=2))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from moesim import catalog

    kinds = [args.kind] if args.kind else list(catalog.KINDS)
    for kind in kinds:
        print(f"{kind}:")
        for name in catalog.names(kind):
            src = str(catalog.raw_preset(kind, name).get("source", ""))
            print(f"  {name:<22} {textwrap.shorten(src, 90, placeholder=' ...')}")
    return 0


def _split(text: str) -> list[str]:
    return [t for t in (x.strip() for x in text.split(",")) if t]


def _calibrate(args: argparse.Namespace) -> int:
    from moesim.calibrate.commands import calibrate

    return calibrate(
        args.backend,
        args.size,
        args.out,
        args.measurements,
        args.from_file,
        _split(args.fit_models),
        args.collectives,
        args.seed,
    )


def _fidelity(args: argparse.Namespace) -> int:
    from moesim.calibrate.commands import fidelity

    return fidelity(
        args.backend,
        args.size,
        args.profile,
        args.from_file,
        _split(args.exclude),
        args.markdown,
        args.measurements,
        args.seed,
        args.title,
    )


def _show(args: argparse.Namespace) -> int:
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
        _show_model(raw)
    elif args.kind == "cluster":
        _show_cluster(args.name)
    else:
        print(json.dumps(raw, indent=2))
    return 0


def _capacity(args: argparse.Namespace) -> int:
    from moesim.sweep.capacity import Probe, capacity_table, find_capacity

    if not 0 < args.target <= 1 or args.tolerance <= 0 or args.seeds < 1:
        print(
            "moesim: --target must be in (0, 1], --tolerance > 0 and --seeds >= 1",
            file=sys.stderr,
        )
        return EXIT_SCENARIO_ERROR
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])

    def progress(p: Probe) -> None:
        if not args.json:
            state = "ok" if p.feasible else "misses the SLO"
            print(
                f"  {p.rate_per_s:.4g} req/s: {p.attainment:.1%} within SLO, {state}",
                file=sys.stderr,
                flush=True,
            )

    result = find_capacity(
        args.scenario,
        overrides,
        args.target,
        args.start_rate,
        args.max_rate,
        args.tolerance,
        progress,
        args.seeds,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "target": result.target,
                    "capacity_rate_per_s": result.best.rate_per_s if result.best else None,
                    "probes": [
                        {
                            "rate_per_s": p.rate_per_s,
                            "feasible": p.feasible,
                            "slo_attainment": p.attainment,
                            "summary": p.summary,
                        }
                        for p in result.probes
                    ],
                },
                indent=2,
                sort_keys=True,
            )
        )
    else:
        print(capacity_table(result))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from moesim.sweep import run_sweep
    from moesim.sweep.report import pareto_plot, sweep_table

    if args.workers is not None and args.workers < 1:
        print("moesim: --workers must be >= 1", file=sys.stderr)
        return EXIT_SCENARIO_ERROR

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        result = run_sweep(
            args.sweep, args.workers, args.out, args.fresh, None if args.quiet else progress
        )
    except KeyboardInterrupt:
        print(
            "\nmoesim: interrupted; finished points are saved, run again to resume", file=sys.stderr
        )
        return 130
    print(sweep_table(result))
    if pareto_plot(result, result.folder / "pareto.png"):
        print(f"Pareto plot: {result.folder / 'pareto.png'}")
    return 0


def _import_model(args: argparse.Namespace) -> int:
    """Print the model a config.json maps to as YAML (paste it under ``model:``, or write
    ``model: {hf_config: PATH}``), then its derived figures as comments."""
    import yaml
    from pydantic import ValidationError

    from moesim.config.model import ModelConfig
    from moesim.loader.hf_model import HFConfigError, model_from_hf_config

    path = Path(args.config)
    try:
        cfg = json.loads(path.read_text("utf-8"))
        name = args.name or path.resolve().parent.name or path.stem
        fields, _notes = model_from_hf_config(cfg, name, f"Hugging Face config.json: {path}")
        ModelConfig.model_validate(fields)
    except OSError as exc:
        print(f"moesim: {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_SCENARIO_ERROR
    except (ValueError, HFConfigError, ValidationError) as exc:
        print(f"moesim: {path}: {exc}", file=sys.stderr)
        return EXIT_SCENARIO_ERROR
    print(yaml.safe_dump(fields, sort_keys=False), end="")
    print("# derived:")
    _show_model(fields, prefix="#   ")
    return 0


def _show_model(raw: dict[str, Any], prefix: str = "") -> None:
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


def _show_cluster(name: str) -> None:
    from pydantic import TypeAdapter

    from moesim.config.cluster import ClusterConfig, NodesCluster, TorusCluster
    from moesim.loader.resolve import expand_presets

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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
