"""The package's folders follow the flow arch → data → dp → search → analysis, and imports only point down it.

Every import statement of every module is read with ``ast`` (lazy imports inside functions included), so a
module that reaches up the flow fails here even if it does so only on one code path.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import dpnas

PACKAGE_ROOT = Path(dpnas.__file__).parent

# Which dpnas subpackages each layer may import. The top level (cli, bench, reproduce, results) may import anything.
ALLOWED = {
    "arch": set(),
    "data": set(),
    "dp": {"arch", "data"},
    "search": {"arch", "data", "dp"},
    "analysis": {"arch", "dp", "search"},
}
TOP_LEVEL_MODULES = {"__init__", "__main__", "cli", "bench", "reproduce", "results"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE_ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _layer_of(path: Path) -> str | None:
    """The subpackage a module lives in, or None for a top-level module."""
    relative = path.relative_to(PACKAGE_ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else None


def _dpnas_imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted target) for every import of dpnas in one module, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ["dpnas", *path.relative_to(PACKAGE_ROOT).parent.parts]
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "dpnas":
                # `from dpnas import X`: X may be a subpackage (a layer) or a name of the top-level package.
                targets += [(node.lineno, f"dpnas.{alias.name}") for alias in node.names]
            else:
                targets.append((node.lineno, module))
    return [(line, t) for line, t in targets if t == "dpnas" or t.startswith("dpnas.")]


def _target_layer(target: str) -> str | None:
    parts = target.split(".")
    if len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return None  # the top-level package or one of its modules


def import_violations(paths: list[Path]) -> list[str]:
    problems = []
    for path in paths:
        layer = _layer_of(path)
        if layer is None:
            continue
        for line, target in _dpnas_imports(path):
            target_layer = _target_layer(target)
            if target_layer == layer:
                continue
            if target_layer is None or target_layer not in ALLOWED[layer]:
                where = path.relative_to(PACKAGE_ROOT.parent)
                problems.append(f"{where}:{line} ({layer}) imports {target}")
    return problems


def test_every_module_sits_in_a_layer_or_is_a_known_top_level_module():
    for path in _modules():
        layer = _layer_of(path)
        if layer is None:
            assert path.stem in TOP_LEVEL_MODULES, f"{path.name} is a new top-level module: put it in a layer"
        else:
            assert layer in ALLOWED, f"{path} is in an unknown subpackage {layer!r}"


def test_imports_only_point_down_the_flow():
    assert import_violations(_modules()) == []


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_says_its_concern_and_what_it_may_import(layer):
    docstring = ast.get_docstring(ast.parse((PACKAGE_ROOT / layer / "__init__.py").read_text(encoding="utf-8")))
    assert docstring, f"dpnas/{layer}/__init__.py has no docstring"
    may_import = [line for line in docstring.splitlines() if line.startswith("May import:")]
    assert len(may_import) == 1, f"dpnas/{layer}/__init__.py does not say what it may import"
    named = {word.strip(" .,").removeprefix("dpnas.") for word in may_import[0].removeprefix("May import:").split(",")}
    assert named - {"nothing of dpnas"} == ALLOWED[layer]


@pytest.mark.parametrize("source, expected", [
    ("from dpnas.search.privacy import ORDERS\n", ["dpnas/dp/bad.py:1 (dp) imports dpnas.search.privacy"]),
    ("def f():\n    from dpnas.analysis import frame\n", ["dpnas/dp/bad.py:2 (dp) imports dpnas.analysis"]),
    ("from dpnas import __version__\n", ["dpnas/dp/bad.py:1 (dp) imports dpnas.__version__"]),
    ("from ..search import runner\n", ["dpnas/dp/bad.py:1 (dp) imports dpnas.search"]),
    ("import dpnas.cli\n", ["dpnas/dp/bad.py:1 (dp) imports dpnas.cli"]),
    ("from dpnas.arch.space import ConfigError\nfrom . import engine\nimport torch\n", []),
])
def test_the_checker_catches_upward_imports(tmp_path, monkeypatch, source, expected):
    # A fake package tree with one module in dp/: the checker must flag upward imports of every form.
    root = tmp_path / "dpnas"
    (root / "dp").mkdir(parents=True)
    bad = root / "dp" / "bad.py"
    bad.write_text(source, encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_ROOT", root)
    assert import_violations([bad]) == expected


def test_public_api_is_unchanged():
    from dpnas import MODELS, ArchConfig, ConfigError, build_model, count_parameters, get_arch, load_arch_file

    assert isinstance(dpnas.__version__, str) and dpnas.__version__
    model = build_model(get_arch("tiny"), num_classes=10, in_channels=3)
    assert count_parameters(model) == 9_593
    assert "smoothnet" in MODELS and ArchConfig().norm == "group"
    assert issubclass(ConfigError, ValueError) and callable(load_arch_file)
