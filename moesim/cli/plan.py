"""``moesim plan``: the cheapest configurations that serve a load within an SLO."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from moesim.errors import EXIT_INTERRUPTED, EXIT_SCENARIO_ERROR


def add_parser(sub: Any, scenario_args: Any) -> None:
    """Register ``plan`` on the command line's subparsers."""
    p = sub.add_parser(
        "plan",
        help="search device count, accelerator and layout for the cheapest feasible serving",
    )
    scenario_args(p)
    p.add_argument("--rate", type=float, required=True, help="offered requests per second")
    p.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="ttft_ms=X,tpot_ms=Y",
        help="p99 targets (repeatable or comma-separated); default: the scenario's workload.slo",
    )
    p.add_argument(
        "--devices",
        default=None,
        help="device counts to search, e.g. 4,8,16 (default: powers of two to 8 nodes)",
    )
    p.add_argument(
        "--accelerators",
        default=None,
        help="accelerator presets, e.g. h100-sxm,h200-sxm (default: the scenario's)",
    )
    p.add_argument(
        "--layouts",
        choices=["auto", "all"],
        default="auto",
        help="auto (default): every tp with the largest ep; all: every ep too",
    )
    p.add_argument(
        "--etp",
        default="1",
        help="expert tensor-parallel degrees to search, e.g. 1,2 (default 1: whole experts)",
    )
    p.add_argument("--engines", default=None, help="serving engine presets to search")
    p.add_argument(
        "--capacity-factors", default=None, help="capacity factors to search, e.g. 1.0,1.25,null"
    )
    p.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="ACCELERATOR=USD_PER_HOUR",
        help="price of one device-hour, to rank by cost (repeatable)",
    )
    p.add_argument(
        "--beyond",
        type=int,
        default=0,
        help="device counts simulated past the first one with a feasible configuration (default 0)",
    )
    p.add_argument(
        "--top", type=int, default=5, help="configurations shown per ranking (default 5)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="simulations at once (default: the CPUs)"
    )
    p.add_argument("--out", default="reports", help="parent of plans/<name>/ (default reports)")
    p.add_argument("--fresh", action="store_true", help="rerun candidates already simulated")
    p.add_argument("--json", action="store_true", help="print plan.json instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress")


def _floats(text: str | None) -> list[Any]:
    if text is None:
        return ["base"]
    out: list[Any] = []
    for x in text.split(","):
        out.append(None if x.strip().lower() in ("null", "none") else float(x))
    return out


def plan(args: argparse.Namespace) -> int:
    from moesim.sweep.plan_run import plan_table, run_plan

    slo: dict[str, float] = {}
    prices: dict[str, float] = {}
    try:
        for item in ",".join(args.slo).split(","):
            if item.strip():
                k, _, v = item.partition("=")
                if k.strip() not in ("ttft_ms", "tpot_ms"):
                    raise ValueError(f"--slo: unknown target {k.strip()!r} (ttft_ms, tpot_ms)")
                slo[k.strip()] = float(v)
        for item in args.price:
            k, _, v = item.partition("=")
            prices[k.strip()] = float(v)
        devices = [int(x) for x in args.devices.split(",")] if args.devices else []
        etps = [int(x) for x in args.etp.split(",")]
        cfs = _floats(args.capacity_factors)
        workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
        if args.rate <= 0 or workers < 1 or any(d < 1 for d in [*devices, *etps]):
            raise ValueError("--rate must be > 0, --workers, --devices and --etp >= 1")
    except ValueError as exc:
        print(f"moesim: {exc}", file=sys.stderr)
        return EXIT_SCENARIO_ERROR
    if not slo:
        from moesim.loader import load_scenario

        w = load_scenario(
            args.scenario, args.overrides, allow_paths=args.allow_paths, limits=args.limits
        ).workload
        target = getattr(w, "slo", None)
        if target is not None:
            slo = {"ttft_ms": target.ttft_ms, "tpot_ms": target.tpot_ms}
    progress = None
    bar = None
    if not args.quiet:
        from moesim.report.progress import Progress

        bar = Progress("plan")
        progress = bar.message
    try:
        result = run_plan(
            args.scenario,
            args.rate,
            slo.get("ttft_ms"),
            slo.get("tpot_ms"),
            overrides=[*args.overrides, *([f"seed={args.seed}"] if args.seed is not None else [])],
            accelerators=args.accelerators.split(",") if args.accelerators else (),
            devices=devices,
            layouts=args.layouts,
            etps=etps,
            engines=args.engines.split(",") if args.engines else (None,),
            capacity_factors=cfs,
            prices=prices,
            workers=workers,
            out=args.out,
            fresh=args.fresh,
            beyond=args.beyond,
            progress=progress,
            allow_paths=args.allow_paths,
            limits=args.limits,
        )
    except KeyboardInterrupt:
        print(
            "\nmoesim: interrupted; simulated candidates are saved, run again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print((result.folder / "plan.json").read_text(), end="")
    else:
        print(plan_table(result, args.top))
    return 0
