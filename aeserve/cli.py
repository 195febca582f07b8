"""The ``aeserve`` console script: train | eval | models | alias | encode | index (offline) and serve (HTTP)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from aeserve.service.cli import add_commands as add_service_commands
    from aeserve.training.batch.index import add_command as add_index_command
    from aeserve.training.batch.job import add_command as add_encode_command
    from aeserve.training.cli import REGISTRY_HELP
    from aeserve.training.cli import add_commands as add_training_commands

    parser = argparse.ArgumentParser(prog="aeserve", description="Train autoencoders offline and serve them over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_training_commands(sub)
    add_encode_command(sub, REGISTRY_HELP)
    add_index_command(sub, REGISTRY_HELP)
    add_service_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from aeserve.training.cli import run

    args = build_parser().parse_args(argv)
    return run(args)
