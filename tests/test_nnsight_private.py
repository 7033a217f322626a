"""nsteer's reach into nnsight's internals stays in one adapter, and the installed nnsight still has every name it
uses: after an nnsight upgrade this file fails naming the symbol that moved, before any remote run does."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from nsteer.execution import nnsight_private
from nsteer.execution.nnsight_private import NNSIGHT_NAMES

PACKAGE = Path(__file__).resolve().parent.parent / "nsteer"
ADAPTER = PACKAGE / "execution" / "nnsight_private.py"


def own_private_names() -> set[str]:
    """Private attributes nsteer's own classes declare (``_source: ... = PrivateAttr()``, ``self._x = ...``)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    target = item.target if isinstance(item, ast.AnnAssign) else None
                    if isinstance(target, ast.Name) and target.id.startswith("_"):
                        names.add(target.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    names.add(node.attr)
    return names


@pytest.mark.parametrize(("module", "path"), NNSIGHT_NAMES, ids=[f"{m}.{p}" for m, p in NNSIGHT_NAMES])
def test_the_installed_nnsight_has_the_name(module, path):
    name = f"{module}.{path}"
    assert name not in nnsight_private.missing_names(), (
        f"nnsight no longer has {name}, which nsteer.execution.nnsight_private relies on: adapt that module to the "
        "installed nnsight (or pin the nnsight version NDIF runs)."
    )


def test_the_adapter_functions_work_on_a_real_nnsight_model(tiny):
    handle = tiny("llama")
    assert nnsight_private.wrapped_module(handle.model) is handle.hf_model
    assert isinstance(nnsight_private.request_env(handle.model), dict)
    import nnsight.intervention.backends.remote as remote_module

    original = remote_module._READ_TIMEOUT
    with nnsight_private.bounded_read_timeout(time.monotonic() + 3.0):
        assert 0.5 <= remote_module._READ_TIMEOUT <= 3.0
    assert remote_module._READ_TIMEOUT == original


def test_missing_names_reports_a_moved_symbol(monkeypatch):
    monkeypatch.setattr(nnsight_private, "NNSIGHT_NAMES", (("nnsight.intervention.backends.remote", "_GONE"),))
    assert nnsight_private.missing_names() == ["nnsight.intervention.backends.remote._GONE"]


def test_no_other_module_touches_a_private_name():
    """Outside the adapter, no nsteer module reads a private attribute of another object (nsteer's own excepted)."""
    own = own_private_names()
    assert {"_source", "_lines"} <= own  # the recipe's source file and line map, read across nsteer's modules
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == ADAPTER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr not in own:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    assert not found, "private names outside nsteer/execution/nnsight_private.py:\n" + "\n".join(found)
