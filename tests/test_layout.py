"""The package's layers import one way (docs/algorithm.md, "Where it lives"):

    cli -> analysis -> runtime -> engines -> the algorithm (config, schedule, ops, context, steps, spec)
    cli -> exporters -> models -> the algorithm;  digits -> models, runtime;  cli -> serve -> runtime, engines
    diffusers (``enable(pipe)``: a top layer like cli) -> models, runtime, engines, families

Read from the source with ``ast`` (every import, function-level ones included), so an import that
breaks a rule fails here whether or not a test runs that code path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "clusca_trt"
ALGORITHM = {"config", "schedule", "ops", "context", "steps", "spec", "errors", "hashing", "files", "_version"}
# layer -> the layers it must not import
FORBIDDEN = {
    "algorithm": {"models", "exporters", "engines", "runtime", "analysis", "digits", "serve", "cli"},
    "models": {"exporters", "engines", "runtime", "analysis", "digits", "serve", "cli"},
    "exporters": {"runtime", "analysis", "digits", "serve", "cli"},
    "engines": {"models", "exporters", "runtime", "analysis", "digits", "serve", "cli"},
    "runtime": {"models", "exporters", "analysis", "digits", "serve", "cli"},
    "analysis": {"digits", "serve", "cli"},
    "digits": {"exporters", "engines", "analysis", "serve", "cli"},
    "serve": {"models", "exporters", "digits", "analysis", "cli"},
    "diffusers": {"exporters", "analysis", "digits", "serve", "cli"},
}
# the top layers: no other layer imports them
for _layer, _forbidden in FORBIDDEN.items():
    if _layer not in ("diffusers",):
        _forbidden.add("diffusers")


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    return "algorithm" if top in ALGORITHM else top


def imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported clusca_trt module relative to the package, "" for the root) of ``source``,
    the text of the package module ``module`` (dotted, relative to the package: "engines.ort")."""
    package = module.split(".")[:-1]  # the package a relative import starts from
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "clusca_trt":
                target = node.module[len("clusca_trt"):].lstrip(".")
            else:
                continue
            if node.module:
                out.append((node.lineno, target))
            else:  # "from .. import x": x is a module of that package, or an attribute of its __init__
                out += [(node.lineno, ".".join(filter(None, [target, a.name]))) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("clusca_trt"):].lstrip(".")) for a in node.names
                    if a.name.split(".")[0] == "clusca_trt"]
    return out


def violations(source: str, module: str) -> list[str]:
    own = layer_of(module)
    found = []
    for line, target in imports(source, module):
        top = target.split(".")[0]
        if module == "__init__" and top in ("runtime", "diffusers"):
            continue  # the package root's lazy ``Pipeline``, ``enable``, ``disable``: public entry points, not layers
        if not target or (top not in {p.name for p in PACKAGE.iterdir()} and top + ".py" not in
                          {p.name for p in PACKAGE.iterdir()}):
            found.append(f"{module}:{line} imports the package root ({target or '.'})")
        elif layer_of(target) in FORBIDDEN.get(own, set()):
            found.append(f"{module}:{line} ({own}) imports {target} ({layer_of(target)})")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts[:-1] + (rel.parts[-1],)) if rel.name != "__init__" else ".".join(rel.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path):
    name = module_name(path)
    if path.name == "__init__.py" and path.parent != PACKAGE:
        name = ".".join(path.relative_to(PACKAGE).parent.parts) + ".__init__"
    assert violations(path.read_text(), name) == []


@pytest.mark.parametrize("source, module, bad", [
    ("from ..models import load_model\n", "engines.bad", True),
    ("def f():\n    from ..exporters import export_all\n", "engines.bad", True),
    ("from .. import __version__\n", "engines.bad", True),  # the root, not _version
    ("from .._version import __version__\n", "engines.bad", False),
    ("from ..models.flux import FluxConfig\n", "runtime.bad", True),
    ("from .manifest import Manifest\n", "engines.bad", False),
    ("from . import ops\n", "context", False),
    ("from .engines.open import open_engine\n", "steps", True),
    ("import clusca_trt.models\n", "runtime.bad", True),
    ("from ..runtime.pipeline import Pipeline\n", "serve.bad", False),
    ("from ..exporters.build import build_engines\n", "serve.bad", True),
    ("from ..serve.server import Server\n", "runtime.bad", True),
    ("from .runtime.pipeline import Pipeline\n", "diffusers", False),
    ("from .models.dit import DiTAdapter\n", "diffusers", False),
    ("from .exporters.build import build_engines\n", "diffusers", True),
    ("from ..diffusers import enable\n", "runtime.bad", True),
])
def test_the_checker_finds_what_it_should(source, module, bad):
    assert bool(violations(source, module)) is bad
