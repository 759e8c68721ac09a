"""The import layers of docs/architecture.md, checked on every module (imports inside functions too).

1. A package imports only the packages below it (`LAYERS`): the model layer imports no fixtures,
   training and evaluation never import each other, and the response classifier and the concept
   world (used by both) import neither.
2. Inside a package, its sub-packages and its own modules never import each other in a circle
   (e.g. `training.rl` uses `training`, so nothing in `training` outside it imports `training.rl`).
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> the project packages it may import (besides itself).
LAYERS: dict[str, set[str]] = {
    "safety_modules": set(),
    "runtime": {"safety_modules"},
    "base_models": {"safety_modules"},
    "concept_world": {"safety_modules", "runtime"},
    "response_classifier": {"safety_modules", "runtime", "concept_world"},
    "training": {"safety_modules", "runtime", "base_models", "concept_world", "response_classifier"},
    "eval": {"safety_modules", "runtime", "base_models", "concept_world", "response_classifier"},
    "safevlm": {"safety_modules", "runtime", "base_models", "concept_world", "response_classifier",
                "training", "eval"},
}
ON_TOP = ("bench", "examples")       # may import any layer; nothing imports them


def _modules() -> dict[str, Path]:
    found = {}
    for package in [*LAYERS, *ON_TOP]:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        out.update(name for name in names if name in known or name.split(".")[0] in known)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path, known) for name, path in known.items()}


def _group(module: str) -> str:
    """A module's sub-package (`training.rl`) when it is in one, else its package (`training`)."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[0] / parts[1]).is_dir()):
        return ".".join(parts[:2])
    return parts[0]


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for module, targets in _graph().items():
        package = module.split(".")[0]
        if package in ON_TOP:
            continue
        allowed = LAYERS[package] | {package}
        wrong += [f"{module} -> {t}" for t in sorted(targets) if t.split(".")[0] not in allowed]
    assert not wrong, "imports across the layers of docs/architecture.md:\n" + "\n".join(wrong)


def test_no_sub_packages_import_each_other_in_a_circle():
    edges: dict[str, set[str]] = collections.defaultdict(set)
    why: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for module, targets in _graph().items():
        for target in targets:
            a, b = _group(module), _group(target)
            if a != b and a.split(".")[0] == b.split(".")[0]:
                edges[a].add(b)
                why[a, b].append(f"{module} -> {target}")
    circles = []
    for a in list(edges):
        for b in edges[a]:
            if _reaches(edges, b, a):
                circles.append(f"{a} -> {b} ({', '.join(sorted(why[a, b])[:3])}) and back")
    assert not circles, "circular imports between sub-packages:\n" + "\n".join(sorted(circles))


def _reaches(edges: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(edges.get(node, ()))
    return False


def test_the_checks_see_a_wrong_import(tmp_path):
    """The rule catches a violation it is shown (so a passing run means something)."""
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from training.engine import Trainer\n")
    assert "training.engine" in _imports(path, _modules())
    assert "training" not in LAYERS["eval"]
