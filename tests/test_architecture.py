"""The package's layout holds: imports flow one way between sub-packages, light modules import no heavy framework,
the command line's help needs no training extras, and no module grows past ~400 lines without a reason."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "peft_doubter"
# A sub-package (or top-level module) may import only from lower levels or from itself.
LEVELS = {
    "names": 0, "paths": 0.5,
    "tuner": 1,
    "data": 2, "deploy": 2,
    "training": 3, "evaluation": 3,
    "hub": 4,
    "agent": 5,
    "runs": 6,
    "serving": 7,
    "cli": 8,
}
HEAVY = ("torch", "transformers", "peft", "datasets", "trl", "accelerate", "bitsandbytes")
# Modules usable without torch (the root `__init__` registers the tuner with PEFT; it is not part of the check).
LIGHT = ("names", "paths", "evaluation.metrics", "evaluation.statistics", "evaluation.risk_control", "evaluation.report",
         "deploy.sidecar_format", "deploy.numpy_reference", "data.scoring", "cli.options", "cli.main")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def top_level_imports(name: str) -> tuple[set[str], set[str]]:
    """(package modules, external top-level packages) imported when `name` is imported: module-level statements
    only (imports inside functions run on first use)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "peft_doubter":
                    internal.add(alias.name.removeprefix("peft_doubter").lstrip("."))
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module.split(".")[0] != "peft_doubter":
                external.add(node.module.split(".")[0])
                continue
            if node.level == 0:
                base = node.module.removeprefix("peft_doubter").lstrip(".")
            else:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                internal.add(candidate if candidate in MODULES else base)
    return {m for m in internal if m}, external


def level_of(name: str) -> int:
    return LEVELS[name.split(".")[0]]


def test_every_module_belongs_to_a_level():
    unplaced = sorted(n for n in MODULES if n and n.split(".")[0] not in LEVELS)
    assert not unplaced, f"add these to LEVELS (and to the README's layout): {unplaced}"


def test_imports_flow_one_way():
    violations = []
    for name in MODULES:
        if not name:  # the root __init__ re-exports the tuner and registers it
            continue
        for target in top_level_imports(name)[0] | lazy_imports(name):
            same = target.split(".")[0] == name.split(".")[0]
            if not same and level_of(target) >= level_of(name):
                violations.append(f"{name} -> {target}")
    assert not violations, "imports against the flow: " + ", ".join(sorted(violations))


def lazy_imports(name: str) -> set[str]:
    """Package modules imported inside functions (the flow rule holds for them too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            anchor = package.split(".") if package else []
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in MODULES else base)
    return {m for m in found if m}


def closure(name: str) -> tuple[set[str], set[str]]:
    """Every package module (with the sub-package `__init__`s on the way) and external package imported at module
    level when `name` is imported, except the root `__init__`."""
    seen, external, todo = set(), set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in MODULES:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        internal, outside = top_level_imports(current)
        external |= outside
        todo += list(internal)
    return seen, external


@pytest.mark.parametrize("name", LIGHT)
def test_light_modules_import_no_heavy_framework(name):
    modules, external = closure(name)
    heavy = sorted(set(HEAVY) & external)
    assert not heavy, f"{name} imports {heavy} at module level (through {sorted(modules)})"


def test_help_needs_no_training_extras():
    code = ("import sys\nfrom peft_doubter.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('datasets', 'trl', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "collect" in out.stdout and "quickstart" in out.stdout
    assert out.stderr == "", "nothing the user did not cause is printed"


def test_no_module_is_over_the_size_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (lines): {long}"
