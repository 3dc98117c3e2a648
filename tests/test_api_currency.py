"""Every JAX, Flax, optax, Orbax and chex name our code spells out exists in the
installed versions and is not deprecated, read from the source (so paths the suite
never runs count too). pyproject.toml makes the same warnings errors at run time."""

import ast
import importlib
import json
import pathlib
import types
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARIES = ("jax", "flax", "optax", "orbax", "chex")


def _sources():
    for folder in ("hflows_jax", "experiments", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        yield path, "\n".join(line for line in code.splitlines()
                              if not line.lstrip().startswith(("!", "%")))


def _names(source: str):
    """``(line, module, dotted attribute)`` for every import of, and attribute chain on,
    one of LIBRARIES."""
    tree, alias = ast.parse(source), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in LIBRARIES:
                    alias[a.asname or a.name.split(".")[0]] = (
                        a.name if a.asname else a.name.split(".")[0])
                    yield node.lineno, a.name, ""
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.split(".")[0] in LIBRARIES):
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
                yield node.lineno, node.module, a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, n = [], node
            while isinstance(n, ast.Attribute):
                parts.append(n.attr)
                n = n.value
            if isinstance(n, ast.Name) and n.id in alias:
                yield node.lineno, alias[n.id], ".".join(reversed(parts))


def _resolve(module: str, attribute: str) -> None:
    """Import ``module`` and follow ``attribute`` through modules; warnings are errors.
    (Past the first object that is no module, nothing is deprecated by name.)"""
    try:
        obj = importlib.import_module(module)
    except ImportError:
        parent, _, name = module.rpartition(".")
        obj = getattr(importlib.import_module(parent), name)
    for part in filter(None, attribute.split(".")):
        if not isinstance(obj, types.ModuleType):
            return
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(f"{obj.__name__}.{part}")


def test_no_removed_or_deprecated_names():
    problems, seen = [], set()
    for path, source in _sources():
        for line, module, attribute in _names(source):
            if (module, attribute) in seen:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    _resolve(module, attribute)
                seen.add((module, attribute))
            except Exception as e:  # noqa: BLE001  (every failure is the finding)
                problems.append(f"{path.relative_to(ROOT)}:{line}: "
                                f"{module}.{attribute}: {type(e).__name__}: {e}")
    assert not problems, "\n".join(problems)


def test_the_sweep_sees_a_removed_name():
    """The check itself can fail: ``jax.core.get_aval`` was removed in JAX 0.10."""
    names = list(_names("import jax\nx = jax.core.get_aval(1.0)\n"))
    assert (2, "jax", "core.get_aval") in names
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _resolve("jax", "core.get_aval")
    except (AttributeError, ImportError, DeprecationWarning):
        return
    raise AssertionError("jax.core.get_aval resolved")
