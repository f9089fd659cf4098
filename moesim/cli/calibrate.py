"""The calibration commands: calibrate, fidelity."""

from __future__ import annotations

import argparse

FIT_MODELS = ("olmoe-1b-7b",)


def split(text: str) -> list[str]:
    return [t for t in (x.strip() for x in text.split(",")) if t]


def calibrate(args: argparse.Namespace) -> int:
    if args.training:
        from moesim.calibrate.training_commands import calibrate_training

        if not args.out:
            raise SystemExit("moesim calibrate: --training writes into the profile --out FILE")
        return calibrate_training(args.training, args.out)
    if args.engine:
        from moesim.calibrate.serving_commands import calibrate_engine

        if not args.from_file:
            raise SystemExit("moesim calibrate: --engine fits from --from FILE.jsonl")
        return calibrate_engine(
            args.from_file, args.engine, args.out, split(args.fit_runs), args.fit_weight
        )
    from moesim.calibrate.commands import calibrate

    return calibrate(
        args.backend,
        args.size,
        args.out,
        args.measurements,
        args.from_file,
        split(args.fit_models),
        args.collectives,
        args.seed,
    )


def fidelity(args: argparse.Namespace) -> int:
    if args.training:
        from moesim.calibrate.training_commands import training_fidelity

        return training_fidelity(args.training, args.profile, args.markdown)
    if args.serving:
        from moesim.calibrate.serving_commands import serving_fidelity

        return serving_fidelity(args.serving, args.engine, args.markdown, args.seed)
    from moesim.calibrate.commands import fidelity

    return fidelity(
        args.backend,
        args.size,
        args.profile,
        args.from_file,
        split(args.exclude),
        args.markdown,
        args.measurements,
        args.seed,
        args.title,
    )
