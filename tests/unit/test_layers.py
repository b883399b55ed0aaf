"""The architecture as a test (docs/architecture.md): each folder of job/ imports only the layers
below it, nothing imports job.* inside a function, and ``status`` never reaches torch or numpy.
The imports are read from the source (AST), nothing is run."""

from __future__ import annotations

import ast
from pathlib import Path

JOB = Path(__file__).resolve().parents[2] / "job"

# What each layer may import, besides itself. Layers point down: models -> inference -> eval ->
# modes -> cli, with training beside eval (neither imports the other); storage, monitoring and
# checkpoints below training.
BASE = {"exits", "presets", "config"}
ALLOWED: dict[str, set[str]] = {
    "exits": set(),
    "presets": set(),
    "config": {"presets", "exits"},
    "runtime": BASE,
    "storage": BASE | {"runtime"},
    "monitoring": BASE | {"runtime", "storage"},
    "data": BASE | {"runtime", "storage", "monitoring"},
    "checkpoints": BASE | {"runtime", "storage", "monitoring", "data"},
    "models": BASE,
    "plots": BASE | {"runtime"},
    "inference": BASE | {"runtime", "storage", "monitoring", "data", "checkpoints", "models"},
    "training": BASE | {"runtime", "storage", "monitoring", "data", "checkpoints", "models", "plots", "inference"},
    "eval": BASE | {"runtime", "storage", "monitoring", "data", "checkpoints", "models", "plots", "inference"},
    "modes": BASE | {"runtime", "storage", "monitoring", "data", "checkpoints", "models", "plots", "inference",
                     "training", "eval"},
    "cli": BASE | {"runtime", "monitoring"},  # the modes through cli.MODES, by name
    "__main__": {"cli"},
}
HEAVY = ("torch", "numpy", "safetensors", "matplotlib", "PIL", "vector_quantize_pytorch", "torchmetrics")


def module_name(path: Path) -> str:
    parts = path.relative_to(JOB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in JOB.rglob("*.py")}


def imports(tree: ast.Module, top_level_only: bool = False) -> list[tuple[str, ast.AST]]:
    """(imported module, node) for every import; ``from job.x import y`` counts as job.x.y when
    that is a module."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, node)]
            found += [(f"{node.module}.{alias.name}", node) for alias in node.names]
    return found


def function_level(tree: ast.Module) -> list[ast.AST]:
    nested = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return nested


def test_each_layer_imports_only_the_layers_below_it():
    trees = modules()
    problems = []
    for name, tree in trees.items():
        own = layer(name)
        for imported, node in imports(tree):
            if imported.startswith("job.") and imported in trees and layer(imported) != own:
                if layer(imported) not in ALLOWED[own]:
                    problems.append(f"{name}:{node.lineno} imports {imported} ({own} may not import {layer(imported)})")
    assert not problems, "\n".join(problems)


def test_every_module_belongs_to_a_known_layer():
    assert {layer(name) for name in modules()} - {"job"} <= set(ALLOWED)


def test_no_job_import_inside_a_function():
    """An import inside a function hides a dependency (and, usually, a cycle held apart)."""
    problems = [
        f"{name}:{node.lineno}"
        for name, tree in modules().items()
        for node in function_level(tree)
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("job"))
        or (isinstance(node, ast.Import) and any(a.name.startswith("job") for a in node.names))
    ]
    assert not problems, f"job.* imported inside a function: {problems}"


def test_status_and_everything_it_imports_stay_clear_of_torch_and_numpy():
    trees = modules()
    seen, queue, heavy = set(), ["job.modes.status", "job.cli"], []
    while queue:
        name = queue.pop()
        if name in seen or name not in trees:
            continue
        seen.add(name)
        for imported, node in imports(trees[name]):
            if imported.split(".")[0] in HEAVY:
                heavy.append(f"{name}:{node.lineno} imports {imported}")
            if imported in trees:
                queue.append(imported)
                parts = imported.split(".")
                queue += [".".join(parts[:n]) for n in range(1, len(parts))]  # packages' __init__ run first
    assert not heavy, "\n".join(heavy)
    assert "job.modes.status" in seen and len(seen) > 5  # the walk did reach status's imports


def test_the_walk_finds_a_planted_violation(tmp_path):
    """The checks above can fail: a model that imports a mode is caught."""
    tree = ast.parse("from job.modes.verify import run\n")
    offending = [imported for imported, _ in imports(tree) if imported.startswith("job.")]
    assert layer("job.modes.verify") not in ALLOWED[layer("job.models.tokenizer")]
    assert offending == ["job.modes.verify", "job.modes.verify.run"]
    nested = ast.parse("def f():\n    from job.config import Config\n")
    assert function_level(nested)
