"""``cmctl``: the operator's tool.

Region commands (``dump``, ``status``, ``pick``, ``watch``) read the shared region exactly as
workers do; admin commands (``register``, ``deregister``, ``set``, ``services``) talk to
``cm-server``. Every failure is one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from clustermap import model
from clustermap.defaults import DEFAULT_REGION, DEFAULT_SERVER
from clustermap.errors import ClusterMapError

__all__ = ["main"]


def server_address(text: str) -> str:
    """``--server``: ``HOST:PORT`` by the one rule of :func:`clustermap.model.parse_address` (no
    default port: ``127.0.0.1`` alone is refused, as by cm-sidecar and cm-server)."""
    try:
        model.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _add_globals(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """``--region`` and ``--server``; after the command they override the ones before it."""
    region = os.environ.get("CLUSTERMAP_REGION", DEFAULT_REGION)
    server = os.environ.get("CLUSTERMAP_SERVER", DEFAULT_SERVER)
    parser.add_argument(
        "--region",
        default=region if defaults else argparse.SUPPRESS,
        help=f"region file (default: $CLUSTERMAP_REGION or {DEFAULT_REGION})",
    )
    parser.add_argument(
        "--server",
        type=server_address,
        default=server if defaults else argparse.SUPPRESS,
        metavar="HOST:PORT",
        help=f"cm-server address for admin commands (default: $CLUSTERMAP_SERVER or "
        f"{DEFAULT_SERVER})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmctl", description="Inspect the ClusterMap region and administer cm-server."
    )
    _add_globals(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from clustermap.cli import admin, inspect, up

    inspect.add_commands(sub)
    admin.add_commands(sub)
    up.add_commands(sub)
    for command in sub.choices.values():
        _add_globals(command, defaults=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ClusterMapError as exc:
        print(f"cmctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
