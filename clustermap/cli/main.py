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

from clustermap.errors import ClusterMapError

__all__ = ["main"]

DEFAULT_REGION = "/dev/shm/clustermap/default.region"
DEFAULT_SERVER = "127.0.0.1:7700"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmctl", description="Inspect the ClusterMap region and administer cm-server."
    )
    parser.add_argument(
        "--region",
        default=os.environ.get("CLUSTERMAP_REGION", DEFAULT_REGION),
        help="region file (default: $CLUSTERMAP_REGION or %(default)s)",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("CLUSTERMAP_SERVER", DEFAULT_SERVER),
        help="cm-server address for admin commands (default: $CLUSTERMAP_SERVER or %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from clustermap.cli import admin, inspect, up

    inspect.add_commands(sub)
    admin.add_commands(sub)
    up.add_commands(sub)
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
