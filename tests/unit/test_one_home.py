"""Each default and poll kind is written once, in its neutral home; nothing restates it.

Scans the package's code (docstrings aside) for the literals, so a copy that drifts back in fails
here instead of drifting apart from the original later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import clustermap
from clustermap import defaults, model

PACKAGE = Path(clustermap.__file__).parent

HOMES = {
    defaults.DEFAULT_SERVER: "defaults.py",
    defaults.DEFAULT_REGION: "defaults.py",
    "/dev/shm/clustermap": "defaults.py",
    ":7700": "defaults.py",
    model.NOT_MODIFIED: "model.py",
    model.NOT_READY: "model.py",
}


def _string_constants(tree: ast.Module) -> list[tuple[str, int]]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.value, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_pb" not in p.parts)


@pytest.mark.parametrize("literal", sorted(HOMES))
def test_literal_lives_in_its_home_only(literal: str) -> None:
    home = PACKAGE / HOMES[literal]
    found = []
    for path in _sources():
        for value, lineno in _string_constants(ast.parse(path.read_text(encoding="utf-8"))):
            if literal in value:
                found.append((path, lineno))
    assert [f for f in found if f[0] != home] == [], f"{literal!r} restated outside {home.name}"
    assert [f for f in found if f[0] == home], f"{literal!r} missing from {home.name}"


def test_port_and_weight_limits_live_in_rules_only() -> None:
    found = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and ast.get_source_segment(text, node) == "65535":
                found.append((path.name, node.lineno))
    assert [f for f in found if f[0] != "rules.py"] == []  # MAX_PORT, MAX_WEIGHT


def test_scan_sees_a_restated_default(tmp_path: Path) -> None:
    source = 'X = "127.0.0.1:7700"\n\n\ndef f():\n    """127.0.0.1:7700 in a docstring."""\n'
    consts = _string_constants(ast.parse(source))
    assert [line for value, line in consts if defaults.DEFAULT_SERVER in value] == [1]


def test_address_parse_and_format_round_trip() -> None:
    for host, port in (("10.0.0.1", 80), ("::1", 7700), ("db.example", 65535)):
        text = model.format_address(host, port)
        assert model.parse_address(text) == (host, port)
    assert model.format_address("::1", 1) == "[::1]:1"
    assert model.parse_address("[::]:0", allow_zero=True) == ("::", 0)
    with pytest.raises(ValueError, match="port outside 1-65535"):
        model.parse_address("h:0")
    with pytest.raises(ValueError, match="port outside 0-65535"):
        model.parse_address("h:65536", allow_zero=True)
