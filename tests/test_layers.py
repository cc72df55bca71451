"""Imports only go downward: cli -> servers -> transport -> proto; proto does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "netstack"
LAYERS = {"proto": 0, "transport": 1, "servers": 2, "cli": 3}
# errors, config and log do no I/O and may be imported anywhere.
NEUTRAL = {"errors", "config", "log"}
FORBIDDEN_IN_PROTO = {"asyncio", "socket", "ssl", "selectors", "threading", "time", "uvloop"}
# The from-scratch loop is a teaching model that must not lean on asyncio.
NO_ASYNCIO = [SRC / "servers" / "models" / "selectloop.py"]


def imports_of(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}:{node.lineno}: use absolute imports (netstack.x)")
    return found


def layer_of(path: Path) -> int | None:
    rel = path.relative_to(SRC).parts
    return LAYERS.get(rel[0]) if len(rel) > 1 else None


def sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "_pb" not in p.parts)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_downward(path: Path) -> None:
    own = layer_of(path)
    for module, line in imports_of(path):
        parts = module.split(".")
        if parts[0] != "netstack" or len(parts) < 2:
            continue
        target = LAYERS.get(parts[1])
        if own is None and parts[1] not in NEUTRAL and path.name != "__main__.py":
            # errors/config/log (and the package __init__) import only neutral modules.
            assert target is None, f"{path}:{line}: neutral module imports {module}"
        if own is not None and target is not None:
            assert target <= own, f"{path}:{line}: layer {own} imports higher layer {module}"


@pytest.mark.parametrize(
    "path", sorted((SRC / "proto").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC))
)
def test_proto_imports_no_io(path: Path) -> None:
    for module, line in imports_of(path):
        assert module.split(".")[0] not in FORBIDDEN_IN_PROTO, f"{path}:{line}: imports {module}"


@pytest.mark.parametrize("path", NO_ASYNCIO, ids=lambda p: p.name)
def test_selectloop_does_not_use_asyncio(path: Path) -> None:
    assert path.exists(), f"{path} is missing"
    for module, line in imports_of(path):
        assert module.split(".")[0] not in {"asyncio", "uvloop"}, f"{path}:{line}: {module}"


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import socket\nfrom netstack.cli import main\n")
    assert [m for m, _ in imports_of(bad)] == ["socket", "netstack.cli"]
