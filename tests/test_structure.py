"""The package's shape: test fixtures stay out of the runtime, and the cluster does not
reach back into the text server's loading code."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cake"


def imports_of(path: Path) -> set[str]:
    """Every cake module a file imports, at the top or inside a function."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                parent = module.split(".")[: -node.level]
                base = ".".join(parent + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("cake")}


def test_runtime_never_imports_the_fixtures():
    for path in PACKAGE.rglob("*.py"):
        if "testing" in path.relative_to(PACKAGE).parts:
            continue
        bad = {m for m in imports_of(path) if m.startswith("cake.testing")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    code = ("import sys, cake.cli, cake.server.app, cake.commands.serve; "
            "print(sorted(m for m in sys.modules if m.startswith('cake.testing')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_fixtures_are_not_in_the_runtime_folders():
    for name in ("image/tiny.py", "audio/vibevoice/random_model.py"):
        assert not (PACKAGE / name).exists()


def test_cluster_does_not_import_text_serving():
    # stage -> text.serving -> cluster.pipeline -> stage was a circle: device choice now
    # lives in cake.device.
    for path in (PACKAGE / "cluster").glob("*.py"):
        assert "cake.text.serving" not in imports_of(path), path.name


def test_no_exception_is_swallowed_silently():
    """`except Exception: pass` hides failures: a broad handler must log, re-raise or act."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ExceptHandler):
                continue
            broad = node.type is None or ast.unparse(node.type) in ("Exception", "BaseException")
            silent = all(isinstance(b, (ast.Pass, ast.Continue)) for b in node.body)
            assert not (broad and silent), f"{path.relative_to(ROOT)}:{node.lineno}"
