"""Region commands of cmctl: they read the region as a worker does."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def add_commands(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("status", help="the sidecar's health as published")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    raise SystemExit("cmctl: not implemented yet")
