"""Frozen base weights shared between processes through memory-mapped safetensors.

``transformers``' ``from_pretrained`` reads a ``.safetensors`` checkpoint with
``safetensors.safe_open``, which (safetensors >= 0.4, torch) backs the tensors with
``torch.UntypedStorage.from_file(path, shared=False)``: a private, copy-on-write
memory map of the file. When the file already holds the dtype the model computes in
(float32 here), the parameters stay views of that map, so every process that loads
the same file reads the same pages of the OS page cache: N Ray actors hold one copy
of the frozen weights, not N. A write to such a parameter (a merged or delta base
weight) copies only the pages it touches into the writing process; the file itself
is never written (``MAP_PRIVATE``).

Two things can still break this, and this module checks both:

* a weights file that is truncated or corrupt (a crash during a copy, a full disk)
  is found by :func:`check_safetensors` from its header alone, with a message that
  names the file (safetensors itself refuses it with a bare ``SafetensorError``).
  Files are only ever replaced by renaming a whole new file over them, never
  rewritten in place: a mapped file truncated under a running process would kill it
  with SIGBUS at the next page it touches;
* a loader or a dtype conversion that copies the weights into private memory shows
  up in :func:`weight_residency` (Linux: it reads ``/proc/self/maps``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Bytes per element of the dtypes a safetensors header may name.
_DTYPE_BYTES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
}
# safetensors refuses headers above 100 MB; a larger length means a damaged file.
_MAX_HEADER = 100_000_000


class CorruptWeightsError(ValueError):
    """A safetensors file whose header or length does not describe valid tensors."""


def check_safetensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check that a safetensors file is whole, reading only its header.

    The file is ``[8-byte length N][N bytes of JSON header][data]``; every tensor in
    the header must have a known dtype, a byte range that matches its shape and
    lies inside the data, and the ranges together must cover the data exactly. A
    truncated, padded or overwritten-header file fails. The tensor bytes themselves
    are not checksummed (that would read the whole file in every process).

    Parameters
    ----------
    path
        The ``.safetensors`` file.

    Returns
    -------
    dict[str, tuple[str, tuple[int, ...]]]
        Tensor name to ``(dtype, shape)``, as the header gives them.

    Raises
    ------
    CorruptWeightsError
        Naming the file and what is wrong with it.
    FileNotFoundError
        If the file does not exist.
    """
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> CorruptWeightsError:
        return CorruptWeightsError(
            f"{path} is not a complete safetensors file ({size} bytes): {why}"
        )

    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise bad("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(_MAX_HEADER, size - 8):
            raise bad(f"the header length {n} runs past the end of the file")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data_len = size - 8 - n
    ranges: list[tuple[int, int]] = []
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"tensor {name!r} has a malformed entry {info!r}") from exc
        if dtype not in _DTYPE_BYTES:
            raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
        expected = math.ceil(math.prod(shape) * _DTYPE_BYTES[dtype])
        if not 0 <= begin <= end <= data_len or end - begin != expected:
            raise bad(
                f"tensor {name!r} ({dtype}, shape {list(shape)}) spans bytes "
                f"[{begin}, {end}) of a {data_len}-byte data section"
            )
        ranges.append((begin, end))
        tensors[name] = (dtype, shape)
    covered = 0
    for begin, end in sorted(ranges):
        if begin != covered:
            raise bad(f"the tensor data has a gap or overlap at byte {covered}")
        covered = end
    if covered != data_len:
        raise bad(f"the tensors cover {covered} of {data_len} data bytes")
    return tensors


@dataclass
class WeightResidency:
    """Where a model's parameters and buffers live (bytes, each tensor counted once).

    Attributes
    ----------
    mapped
        Bytes backed by a memory map of a file, by file path: shared with every
        other process that maps the same file, as long as they are not written.
    private
        Bytes in anonymous memory (allocated by this process: copies, new heads,
        LoRA factors), or on an accelerator.
    """

    mapped: dict[str, int] = field(default_factory=dict)
    private: int = 0

    @property
    def mapped_bytes(self) -> int:
        """Total bytes backed by file maps."""
        return sum(self.mapped.values())


def weight_residency(
    module: torch.nn.Module, *, frozen_only: bool = False
) -> WeightResidency | None:
    """Tell which of a module's tensors are views of a memory-mapped file.

    Parameters
    ----------
    module
        The model.
    frozen_only
        Count only parameters with ``requires_grad`` False (and buffers).

    Returns
    -------
    WeightResidency or None
        None where ``/proc/self/maps`` does not exist (not Linux).
    """
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    maps: list[tuple[int, int, str]] = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, parts[5]))
    result = WeightResidency()
    seen: set[tuple[int, int]] = set()
    tensors = [
        p for p in module.parameters() if not (frozen_only and p.requires_grad)
    ] + list(module.buffers())
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        key = (t.data_ptr(), nbytes)
        if key in seen or nbytes == 0:
            continue
        seen.add(key)
        ptr = t.data_ptr()
        where = next(
            (p for lo, hi, p in maps if t.device.type == "cpu" and lo <= ptr < hi),
            None,
        )
        if where is None:
            result.private += nbytes
        else:
            where = os.path.normpath(where.removesuffix(" (deleted)"))
            result.mapped[where] = result.mapped.get(where, 0) + nbytes
    return result
