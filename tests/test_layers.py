"""The import graph has no arrow from a lower layer to a higher one (the layers of LAYERS below)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shortcut_fast"

# Lower number = lower layer. A unit may import units of a lower layer only (and itself).
LAYERS = {
    "validate": 0, "report": 0, "_C": 0,
    "run_folder": 1, "kernels": 1, "distributed": 1,
    "model_cache": 2,  # the cache root (models, and data.files' decoded images) sits under the data layer
    "backends": 2,
    "ops": 3,
    "models": 4, "data": 4,
    "train": 5, "surgery": 5, "ensemble": 5, "selftest": 5, "recipes": 5,
    "experiments": 6,
    "pipeline": 7, "bench": 7,
    "__init__": 8,
    "cli": 9,
    "__main__": 10,
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Units of shortcut_fast imported by the module at `path`."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if path.name == "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # `from shortcut_fast import kernels` imports the unit named by the alias
            names = [f"{target}.{a.name}" for a in node.names] if target == "shortcut_fast" else [target]
        else:
            continue
        found |= {_unit(n) for n in names if n.startswith("shortcut_fast")}
    return found


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for other in _imports(path) - {me}:
            assert other in LAYERS, f"{other} (imported by {path}) has no layer in this test"
            if LAYERS[other] >= LAYERS[me]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} ({me}) imports {other}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert units - set(LAYERS) == set()
