"""Packaging: the wheel builds without warnings and holds the package; --version; project metadata."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from esm2cli import __version__
from esm2cli.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_option_prints_the_package_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"esm2cli, version {__version__}"
    assert PYPROJECT["project"]["version"] == __version__  # one version, in both places


def test_metadata_has_urls_and_classifiers_for_the_tested_pythons():
    project = PYPROJECT["project"]
    assert {"Homepage", "Repository", "Issues"} <= set(project["urls"])
    classifiers = set(project["classifiers"])
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    for version in ("3.11", "3.12"):
        assert f"Programming Language :: Python :: {version}" in classifiers
        assert f'"{version}"' in workflow  # the versions claimed are the versions CI runs
    assert not any(c.startswith("License ::") for c in classifiers)  # the SPDX expression says it (PEP 639)


@pytest.mark.slow
def test_wheel_builds_without_warnings_and_holds_every_module(tmp_path):
    pytest.importorskip("setuptools")
    source, dist = tmp_path / "src", tmp_path / "dist"  # a copy: the build writes build/ and *.egg-info in it
    shutil.copytree(ROOT / "esm2cli", source / "esm2cli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(dist),
         "-v", "--disable-pip-version-check"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    output = (build.stdout + build.stderr).lower()
    assert "warning" not in output and "deprecat" not in output, output
    (wheel,) = dist.glob("esm2cli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "esm2cli").rglob("*.py")}
    assert modules | {"esm2cli/model/esm_vocab.txt"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    metadata = zipfile.ZipFile(wheel).read(f"esm2cli-{__version__}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata and "Project-URL: Repository," in metadata
    entry_points = zipfile.ZipFile(wheel).read(f"esm2cli-{__version__}.dist-info/entry_points.txt").decode()
    assert "esm2cli = esm2cli.cli:cli" in entry_points
