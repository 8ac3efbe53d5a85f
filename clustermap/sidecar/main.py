"""``cm-sidecar``: poll cm-server, publish the map into the shared region."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from clustermap.errors import ClusterMapError
from clustermap.sidecar.config import SidecarSettings

__all__ = ["load_settings", "main"]

log = logging.getLogger("clustermap.sidecar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cm-sidecar",
        description="Poll cm-server and publish the cluster map into a shared-memory region.",
        epilog="Every option can also be set as CLUSTERMAP_<NAME> or in the --config TOML file.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="settings file ($CLUSTERMAP_CONFIG)")
    p.add_argument(
        "--server",
        action="append",
        metavar="HOST:PORT",
        help="cm-server address; repeat for failover order ($CLUSTERMAP_SERVER, comma-separated)",
    )
    p.add_argument("--region", metavar="PATH", help="region file ($CLUSTERMAP_REGION)")
    p.add_argument("--interval", type=float, metavar="SECONDS", help="poll period (0.5)")
    p.add_argument("--snapshot", metavar="PATH", help="last good map on disk, for warm starts")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve /metrics and /healthz")
    p.add_argument(
        "--service",
        dest="services",
        action="append",
        metavar="NAME",
        help="subscribe to this service only; repeatable",
    )
    p.add_argument("--zone", metavar="NAME", help="this machine's zone ($CLUSTERMAP_ZONE)")
    p.add_argument(
        "--standby",
        action="store_true",
        default=None,
        help="wait while another sidecar writes this region",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        default=None,
        help="hold a Watch stream instead of polling; poll while it is down",
    )
    p.add_argument(
        "--no-protect",
        dest="protect",
        action="store_false",
        default=None,
        help="publish every update, even one that would wipe the map",
    )
    p.add_argument("--token-file", metavar="PATH", help="bearer token for the server")
    p.add_argument("--tls-ca", metavar="PEM", help="verify the server with this CA (TLS)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="PEM", help="client key (mutual TLS)")
    p.add_argument("--log-format", choices=("text", "json"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--print-config", action="store_true", help="print the effective settings as JSON and exit"
    )
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "server",
        "region",
        "interval",
        "snapshot",
        "metrics",
        "services",
        "standby",
        "zone",
        "watch",
        "protect",
        "token_file",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "log_format",
        "log_level",
    )
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def load_settings(args: argparse.Namespace) -> SidecarSettings:
    """Flags over ``CLUSTERMAP_*`` over the TOML file over defaults (re-read on SIGHUP)."""
    if args.config:
        os.environ["CLUSTERMAP_CONFIG"] = args.config
    return SidecarSettings(**_overrides(args))


def _setup_logging(settings: SidecarSettings) -> None:
    from clustermap.logs import setup_logging

    setup_logging(settings.log_format, settings.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        print(f"cm-sidecar: invalid settings: {errors}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"cm-sidecar: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        shown = settings.model_dump(mode="json")
        if shown.get("token"):
            shown["token"] = "***"  # a secret: shown as set, never in clear
        print(json.dumps(shown, indent=2, sort_keys=True))
        return 0
    _setup_logging(settings)
    from clustermap.sidecar.daemon import Sidecar

    try:
        return Sidecar(settings, reload=lambda: load_settings(args)).run()
    except ClusterMapError as exc:
        log.error("%s", exc)
        print(f"cm-sidecar: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
