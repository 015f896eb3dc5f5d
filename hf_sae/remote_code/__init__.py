"""The self-contained modeling file that ``push_sae(..., include_code=True)`` uploads, generated from the package.

With that file and an ``auto_map`` in config.json, ``AutoModel.from_pretrained(repo, trust_remote_code=True)``
loads the SAE on a machine *without* hf-sae (torch and transformers only). The file is not written by hand: like
transformers' ``modular_*.py`` -> ``modeling_*.py``, :func:`generate_remote_code` concatenates the sources the
architectures' two files need (their config and model, the base classes, and the package modules those import,
followed transitively), drops the package-internal imports and the ``register_architecture(...)`` calls, and
gathers the external imports at the top. Nothing is copied by hand, so the remote classes are hf-sae's classes.

The file is generated at push time from the sources of the installed package (and, for an architecture registered
from outside the package, from its own module), so it can never be stale; nothing generated is committed.
``python -m hf_sae.remote_code OUT.py`` writes the file for the package's own architectures, to read it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from .._io import write_json_atomic, write_text_atomic
from .._version import __version__
from ..errors import ArchitectureError, HfSaeError
from ..registry import Architecture, architecture_of, architectures

REMOTE_CODE_NAME = "modeling_hf_sae.py"
PACKAGE = "hf_sae"
_NOT_BUNDLED = {f"{PACKAGE}.registry"}  # registration is the Auto classes' job on the remote side (auto_map)


def _is_internal(module: str | None) -> bool:
    return module is not None and (module == PACKAGE or module.startswith(PACKAGE + "."))


def _resolve(module: ModuleType, node: ast.ImportFrom) -> str | None:
    """The absolute module name an ``ImportFrom`` reads (None for ``from __future__``)."""
    if node.level == 0:
        return node.module
    package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _internal_sources(module: ModuleType, node: ast.ImportFrom, target: str) -> list[ModuleType]:
    """The modules that define the names ``node`` imports from the package module ``target``."""
    imported = importlib.import_module(target)
    found = []
    for alias in node.names:
        value = getattr(imported, alias.name, None)
        if isinstance(value, ModuleType):
            raise ArchitectureError(
                f"{module.__name__}: `from {target} import {alias.name}` imports a module; the remote-code generator "
                f"needs the names themselves (from {value.__name__} import ...)."
            )
        owner = inspect.getmodule(value) if value is not None else None
        found.append(owner if owner is not None and _is_internal(owner.__name__) else imported)
    return found


def _parse(module: ModuleType) -> tuple[ast.Module, list[str]]:
    source = inspect.getsource(module)
    return ast.parse(source), source.splitlines()


def _dependencies(module: ModuleType) -> list[ModuleType]:
    """The modules (package or user modules whose names the bundle needs) that ``module`` imports, in order."""
    tree, _ = _parse(module)
    found: list[ModuleType] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(_is_internal(alias.name) for alias in node.names):
            raise ArchitectureError(
                f"{module.__name__}: `import {node.names[0].name}` cannot be bundled into remote code; import the "
                "names you use (from hf_sae import SAEConfig, ...)."
            )
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if _is_internal(target) and target not in _NOT_BUNDLED:
                if node not in tree.body:
                    raise ArchitectureError(
                        f"{module.__name__}, line {node.lineno}: an import of {target} inside a function cannot be "
                        "bundled into remote code; move it to the top of the module."
                    )
                found += [m for m in _internal_sources(module, node, target) if m.__name__ not in _NOT_BUNDLED]
    return list(dict.fromkeys(found))


def _ordered_modules(roots: Sequence[ModuleType]) -> list[ModuleType]:
    """``roots`` and everything they import from the package, dependencies first (a depth-first topological order)."""
    ordered: list[ModuleType] = []
    visiting: set[str] = set()

    def visit(module: ModuleType) -> None:
        if module in ordered:
            return
        if module.__name__ in visiting:
            raise ArchitectureError(f"import cycle through {module.__name__}: the remote-code generator needs a DAG.")
        visiting.add(module.__name__)
        for dependency in _dependencies(module):
            if dependency is not module:
                visit(dependency)
        visiting.discard(module.__name__)
        ordered.append(module)

    for root in roots:
        visit(root)
    return ordered


def _is_registration(node: ast.stmt) -> bool:
    call = node.value if isinstance(node, (ast.Expr, ast.Assign, ast.AnnAssign)) else None
    return (
        isinstance(call, ast.Call)
        and isinstance(call.func, (ast.Name, ast.Attribute))
        and (call.func.id if isinstance(call.func, ast.Name) else call.func.attr) == "register_architecture"
    )


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _module_body(module: ModuleType, external: dict[str, None], owners: dict[str, str]) -> str:
    """The module's source without its docstring, internal imports and registrations; collects external imports."""
    tree, lines = _parse(module)
    drop: set[int] = set()
    for index, node in enumerate(tree.body):
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
        span = range(first, node.end_lineno)
        is_docstring = index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            drop.update(span)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if not (isinstance(node, ast.ImportFrom) and _is_internal(_resolve(module, node))):
                external["\n".join(lines[first : node.end_lineno])] = None
            drop.update(span)
        elif is_docstring or _is_registration(node):
            drop.update(span)
        for name in _defined_names(node):
            if name in owners and owners[name] != module.__name__ and not name.startswith("__"):
                raise ArchitectureError(
                    f"{module.__name__} and {owners[name]} both define {name!r} at module level; the remote-code "
                    "bundle puts them in one namespace. Rename one of them."
                )
            owners[name] = module.__name__
    kept = [line for number, line in enumerate(lines) if number not in drop]
    return "\n".join(kept).strip("\n")


