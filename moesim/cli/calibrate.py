"""The calibration commands: calibrate, fidelity."""

from __future__ import annotations

import argparse

FIT_MODELS = ("olmoe-1b-7b",)


def split(text: str) -> list[str]:
    return [t for t in (x.strip() for x in text.split(",")) if t]


def calibrate(args: argparse.Namespace) -> int:
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
