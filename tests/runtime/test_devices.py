import pytest
import torch

from esm2cli.errors import DeviceError
from esm2cli.runtime.devices import resolve_devices


@pytest.fixture
def gpus(monkeypatch):
    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def names(spec):
    return [d.name for d in resolve_devices(spec)]


@pytest.mark.parametrize("count", [0, 1, 4, 8])
def test_auto_uses_every_gpu_or_the_cpu(gpus, count):
    gpus(count)
    devices = resolve_devices("auto")
    if count == 0:
        assert all(d.torch_device == "cpu" and not d.is_cuda and not d.simulated for d in devices)
    else:
        assert [d.name for d in devices] == [f"cuda:{i}" for i in range(count)]
        assert all(d.is_cuda and not d.simulated for d in devices)


def test_cuda_reported_but_unavailable_means_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert all(d.torch_device == "cpu" for d in resolve_devices("auto"))


def test_count_list_and_cpu(gpus):
    gpus(4)
    assert names("2") == ["cuda:0", "cuda:1"]
    assert names("cuda:0, cuda:2") == ["cuda:0", "cuda:2"]
    assert names("cpu") == ["cpu"]
    assert names("0") == ["cpu"]


def test_simulated_devices_live_on_the_cpu(gpus):
    gpus(0)
    devices = resolve_devices("sim:4")
    assert [d.name for d in devices] == ["sim:0", "sim:1", "sim:2", "sim:3"]
    assert all(d.torch_device == "cpu" and d.simulated and not d.is_cuda for d in devices)


@pytest.mark.parametrize(
    "count, spec, message",
    [
        (1, "4", "asked for 4 CUDA device"),
        (0, "1", "use --devices sim:1"),
        (2, "cuda:5", "cuda:5 but this machine has 2"),
        (2, "cuda:0,cuda:0", "twice"),
        (2, "gpu0", "cannot read --devices"),
        (2, "sim:0", "N >= 1"),
        (2, "", "cannot read"),
    ],
)
def test_bad_specs(gpus, count, spec, message):
    gpus(count)
    with pytest.raises(DeviceError, match=message):
        resolve_devices(spec)


def test_dtype_auto_picks_bf16_only_where_native(gpus, monkeypatch):
    from esm2cli.runtime import devices as devmod

    gpus(2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert devmod.resolve_dtype("auto", resolve_devices("auto")) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devmod.resolve_dtype("auto", resolve_devices("auto")) == "float32"
    for has_bf16, expected in [(True, "bfloat16"), (False, "float32")]:
        monkeypatch.setattr(devmod, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert devmod.resolve_dtype("auto", resolve_devices("sim:3")) == expected
    assert devmod.resolve_dtype("float16", resolve_devices("cpu")) == "float16"


def test_cpu_bf16_detection_reads_cpu_flags(monkeypatch, tmp_path):
    import builtins

    from esm2cli.runtime import devices as devmod

    real_open = builtins.open

    def fake(flags):
        def opener(path, *args, **kwargs):
            if path == "/proc/cpuinfo":
                path = tmp_path / "cpuinfo"
                path.write_text(f"processor : 0\nflags : fpu sse2 {flags}\n")
            return real_open(path, *args, **kwargs)

        return opener

    monkeypatch.setattr(builtins, "open", fake("avx512f avx512_bf16"))
    assert devmod.cpu_has_bf16()
    monkeypatch.setattr(builtins, "open", fake("avx512f amx_tile amx_bf16"))
    assert devmod.cpu_has_bf16()
    monkeypatch.setattr(builtins, "open", fake("avx2 avx512f"))
    assert not devmod.cpu_has_bf16()


@pytest.mark.parametrize(
    "cores, expected", [(1, ["cpu"]), (2, ["cpu:0", "cpu:1"]), (32, [f"cpu:{i}" for i in range(8)])]
)
def test_auto_on_the_cpu_is_one_replica_per_core(gpus, monkeypatch, cores, expected):
    import os

    gpus(0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert names("auto") == expected
