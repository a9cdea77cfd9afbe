"""The GitHub Actions workflow runs what a developer runs: make test on 3.11 and 3.12 with a pip cache, make lint."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_workflow() -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())


def test_matrix_runs_the_readme_test_command_and_the_lint():
    job = load_workflow()["jobs"]["test"]
    assert job["strategy"]["matrix"]["python-version"] == ["3.11", "3.12"]
    runs = [step.get("run", "").strip() for step in job["steps"]]
    assert "make test" in runs and "make lint" in runs and "make docs" in runs
    assert "make test" in (ROOT / "README.md").read_text()  # the README's command
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert ci_run.strip().endswith("make test") and "make docs" in ci_run  # .ci/run runs the same
    assert re.search(r"^docs:.*\n\t.*mkdocs build --strict", (ROOT / "Makefile").read_text(), re.M)


def test_pip_cache_keyed_on_the_pins_and_torch_from_the_cpu_index():
    job = load_workflow()["jobs"]["test"]
    (setup,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@")]
    assert setup["with"]["cache"] == "pip"
    assert set(setup["with"]["cache-dependency-path"].split()) == {"pyproject.toml", "constraints.txt"}
    assert job["env"]["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # the Makefile installs with the constraints, where torch is pinned (to the CPU build on that index)
    assert re.search(r"-c constraints\.txt -e \"\.\[dev\]\"", (ROOT / "Makefile").read_text())
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "constraints.txt").read_text(), re.M)
