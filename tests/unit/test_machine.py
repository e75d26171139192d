"""lora_flwr.machine reads the CPU's model name and fields from /proc/cpuinfo."""

from __future__ import annotations

import platform
from pathlib import Path

from lora_flwr.machine import cpu_model_name, cpuinfo_field

INFO = (
    "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n\n"
    "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n"
)


def test_the_first_processor_block_answers(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(INFO)
    assert cpu_model_name(str(info)) == "AMD EPYC"
    assert cpuinfo_field(("flags", "Features"), str(info)) == "fpu avx2"
    assert cpuinfo_field(("bogomips",), str(info)) is None


def test_without_cpuinfo_the_platform_names_the_cpu(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent")
    assert cpuinfo_field(("model name",), absent) is None
    expected = platform.processor() or platform.machine() or "unknown CPU"
    assert cpu_model_name(absent) == expected
