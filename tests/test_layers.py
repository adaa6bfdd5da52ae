"""The package map of docs/design.md holds: every import of `lte` code points down the layers.

Each module's imports (at its top and inside functions) are read from its source; an import of
another unit must go to a lower layer. Units of one layer do not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "lte"

#: Lowest first. A unit is a top-level module (`model`) or subpackage (`training`) of `lte`.
LAYERS = [
    {"paths"},
    {"errors", "version", "losses", "sparse_model", "passes", "kernels"},
    {"hub"},
    {"config", "routing", "data"},
    {"conversion"},
    {"stats", "adapters"},
    {"checkpoint"},
    {"model"},
    {"baselines"},
    {"loading"},
    {"__init__", "evaluation"},
    {"training", "serving"},
    {"study"},
    {"cli"},
]
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
UNITS = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}


def _unit_of(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0][:-3] if len(rel) == 1 else rel[0]


def _imported_units(path: Path) -> set[str]:
    """The `lte` units a module imports (absolute `lte.x` or relative), anywhere in its code."""
    package = ["lte", *path.relative_to(SRC).parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            if node.module and module == "lte":  # `from lte import x`: the subpackage x, or the package face
                names = [f"lte.{a.name}" if a.name in UNITS else "lte.__init__" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lte":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def test_every_unit_has_a_layer():
    assert UNITS <= set(LEVEL), f"place these in LAYERS (and docs/design.md): {sorted(UNITS - set(LEVEL))}"


def test_imports_point_down():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        unit = _unit_of(path)
        for other in _imported_units(path) - {unit}:
            if LEVEL[other] >= LEVEL[unit]:
                wrong.append(f"{path.relative_to(SRC)} imports lte.{other}")
    assert not wrong, "imports that do not point down the layers of docs/design.md:\n" + "\n".join(wrong)
