import json
import os
import subprocess
import sys

import numpy as np
import pytest

from esm2cli.runtime.memory import KERNEL_CACHE_VARIABLES, bound_kernel_caches, release_free_memory


def _env_without(*names):
    return {k: v for k, v in os.environ.items() if k not in names}


def test_kernel_caches_are_bounded_before_the_first_forward_unless_the_user_set_them(tiny_model_dir):
    names = KERNEL_CACHE_VARIABLES
    script = f"""
import os, json
from esm2cli.config import EmbedConfig, ModelConfig
from esm2cli.runtime.engine import build_engine
seen = {{k: os.environ.get(k) for k in {names!r}}}
setup = build_engine(ModelConfig(model={tiny_model_dir!r}, devices="cpu"), EmbedConfig())
print(json.dumps([seen, {{k: os.environ.get(k) for k in {names!r}}}]))
"""
    env = _env_without(*KERNEL_CACHE_VARIABLES)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(before.values()) == {None}
    assert all(int(v) >= 1 for v in after.values())
    env["LRU_CACHE_CAPACITY"] = "500"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    _, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert after["LRU_CACHE_CAPACITY"] == "500"  # the user's value is kept


def test_bound_is_never_zero(monkeypatch):
    for name in KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert set(bound_kernel_caches(0).values()) == {"1"}  # 0 crashes ideep: never written


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc")
def test_release_free_memory_hands_freed_heap_back():
    # 200 MB in blocks small enough for the heap, one in 64 kept so that the heap cannot shrink from its top
    blocks = [np.ones(1000) for _ in range(25_000)]
    keep = blocks[::64]
    del blocks
    before = _rss_mb()
    assert release_free_memory()
    assert _rss_mb() < before - 100
    assert keep


def test_the_cli_makes_openmp_threads_wait_passively_before_torch_loads():
    script = "import sys, os; import esm2cli.cli; print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])"
    env = _env_without("OMP_WAIT_POLICY")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "PASSIVE"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "ACTIVE"]  # the user's choice is kept
