"""The 0.1.0 API still works after the redesign: every public name of 0.1.0 resolves (old module
paths warn DeprecationWarning naming the new one), ``import clustermac`` stays lean, and the
package's import graph has no cycle."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import clustermac
from clustermac import _compat

# Per module of 0.1.0, the public names it defined itself (names it imported from elsewhere are not
# its API); written by tests/data/v0.1.0's version of clustermac.
PUBLIC_NAMES = json.loads((Path(__file__).parent / "data" / "v0.1.0" / "public_names.json").read_text())


@pytest.mark.parametrize("module", sorted(PUBLIC_NAMES))
def test_every_public_name_of_0_1_0_resolves(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        imported = importlib.import_module(module)
        missing = [n for n in PUBLIC_NAMES[module] if not hasattr(imported, n)]
    assert not missing, f"{module} lost {missing}"


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_old_module_paths_warn_and_reach_the_new_code(old):
    new = importlib.import_module(_compat.MOVED[old][0])
    code = (
        "import warnings, importlib\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        f"try:\n    importlib.import_module({old!r})\nexcept DeprecationWarning as w:\n    print(w)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert new.__name__ in result.stdout and old in result.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        shim = importlib.import_module(old)
    # Names read through the old path are the new module's objects, not copies.
    shared = [
        n for n in vars(new) if not n.startswith("_") and getattr(vars(new)[n], "__module__", None) == new.__name__
    ]
    assert shared, f"{new.__name__} defines nothing public"
    for name in shared:
        assert getattr(shim, name) is vars(new)[name]


def test_attribute_access_to_an_old_module_warns():
    # In a fresh interpreter: once imported, clustermac.rerank is a plain attribute of the package.
    code = (
        "import warnings, clustermac\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    module = clustermac.rerank\n"
        "assert module.aml_rerank is clustermac.aml_rerank\n"
        "print(caught[0].category.__name__, caught[0].message)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("DeprecationWarning") and "clustermac.search.rerank" in result.stdout


def test_import_clustermac_is_lean():
    code = "import sys, clustermac; print('\\n'.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
        ).stdout.split()
    )
    heavy = {"onnx", "onnxruntime", "faiss", "tqdm", "torch", "PIL.ImageDraw", "PIL.ImageFont", "scipy", "sklearn"}
    assert not {m for m in loaded if m.startswith("clustermac.bench")}
    assert not heavy & loaded
    assert "clustermac.descriptors" in loaded and "clustermac.search" in loaded


def _intra_package_imports(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (module level or inside functions; imports under
    ``if TYPE_CHECKING:`` run only for type checkers and are left out)."""
    modules = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_checking = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        edges = set()
        for node in ast.walk(tree):
            if id(node) in type_checking or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, node.module or ""]).strip(".")
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # A module's own parent packages are loaded first anyway: not an edge of a cycle.
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_in_the_package():
    root = Path(clustermac.__file__).parent
    graph = _intra_package_imports(root)
    assert len(graph) > 30 and "clustermac.descriptors.extractor" in graph
    assert _cycles(graph) == []
