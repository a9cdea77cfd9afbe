"""Device detection and the --devices spec: auto, cpu, a count, cuda:0,cuda:2, or sim:N."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from esm2cli.config import GPU_PEAKS, ModeledGPU
from esm2cli.errors import DeviceError

_SIM = re.compile(r"^sim:(\d+)$")
_CUDA = re.compile(r"^cuda:(\d+)$")


@dataclass(frozen=True)
class Device:
    """One logical device that holds one model replica.

    Attributes:
        name: What users see: "cpu", "cuda:1", "sim:3" for a simulated device, "h100:2" for a modeled GPU.
        torch_device: Where the replica's tensors live: "cpu" or "cuda:N".
        card: For a modeled GPU (esm2cli.runtime.modeled), the card it models; None for real devices.
    """

    name: str
    torch_device: str
    card: str | None = None

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.startswith("cuda")

    @property
    def is_gpu(self) -> bool:
        """A CUDA device or a modeled GPU: what decides GPU defaults such as the token budget."""
        return self.is_cuda or self.card is not None

    @property
    def simulated(self) -> bool:
        return self.name.startswith("sim:")


def cpu_has_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def supports_bf16(device: Device) -> bool:
    """True when bfloat16 runs natively (and fast) on this device."""
    if device.card is not None:
        return True  # every modeled card (Ampere and later) has bf16 tensor cores
    if device.is_cuda:
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def resolve_dtype(dtype: str, devices: list[Device]) -> str:
    """Turns --dtype auto into bfloat16 when every device supports it natively, else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if all(supports_bf16(d) for d in devices) else "float32"


MAX_CPU_REPLICAS = 8


def cpu_devices() -> list[Device]:
    """The CPU as one replica per core (at most 8), each running single-threaded.

    On the CPU, N single-threaded replicas embed more residues per second than one replica
    with N threads: small matrix products and element-wise kernels scale poorly across threads
    (benchmarks/RESULTS.md). The replicas share one copy of the weights.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores <= 1:
        return [Device("cpu", "cpu")]
    return [Device(f"cpu:{i}", "cpu") for i in range(min(cores, MAX_CPU_REPLICAS))]


def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 when CUDA is unavailable)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cuda_devices(indices: list[int]) -> list[Device]:
    available = cuda_device_count()
    missing = [i for i in indices if i >= available]
    if missing:
        found = f"{available} CUDA device(s)" if available else "no CUDA device"
        raise DeviceError(f"asked for cuda:{missing[0]} but this machine has {found}")
    return [Device(f"cuda:{i}", f"cuda:{i}") for i in indices]


def modeled_devices(gpus: ModeledGPU) -> list[Device]:
    """``gpus.count`` modeled GPUs of one card, named like "a100:0".

    Raises:
        DeviceError: The card is unknown or the count is below 1.
    """
    card = gpus.card.lower()
    if card not in GPU_PEAKS:
        raise DeviceError(f"no model of the GPU {gpus.card!r}; use one of {', '.join(GPU_PEAKS)}")
    if gpus.count < 1:
        raise DeviceError("modeled GPUs need a count of at least 1")
    return [Device(f"{card}:{i}", "cpu", card=card) for i in range(gpus.count)]


def resolve_devices(spec: str) -> list[Device]:
    """Turns a --devices spec into the list of devices that get one replica each.

    Args:
        spec: "auto" (every CUDA device, else one single-threaded replica per CPU core), "cpu" (one
            replica using every core), a count N (the first N CUDA
            devices), a comma list such as "cuda:0,cuda:2", or "sim:N" (N simulated devices
            whose replicas all live on the CPU).

    Raises:
        DeviceError: The spec is malformed or names devices this machine lacks.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        n = cuda_device_count()
        return _cuda_devices(list(range(n))) if n else cpu_devices()
    if spec == "cpu":
        return [Device("cpu", "cpu")]
    if spec.isdigit():
        n = int(spec)
        if n == 0:
            return [Device("cpu", "cpu")]
        if n > cuda_device_count():
            raise DeviceError(
                f"asked for {n} CUDA device(s) but this machine has {cuda_device_count()}; "
                f"use --devices sim:{n} to simulate them on the CPU"
            )
        return _cuda_devices(list(range(n)))
    if m := _SIM.match(spec):
        n = int(m.group(1))
        if n < 1:
            raise DeviceError("sim:N needs N >= 1")
        return [Device(f"sim:{i}", "cpu") for i in range(n)]
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    matches = [_CUDA.match(p) for p in parts]
    if not parts or not all(matches):
        raise DeviceError(
            f"cannot read --devices {spec!r}: use auto, cpu, a count, a list like cuda:0,cuda:2, or sim:N"
        )
    indices = [int(m.group(1)) for m in matches if m]
    if len(set(indices)) != len(indices):
        raise DeviceError(f"--devices {spec!r} names a device twice")
    return _cuda_devices(indices)
