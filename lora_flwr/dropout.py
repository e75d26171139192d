"""Dropout with cheap masks on the CPU.

On the CPU, ``torch.nn.functional.dropout`` draws one random number per element
(``bernoulli_``), which made dropout ~15 % of a MiniLM + LoRA training step. Here
each 64-bit draw gives the keep/drop decisions of four elements: its four 16-bit
lanes are compared with a threshold, so an element is dropped with probability
``p' = round(65536 p) / 65536`` (``|p' - p| <= 2**-17``; 0.1 becomes 0.1000061)
and kept ones are scaled by ``1 / (1 - p')``, which keeps the expectation exact.
Draws come from torch's global CPU generator, so ``torch.manual_seed`` fixes them.
Other devices (where dropout's own kernels are fast), ``p`` of 0 or 1 and eval mode
use torch's dropout unchanged. Pure torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 4  # 16-bit lanes per 64-bit draw
_LEVELS = 1 << 16


def drop_threshold(p: float) -> int:
    """Signed 16-bit lane value at and above which an element is kept."""
    return round(p * _LEVELS) - _LEVELS // 2


def effective_p(p: float) -> float:
    """Return the drop probability that the 16-bit masks realise for ``p``."""
    return round(p * _LEVELS) / _LEVELS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """Draw a boolean CPU mask of ``shape``, each entry False w.p. ~``p``."""
    n = 1
    for size in shape:
        n *= size
    words = torch.empty(-(-n // _LANES), dtype=torch.int64).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n]
    return lanes.view(shape) >= drop_threshold(p)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with 16-bit masks on the CPU (module doc)."""
    if not training or p == 0.0:
        return x
    kept = 1.0 - effective_p(p)
    if x.device.type != "cpu" or not 0.0 < kept < 1.0 or x.numel() == 0:
        return F.dropout(x, p, training)
    scale = keep_mask(x.shape, p).to(x.dtype).mul_(1.0 / kept)
    return x * scale


class Dropout(nn.Dropout):
    """``nn.Dropout`` that uses :func:`dropout` (cheaper masks on the CPU)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        """Drop and rescale in train mode; identity in eval mode."""
        if self.inplace:
            return F.dropout(input, self.p, self.training, inplace=True)
        return dropout(input, self.p, self.training)
