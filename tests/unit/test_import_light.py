"""Workers import clustermap in every process: it must stay light (DESIGN §2)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "grpc",
    "google.protobuf",
    "pydantic",
    "pydantic_settings",
    "prometheus_client",
    "requests",
    "httpx",
    "urllib3",
)


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


def _run(code: str) -> list[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()


def test_import_clustermap_http_loads_neither_client_until_used() -> None:
    out = _run(
        "import sys, clustermap.http\n"
        "print(' '.join(m for m in ('requests', 'httpx', 'grpc') if m in sys.modules))\n"
        "clustermap.http.Session\n"
        "print('requests' in sys.modules, 'httpx' in sys.modules)\n"
    )
    assert out == ["", "True False"]


def test_import_clustermap_http_without_the_extras_says_what_to_install() -> None:
    out = _run(
        "import sys\n"
        "sys.modules['requests'] = None; sys.modules['httpx'] = None  # as if not installed\n"
        "try:\n"
        "    import clustermap.http\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert len(out) == 1
    assert "clustermap[http]" in out[0]
    assert "clustermap[httpx]" in out[0]


def test_one_extra_is_enough_and_the_missing_one_is_named_on_use() -> None:
    out = _run(
        "import sys\n"
        "sys.modules['httpx'] = None\n"
        "import clustermap.http\n"
        "print(clustermap.http.Session.__mro__[1].__module__)\n"
        "try:\n"
        "    clustermap.http.Transport\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert out[0] == "requests.sessions"
    assert "clustermap[httpx]" in out[1]
