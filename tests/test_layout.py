"""The layout's rules, checked on the source: what may import what, and what stays light.

- The product (rcllm_sdk/, kernels/, pipelines/, evaluation/) imports nothing from research/.
- Module-level imports between product modules form no cycle.
- Planning modules, the config and the CLI parser import no heavy library (checked in a fresh
  interpreter, so nothing another test imported counts).
- ``import rcllm_sdk`` leaves the process environment as it found it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (pyproject.toml's package-dir).
PACKAGES = {
    "rcllm_sdk": "rcllm_sdk",
    "kernels": "rcllm_sdk.kernels",
    "pipelines": "rcllm_sdk.pipelines",
    "evaluation": "rcllm_sdk.evaluation",
}
HEAVY = ("torch", "transformers", "feast", "lmcache", "mlflow", "polars")


def _product_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    """Absolute names a module imports (``from . import x`` resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_product_never_imports_research():
    offenders = {
        module: sorted(
            n for n in _imports(module, path, top_level_only=False) if n.split(".")[0] == "research"
        )
        for module, path in _product_modules().items()
    }
    assert {m: names for m, names in offenders.items() if names} == {}


def test_research_is_not_installed_with_the_package():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = (
        set(setuptools["packages"]) | set(setuptools["package-dir"]) | set(setuptools["package-dir"].values())
    )
    assert not {name for name in installed if name.split(".")[0] == "research"}
    assert set(setuptools["package-dir"].values()) == set(PACKAGES)


def test_module_level_imports_between_product_modules_have_no_cycle():
    modules = _product_modules()
    graph = {
        module: {n for n in _imports(module, path, top_level_only=True) if n in modules and n != module}
        for module, path in modules.items()
    }
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(module) :] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, stack + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def _heavy_after(code: str) -> list[str]:
    loaded = "sorted({m.split('.')[0] for m in sys.modules} & " + repr(set(HEAVY)) + ")"
    probe = f"{code}\nimport sys, json\nprint(json.dumps({loaded}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import rcllm_sdk",
        "import rcllm_sdk.config",
        "import rcllm_sdk.runtime.policies",
        "import rcllm_sdk.prompt",
        "import rcllm_sdk.cache.placement",
        "from rcllm_sdk.cli import build_parser; build_parser()",
    ],
)
def test_light_modules_import_no_heavy_library(code):
    assert _heavy_after(code) == []


@pytest.mark.parametrize("command", ["--help", "recommend --help", "train --help", "bench --help"])
def test_cli_help_imports_no_heavy_library(command):
    code = (
        "from rcllm_sdk.cli import build_parser\n"
        f"try:\n    build_parser().parse_args({command.split()!r})\nexcept SystemExit:\n    pass"
    )
    assert _heavy_after(code) == []


def test_importing_the_package_leaves_the_environment_alone():
    probe = "import os; before = dict(os.environ); import rcllm_sdk; print(dict(os.environ) == before)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "True"
