"""`aeserve serve` (arrives with the HTTP service)."""
from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """No service commands yet."""
