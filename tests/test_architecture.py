"""The package's layout contract: layers run one way, no import cycles, no module over 600 lines."""

from __future__ import annotations

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
    assert set(cli.commands) == {"embed", "serve", "score", "bench", "merge", "download"}
    run = subprocess.run([sys.executable, "-m", "esm2cli", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "embed" in run.stdout


def test_help_does_not_import_torch():
    code = "import sys; from esm2cli.cli import cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.stdout.split() == ["False", "False"], run.stderr
