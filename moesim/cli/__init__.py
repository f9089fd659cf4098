"""The ``moesim`` command line: run, check, schema, presets, show.

Heavy libraries (simpy, scipy, networkx, matplotlib) are imported only by the commands that
need them, so ``--help``, ``check`` and ``schema`` answer quickly. Scenario errors print as
``file:line:col: field.path: message`` on stderr and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moesim import __version__
from moesim.cli import calibrate, catalog, plan, routing, simulate
from moesim.cli.calibrate import FIT_MODELS
from moesim.errors import EXIT_INTERRUPTED, EXIT_SCENARIO_ERROR, OutputError, ScenarioError


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default where it has one worth showing (not None,
    False or an empty list, and not already described in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        quiet = action.default in (None, False, [], argparse.SUPPRESS)
        flag = isinstance(action, argparse._StoreConstAction)  # store_true, store_false
        if quiet or flag or "default" in text or not action.option_strings:
            return action.help
        return f"{text} (default: %(default)s)"


def _with_defaults(p: argparse.ArgumentParser) -> None:
    """Every parser and sub-parser of the command line formats its help with :class:`_Help`."""
    p.formatter_class = _Help
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _with_defaults(sp)


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
        input_args(sp)

    def input_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--allow-path",
            dest="allow_paths",
            action="append",
            default=[],
            metavar="DIR",
            help="also read files (includes, profiles, traces, hf_config) under DIR; by "
            "default only the scenario's folder (and the working directory for --set paths)",
        )
        sp.add_argument(
            "--no-limits",
            dest="limits",
            action="store_false",
            help="lift the resource bounds checked at load time (tokens, devices, ...)",
        )

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
    r.add_argument(
        "--quiet", action="store_true", help="no progress bar (drawn only on a terminal)"
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
    input_args(cmp)
    cmp.add_argument("--json", action="store_true", help="print both summaries as JSON")
    cmp.add_argument("--all", action="store_true", help="also every summary field side by side")

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
        "kind",
        nargs="?",
        choices=["accelerators", "links", "switches", "clusters", "models", "engines"],
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
        default=",".join(FIT_MODELS),
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
    ca.add_argument(
        "--engine",
        metavar="NAME",
        help="with --from: fit a serving-engine preset NAME on torch_serving iterations",
    )
    ca.add_argument(
        "--training",
        metavar="FILE.jsonl",
        help="fit the training-step kernels on torch_train primitives into the profile --out",
    )
    ca.add_argument(
        "--fit-runs",
        default="",
        metavar="RUN,RUN",
        help="with --engine: online runs whose iterations join the fit (the rest stay held out)",
    )
    ca.add_argument(
        "--fit-weight",
        choices=["relative", "time"],
        default="relative",
        help="with --engine: minimise each iteration's relative error, or its error in seconds "
        "(long iterations weigh by their length, as in a request's latency)",
    )

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
        "--exclude", default=",".join(FIT_MODELS), help="models to leave out (the calibration set)"
    )
    fi.add_argument("--markdown", metavar="FILE.md", help="write the table as Markdown")
    fi.add_argument("--measurements", metavar="FILE.jsonl", help="keep the raw records")
    fi.add_argument("--title", help="title of the Markdown section")
    fi.add_argument(
        "--serving",
        metavar="FILE.jsonl",
        help="replay the online runs of a torch_serving file through moesim (with --engine)",
    )
    fi.add_argument(
        "--engine",
        default="ideal",
        metavar="NAME|FILE.yaml",
        help="with --serving: an engine preset, or a fitted entry written by calibrate --engine",
    )
    fi.add_argument(
        "--training",
        metavar="FILE.jsonl",
        help="predicted vs measured training steps of a torch_train file (with --profile)",
    )
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
    sw.add_argument(
        "--retry-failed",
        action="store_true",
        help="rerun the points that failed before (by default they stay failed)",
    )
    input_args(sw)
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
    routing.add_parser(sub)
    plan.add_parser(sub, scenario_args)
    _with_defaults(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:  # shell completion where argcomplete is installed (pip install 'moesim[completion]')
        import argcomplete

        argcomplete.autocomplete(parser)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    try:
        handler = {
            "run": simulate.run,
            "check": simulate.check,
            "schema": catalog.schema,
            "presets": catalog.presets,
            "show": catalog.show,
            "calibrate": calibrate.calibrate,
            "compare": simulate.compare,
            "fidelity": calibrate.fidelity,
            "import-model": catalog.import_model,
            "sweep": simulate.sweep,
            "capacity": simulate.capacity,
            "routing": routing.routing,
            "plan": plan.plan,
        }[args.command]
        return handler(args)
    except ScenarioError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_SCENARIO_ERROR
    except OutputError as exc:
        print(f"moesim: {exc}", file=sys.stderr)
        return EXIT_SCENARIO_ERROR
    except BrokenPipeError:  # e.g. `moesim schema | head`
        return 0
    except KeyboardInterrupt:
        print("\nmoesim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
