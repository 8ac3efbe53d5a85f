"""Workers import clustermap in every process: it must stay light (DESIGN §2)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("grpc", "google.protobuf", "pydantic", "pydantic_settings", "prometheus_client")


def test_import_clustermap_loads_no_grpc_protobuf_or_pydantic() -> None:
    code = (
        "import sys, clustermap, clustermap.region\n"
        "import clustermap.region.reader\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print('threads', __import__('threading').active_count())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "", f"import clustermap loaded {out[0]}"
    assert out[1] == "threads 1"


def test_no_generic_top_level_packages_are_installed() -> None:
    """A user's app with its own client.py or sidecar.py must keep working."""
    import importlib.metadata as md

    top = md.distribution("clustermap").read_text("top_level.txt")
    files = md.files("clustermap") or []
    tops = {str(f).split("/")[0] for f in files if str(f).endswith(".py")}
    assert tops <= {"clustermap"}, tops
    assert top is None or set(top.split()) <= {"clustermap"}
