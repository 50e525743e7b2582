"""The layering users rely on: jobs -> pipeline -> (models, storage); models and storage import without Beam."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("models", "storage", "pipeline", "jobs")
# What each layer may import from premem.  models may use the two leaves of storage (errors.py, tensors.py: they
# import nothing from premem but errors), so that every layer raises the same errors and pads the same way.
ALLOWED = {
    "storage": {"storage"},
    "models": {"models", "storage.errors", "storage.tensors"},
    "pipeline": {"pipeline", "models", "storage"},
    "jobs": {"jobs", "pipeline", "models", "storage"},
}


def _modules():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            yield layer, path


def _premem_imports(layer: str, tree: ast.AST):
    """(line, 'storage.kv', names) for every import of premem code, at any depth (function-level ones too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("premem."):
                    yield node.lineno, alias.name[len("premem."):], []
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:  # relative: from .x import y inside premem.<layer>
                base = layer + ("." + node.module if node.module else "")
            elif node.module and node.module.startswith("premem."):
                base = node.module[len("premem."):]
            else:
                continue
            if base in LAYERS:  # from premem.storage import kv: kv may be a module
                for name in names:
                    yield node.lineno, f"{base}.{name}" if (ROOT / base / f"{name}.py").exists() else base, [name]
            else:
                yield node.lineno, base, names


def _allowed(layer: str, target: str) -> bool:
    return any(target == a or target.startswith(a + ".") for a in ALLOWED[layer])


def test_no_import_runs_against_the_layers():
    wrong = []
    for layer, path in _modules():
        for line, target, _ in _premem_imports(layer, ast.parse(path.read_text())):
            if not _allowed(layer, target):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports premem.{target}")
    assert not wrong, "imports against jobs -> pipeline -> (models, storage):\n" + "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for layer, path in _modules():
        tree = ast.parse(path.read_text())
        modules = {}  # local name -> premem module it is bound to
        for line, target, names in _premem_imports(layer, tree):
            wrong += [f"{path.relative_to(ROOT)}:{line} imports {n} from premem.{target}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("premem."):
                base = node.module[len("premem."):]
                for alias in node.names:
                    if (ROOT / base / f"{alias.name}.py").exists():
                        modules[alias.asname or alias.name] = f"{base}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def test_models_and_storage_import_without_beam():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys

        class NoBeam:
            def find_spec(self, name, path=None, target=None):
                if name == "apache_beam" or name.startswith("apache_beam."):
                    raise ImportError(f"{name} is blocked in this test")

        sys.meta_path.insert(0, NoBeam())
        import premem.models, premem.storage
        for package in (premem.models, premem.storage):
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{package.__name__}.{info.name}")
        from premem.storage import MemoryStore, open_store  # the lazy exports resolve too
        assert not [m for m in sys.modules if m.startswith("apache_beam")]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_layer_check_catches_a_wrong_arrow():
    tree = ast.parse("from premem.pipeline.read import Reject\nfrom .encoder import x\nimport premem.jobs.cli\n")
    found = [(t, _allowed("storage", t)) for _, t, _ in _premem_imports("storage", tree)]
    assert found == [("pipeline.read", False), ("storage.encoder", True), ("jobs.cli", False)]
