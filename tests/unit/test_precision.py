"""compute.precision = "auto": bf16 only where the hardware runs it natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trainer import _setup

from lora_flwr.config import ComputeConfig
from lora_flwr.training.precision import cpu_flags, resolve_precision

CPU = torch.device("cpu")
AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AVX2, "fp32"),  # bf16 emulated: slower than fp32
        (AVX2 | {"avx512f", "avx512bw"}, "fp32"),  # AVX-512 without its bf16 part
        (AVX2 | {"avx512f", "avx512_bf16"}, "bf16"),
        (AVX2 | {"amx_tile", "amx_bf16"}, "bf16"),
        (frozenset(), "fp32"),  # flags unknown (no /proc/cpuinfo)
    ],
)
def test_auto_on_cpu_follows_the_bf16_flags(
    flags: frozenset[str], expected: str
) -> None:
    assert resolve_precision("auto", CPU, flags=flags) == expected


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_needs_native_bf16(native: bool, expected: str) -> None:
    assert resolve_precision("auto", torch.device("cuda"), cuda_bf16=native) == expected


def test_auto_on_mps_is_fp32() -> None:
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_whatever_the_hardware(name: str) -> None:
    assert resolve_precision(name, CPU, flags=frozenset()) == name
    assert resolve_precision(name, CPU, flags=AVX2 | {"amx_bf16"}) == name


def test_an_unknown_precision_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'fp8'.*'auto', 'fp32', 'bf16', 'fp16'"):
        resolve_precision("fp8", CPU)


def test_cpu_flags_are_read_from_the_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n"
    )
    assert cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_the_trainer_uses_what_auto_resolves_to_on_this_machine() -> None:
    setup = _setup(compute={"precision": "auto"})
    expected = resolve_precision("auto", CPU)
    assert setup.trainer.precision == expected
    dtype = None if expected == "fp32" else torch.bfloat16
    assert setup.trainer.autocast_dtype == dtype


def test_auto_is_a_valid_config_value() -> None:
    assert ComputeConfig(precision="auto").precision == "auto"
