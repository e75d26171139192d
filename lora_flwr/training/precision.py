"""Which autocast precision to train and evaluate in (``compute.precision``).

``"auto"`` picks bf16 autocast only where the hardware runs it natively:

* CUDA with bf16 support (Ampere and later): ``bf16``.
* CPU whose flags include ``amx_bf16`` (Intel AMX) or ``avx512_bf16``: ``bf16``.
  Without them (e.g. an AVX2-only CPU) PyTorch emulates bf16 matmuls, which is
  slower than fp32, so ``auto`` stays ``fp32``.
* Anything else (MPS, older GPUs): ``fp32``. fp16 needs loss scaling and can
  overflow, so it is never chosen for you; ask for it explicitly.
"""

from __future__ import annotations

import functools

import torch

from lora_flwr.machine import CPUINFO, cpuinfo_field

# CPU flags (Linux /proc/cpuinfo names) with native bf16 matrix instructions.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """Return the CPU's feature flags (empty where ``/proc/cpuinfo`` is absent)."""
    return frozenset((cpuinfo_field(("flags", "Features"), path) or "").split())


def resolve_precision(
    precision: str,
    device: torch.device,
    *,
    flags: frozenset[str] | None = None,
    cuda_bf16: bool | None = None,
) -> str:
    """Turn ``compute.precision`` into the precision actually used on ``device``.

    Parameters
    ----------
    precision
        ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``; all but ``"auto"`` are
        returned as given.
    device
        The training device (see :func:`~lora_flwr.training.resolve_device`).
    flags
        CPU feature flags; read from ``/proc/cpuinfo`` when None.
    cuda_bf16
        Whether the CUDA device runs bf16; asked of torch when None.

    Returns
    -------
    str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Raises
    ------
    ValueError
        For a precision outside the four names.
    """
    if precision in ("fp32", "bf16", "fp16"):
        return precision
    if precision != "auto":
        raise ValueError(
            f"`compute.precision` is {precision!r}; use one of "
            "'auto', 'fp32', 'bf16', 'fp16'"
        )
    if device.type == "cuda":
        if cuda_bf16 is None:
            # Emulated bf16 (pre-Ampere) is slower than fp32: ask for native support.
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
                including_emulation=False
            )
        return "bf16" if cuda_bf16 else "fp32"
    if device.type == "cpu":
        have = cpu_flags() if flags is None else flags
        return "bf16" if have & BF16_CPU_FLAGS else "fp32"
    return "fp32"
