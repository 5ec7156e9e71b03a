"""Command line: ``fp16-triton train`` (the main job) and ``python -m fp16_triton``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fp16-triton`` command."""
    from . import train, tune

    parser = argparse.ArgumentParser(
        prog="fp16-triton", description="Triton kernels for mixed-precision training"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train", help="train a tiny GPT on a synthetic task with the fp16 engine"
    )
    train.add_arguments(train_parser)
    tune_parser = commands.add_parser(
        "tune", help="time the kernels' launch configurations on this GPU and keep the best"
    )
    tune.add_arguments(tune_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return {"train": train.main, "tune": tune.main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
