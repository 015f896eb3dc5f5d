"""The remote-code file is generated from the package's own sources (never a hand copy)."""

from __future__ import annotations

import ast
import inspect

from hf_sae.registry import architectures
from hf_sae.remote_code import generate_remote_code


def test_the_generated_file_is_the_package_source_without_internal_imports():
    code = generate_remote_code()
    tree = ast.parse(code)  # one valid module
    internal = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("hf_sae"))
    ]
    assert not internal
    defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef | ast.FunctionDef)}
    for architecture in [a for a in architectures() if a.model_class.__module__.startswith("hf_sae.")]:
        assert {architecture.config_class.__name__, architecture.model_class.__name__} <= defined
        for cls in (architecture.config_class, architecture.model_class):
            assert inspect.getsource(cls) in code  # verbatim: the remote classes are the package's classes
    assert "register_architecture(" not in code
