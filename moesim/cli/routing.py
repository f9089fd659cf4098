"""The ``moesim routing`` commands: ``stats TRACE`` (popularity, entropy, skew, cross-layer
correlation, reuse distance and the LRU curve) and ``fit TRACE`` (a ``routing: {kind:
logits}`` section fitted to the trace, printed as YAML)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from moesim.errors import EXIT_SCENARIO_ERROR

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

    from moesim.config.routing import LogitsRouting
    from moesim.routing.trace import TraceInfo


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ro = sub.add_parser(
        "routing", help="statistics of a routing trace, or a logits model fitted to it"
    )
    verbs = ro.add_subparsers(dest="routing_command", required=True)
    st = verbs.add_parser("stats", help="popularity, entropy, skew, correlation, reuse distance")
    st.add_argument("trace", help="a routing trace (.jsonl or .npz; docs/routing.md)")
    st.add_argument(
        "--tokens", type=int, default=4096, help="tokens used for correlation and reuse"
    )
    st.add_argument("--json", action="store_true", help="print the figures as JSON")
    fi = verbs.add_parser("fit", help="fit routing: {kind: logits} to a trace (prints YAML)")
    fi.add_argument("trace", help="a routing trace (.jsonl or .npz; docs/routing.md)")
    fi.add_argument("--tokens", type=int, default=32768, help="tokens whose curve is matched")
    fi.add_argument("--shared-bias", action="store_true", help="one bias row for every layer")
    fi.add_argument("--seed", type=int, default=0, help="seed of the model's draws while fitting")
    fi.add_argument(
        "--independent",
        action="store_true",
        help="independent tokens: no token correlation (bias and noise only)",
    )
    fi.add_argument(
        "--phases",
        action="store_true",
        help="fit prefill and decode tokens separately (told apart by the trace's step:"
        " a step of at most --decode-step-tokens tokens is decode); prints routing.decode",
    )
    fi.add_argument(
        "--decode-step-tokens",
        type=int,
        default=1,
        help="with --phases: the most tokens a decode step holds (one per sequence)",
    )
    fi.add_argument(
        "--hold-out",
        choices=("halves", "blocks"),
        help="fit on part of the tokens and check the curve on the rest: halves (the first"
        " half, then the second) or blocks (alternate blocks of 128 tokens)",
    )


def routing(args: argparse.Namespace) -> int:
    from moesim.routing.trace import TraceCursor, TraceError, trace_info

    try:
        info = trace_info(args.trace)
        got = TraceCursor(args.trace).take(min(max(1, args.tokens), info.tokens))
        sample, steps = got.experts, got.step
    except TraceError as exc:
        print(f"moesim routing: {exc}", file=sys.stderr)
        return EXIT_SCENARIO_ERROR
    if args.routing_command == "stats":
        return _stats(args, info, sample)
    if not args.phases:
        return _print_fit(args, info, [("", _fit(args, info, sample))])
    from moesim.routing.phases import decode_mask

    if steps is None:
        print(f"moesim routing: {args.trace}: --phases needs the trace's step", file=sys.stderr)
        return EXIT_SCENARIO_ERROR
    decode = decode_mask(steps, args.decode_step_tokens)
    fits = []
    for name, part in (("prefill", sample[~decode]), ("decode", sample[decode])):
        fit = _fit(args, info, part, name) if len(part) >= 16 else None
        if fit is None:
            print(
                f"moesim routing: {args.trace}: {len(part)} {name} tokens are too few to fit",
                file=sys.stderr,
            )
            return EXIT_SCENARIO_ERROR
        fits.append((name, fit))
    return _print_fit(args, info, fits)


def _stats(args: argparse.Namespace, info: TraceInfo, sample: np.ndarray) -> int:
    from moesim.routing.stats import trace_stats

    out = {"trace": args.trace, "tokens": info.tokens, "steps": info.steps}
    out.update(trace_stats(info.counts, sample))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for key, value in out.items():
        if isinstance(value, list) and len(value) > 12:
            shown = ", ".join(str(v) for v in value[:12]) + f", ... ({len(value)})"
        else:
            shown = json.dumps(value)
        print(f"{key:<32} {shown}")
    return 0


def _fit(
    args: argparse.Namespace, info: TraceInfo, sample: np.ndarray, phase: str = ""
) -> LogitsRouting | None:
    """Fit (and with --hold-out check) one logits model to ``sample``, printing its curves;
    None when too few tokens are left to hold out."""
    import numpy as np

    from moesim.routing.logits import batch_sizes, distinct_curve, fit_logits, model_curve, split

    counts = info.counts
    check = None
    if args.hold_out:
        sample, check = split(sample, args.hold_out)
        if len(sample) < 8:
            print(
                f"moesim routing: {args.trace}: {info.tokens} tokens are too few to hold out"
                f" {args.hold_out}",
                file=sys.stderr,
            )
            return None
    if check is not None or phase:
        counts = np.stack(
            [np.bincount(sample[:, j].ravel(), minlength=info.experts) for j in range(len(counts))]
        )
    fit = fit_logits(
        counts,
        sample,
        info.experts,
        info.top_k,
        seed=args.seed,
        per_layer=not args.shared_bias,
        correlated=not args.independent,
    )
    c = fit.config
    part = f" (fitted on {len(sample)} of them: {args.hold_out})" if check is not None else ""
    tokens = f"{phase} tokens: {len(sample) + (len(check) if check is not None else 0)}"
    print(
        f"# fitted to {args.trace}: {tokens if phase else info.tokens}{part}, "
        f"{info.moe_layers} MoE layers"
    )
    label = f"{phase} " if phase else ""
    _curves(f"{label}fitted", fit.batches, fit.trace_curve, fit.model_curve)
    if check is not None:
        batches = batch_sizes(len(check))
        trace = distinct_curve(check, batches, info.experts)
        model = model_curve(c, batches, info.experts, info.top_k, info.moe_layers, args.seed + 1)
        _curves(f"{label}held out ({len(check)} other tokens)", batches, trace, model)
    return c


def _print_fit(
    args: argparse.Namespace, info: TraceInfo, fits: Sequence[tuple[str, LogitsRouting | None]]
) -> int:
    """The fitted ``routing:`` section: the first fit, and the second as ``decode``."""
    if any(c is None for _, c in fits):
        return EXIT_SCENARIO_ERROR
    print("routing:\n  kind: logits")
    for i, (_, c) in enumerate(fits):
        assert c is not None
        pad = "  " * (i + 1)
        if i:
            print("  decode:")
        rows = f",\n{pad}  ".join("[" + ", ".join(f"{v:.4f}" for v in r) + "]" for r in c.bias)
        print(f"{pad}noise_std: {c.noise_std:.6g}")
        print(f"{pad}token_correlation: {c.token_correlation:.6g}")
        print(f"{pad}correlated_share: {c.correlated_share:.6g}")
        print(f"{pad}bias: [\n{pad}  {rows}\n{pad}]")
    return 0


def _curves(what: str, batches: list[int], trace: np.ndarray, model: np.ndarray) -> None:
    from moesim.routing.logits import worst_error

    print(f"# {what}: distinct experts touched per layer (batch: trace / model):")
    for b, t, m in zip(batches, trace, model):
        print(f"#   {b:>5}: {t:8.3f} / {m:8.3f}")
    print(f"# {what}: worst relative difference {worst_error(trace, model):.1%}")
