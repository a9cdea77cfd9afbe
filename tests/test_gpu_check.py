"""benchmarks/gpu_check.sh on a machine that is not ready: it stops at once naming what is missing, and a step
that fails (or never measured its input) fails the check instead of being printed as a figure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bare_python(folder: Path) -> Path:
    """A python3 that imports nothing beyond the standard library (-I -S: no site-packages, no PYTHONPATH)."""
    folder.mkdir()
    python = folder / "python3"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    python.chmod(0o755)
    return python


def _run(env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("how", ["PATH", "PYTHON"])
def test_stops_within_seconds_naming_what_does_not_import(tmp_path, how):
    python = _bare_python(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH", "GPU_CHECK_PARTS")}
    env["OUT"] = str(tmp_path / "out")
    if how == "PATH":
        env["PATH"] = f"{python.parent}{os.pathsep}{env['PATH']}"
    else:
        env["PYTHON"] = str(python)
    proc, seconds = _run(env, timeout=60)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert seconds <= 30, seconds
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    assert "cannot import torch, transformers" in lines[0] and "biopython" in lines[0] and "fastapi" in lines[0]
    assert "carry .whl: make gpu-wheels" in lines[0]
    out = tmp_path / "out"
    assert (out / "summary.txt").read_text().strip() == lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["run.log", "summary.txt"]  # no step ran


def test_a_step_without_its_measured_input_fails_instead_of_printing_a_fallback(tmp_path):
    """The gil step models 8 cards at the host cost the forward step measured; with no such figure it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable, GPU_CHECK_PARTS="gil",
               GPU_CHECK_IMPORT_TIMEOUT="240")  # fmt: skip
    proc, _ = _run(env, timeout=300)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "8 modeled cards: FAILED (no host cost measured" in summary
    assert "--launch-ms" not in summary and "ms a forward)" not in summary  # no figure stands in for the measure
    assert summary.rstrip().endswith("gpu_check: a step FAILED (see above and run.log)")