def generate_remote_code(selected: Sequence[Architecture] | None = None) -> str:
    """The self-contained modeling file for ``selected`` architectures (default: the package's own)."""
    if selected is None:
        selected = [a for a in architectures() if all(_is_internal(m.__name__) for m in a.modules)]
    roots = [module for architecture in selected for module in architecture.modules]
    modules = _ordered_modules(roots)
    external: dict[str, None] = {}
    owners: dict[str, str] = {}
    bodies = [(module, _module_body(module, external, owners)) for module in modules]
    classes = ", ".join(f"{a.config_class.__name__} + {a.model_class.__name__}" for a in selected)
    parts = [
        '"""Self-contained hf-sae SAEs for `AutoModel.from_pretrained(repo, trust_remote_code=True)` without hf-sae.',
        "",
        f"GENERATED from the sources of hf-sae {__version__}; do not edit. Architectures: {classes}.",
        "With hf-sae installed, `import hf_sae` and leave trust_remote_code off to get the same classes from the",
        'package (and its compiled kernels).\n"""',
        "",
        "from __future__ import annotations",
        "",
        *external,
    ]
    for module, body in bodies:
        rule = "# " + "-" * 100
        parts += ["", "", rule, f"# from {module.__name__} ({Path(inspect.getsourcefile(module)).name})", rule, body]
    return "\n".join(parts).rstrip() + "\n"


def add_remote_code(folder: str | Path, selected: Sequence[Architecture | str] | Architecture | str) -> None:
    """Write the modeling file into ``folder`` and point its config.json's ``auto_map`` at the first architecture.

    ``selected``: architectures, or their ``model_type`` / preset names (one or several).
    """
    folder = Path(folder)
    selected = [selected] if isinstance(selected, (str, Architecture)) else list(selected)
    selected = [architecture_of(item) if isinstance(item, str) else item for item in selected]
    write_text_atomic(folder / REMOTE_CODE_NAME, generate_remote_code(selected))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    module = REMOTE_CODE_NAME[: -len(".py")]
    config["auto_map"] = {
        "AutoConfig": f"{module}.{selected[0].config_class.__name__}",
        "AutoModel": f"{module}.{selected[0].model_class.__name__}",
    }
    write_json_atomic(config_path, config, sort_keys=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hf_sae.remote_code OUT.py``: write the modeling file of the package's own architectures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m hf_sae.remote_code OUT.py", file=sys.stderr)
        return 2
    try:
        code = generate_remote_code()
        write_text_atomic(argv[0], code)
    except HfSaeError as error:
        print(f"hf-sae: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {argv[0]} ({len(code.splitlines())} lines)")
    return 0
