"""The package's layout contract: layers run one way, no import cycles, no module over 600 lines, functions a
newcomer can change (complexity, positional parameters), a test file for each module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "esm2cli"
SUBPACKAGES = ("cli", "io", "model", "runtime", "jobs", "serve")
MAX_LINES = 600
MAX_POSITIONAL = 6  # past it, call sites pass values by position that nobody can check by reading
MAX_UNTESTED_MODULES = 8


def test_layers_contract_is_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_module_imports_another_that_imports_it_back():
    graph = grimp.build_graph("esm2cli", include_external_packages=False)
    cycles = sorted(
        {
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.chain_exists(importer=imported, imported=module)
        }
    )
    assert cycles == []


def test_a_layer_violation_would_be_caught(tmp_path):
    """The contract can fail: a copy of the package with io importing jobs breaks it."""
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "esm2cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    fasta = copy / "esm2cli" / "io" / "fasta.py"
    fasta.write_text(fasta.read_text() + "\n\ndef _bad():\n    from esm2cli.jobs import pipeline  # noqa\n")
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    env = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([lint], cwd=copy, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0 and "esm2cli.io.fasta -> esm2cli.jobs.pipeline" in result.stdout


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_short(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_every_subpackage_says_what_it_owns_and_may_import():
    for name in SUBPACKAGES:
        doc = (PACKAGE / name / "__init__.py").read_text()
        assert doc.startswith('"""') and "import" in doc, name


def test_public_entry_points():
    import esm2cli
    from esm2cli import Embedder
    from esm2cli.api import Embedder as ApiEmbedder
    from esm2cli.cli import cli

    assert Embedder is ApiEmbedder and esm2cli.__version__
    assert set(cli.commands) == {"embed", "serve", "score", "bench", "merge", "download", "index", "search", "map"}
    run = subprocess.run([sys.executable, "-m", "esm2cli", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "embed" in run.stdout


def test_help_does_not_import_torch():
    code = "import sys; from esm2cli.cli import cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.stdout.split() == ["False", "False"], run.stderr


def _ruff() -> str:
    return shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))


def test_no_function_outside_the_commands_is_over_complexity_15():
    # pyproject.toml sets the bound and exempts esm2cli/cli/ (Click commands are flat lists of options).
    result = subprocess.run(
        [_ruff(), "check", "--select", "C901", "--output-format", "concise", "esm2cli"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def _positional(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    names = [a.arg for a in node.args.posonlyargs + node.args.args]
    return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)


def _too_many_positional(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({_positional(node)})"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _positional(node) > MAX_POSITIONAL
    ]


def test_no_function_outside_the_commands_takes_more_than_6_positional_parameters():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if "cli" not in path.relative_to(PACKAGE).parts[:1]
             for hit in _too_many_positional(path)]  # fmt: skip
    assert found == []


def test_the_positional_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(a, b, c, d, e, f, g):\n    pass\n\n\nclass C:\n    def m(self, a, b, c, d, e, f):\n        pass\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert [hit.split()[1] for hit in _too_many_positional(bad)] == ["f"]
    finally:
        ROOT = saved


def test_each_module_has_a_test_file_of_its_own_name():
    tests = {path.stem for path in (ROOT / "tests").rglob("test_*.py")}
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p.stem not in ("__init__", "__main__")]
    untested = [str(p.relative_to(PACKAGE)) for p in modules if f"test_{p.stem}" not in tests]
    assert len(untested) <= MAX_UNTESTED_MODULES, untested
