"""The ``aeserve`` console script: train | eval | models | alias | encode (offline) and serve (HTTP).

``aeserve serve`` imports neither torch nor the training stack, so that a slim install (the ``serve`` extra: ONNX
Runtime and numpy) runs it; the offline commands need the full install.
"""
from __future__ import annotations

import argparse
import sys

OFFLINE_NEEDS = "the offline commands (train, eval, models, alias, encode, index) need the full install: pip install aeserve"


def build_parser(offline: bool = True) -> argparse.ArgumentParser:
    from aeserve.service.cli import add_commands as add_service_commands

    parser = argparse.ArgumentParser(prog="aeserve", description="Train autoencoders offline and serve them over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True)
    if offline:
        try:
            from aeserve.training.batch.job import add_command as add_encode_command
            from aeserve.training.cli import REGISTRY_HELP
            from aeserve.training.cli import add_commands as add_training_commands
        except ImportError as e:  # a slim install: torch and the training stack are not there
            parser.description = f"Serve autoencoders over HTTP ({OFFLINE_NEEDS}; {e.name} is not installed)."
        else:
            add_training_commands(sub)
            add_encode_command(sub, REGISTRY_HELP)
    add_service_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        args = build_parser(offline=False).parse_args(argv)
        try:
            return args.func(args)
        except ValueError as e:  # a setting this install cannot serve with (--engine torch without torch, say)
            print(f"aeserve serve: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    from aeserve.training.cli import run

    return run(args)
