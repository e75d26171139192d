"""LoRA layer: a frozen linear map plus a trainable low-rank update.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models":

    h = W0 x + (alpha / r) * B A x,   A in R^{r x in},  B in R^{out x r}

A is Kaiming-uniform (as in loralib/PEFT), B is zero, so the wrapped layer starts out
computing exactly what the base layer does. Pure torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_flwr.dropout import Dropout

# transformers' GPT-2 style Conv1D (weight stored as (in, out)). Imported lazily so the
# module works without transformers; matched by class name to avoid a hard import.
_CONV1D_NAMES = ("Conv1D",)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a GPT-2 style ``Conv1D`` (a transposed linear layer)."""
    return type(module).__name__ in _CONV1D_NAMES and hasattr(module, "nf")


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """Input and output sizes of a ``nn.Linear`` or ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0]), int(weight.shape[1])
    raise TypeError(f"LoRA supports nn.Linear and Conv1D, not {type(module).__name__}")


class LoRALinear(nn.Module):
    """Wrap a ``nn.Linear`` (or GPT-2 ``Conv1D``) with a LoRA branch.

    Parameters
    ----------
    base_layer
        The pretrained layer. Its parameters are frozen.
    r
        Rank of the update.
    lora_alpha
        Numerator of the scaling.
    lora_dropout
        Dropout probability on the LoRA branch input.
    scaling
        ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).
    init_lora_weights
        ``"kaiming"`` (uniform, as loralib) or ``"gaussian"`` (normal, std ``1/r``) for
        A. B is always zero.
    generator
        CPU random generator for A (seeded by :class:`LoRAAdapter`); the global CPU
        RNG when None.

    Notes
    -----
    Parameter names follow PEFT without the adapter name: ``lora_A.weight`` is
    ``(r, in_features)`` and ``lora_B.weight`` is ``(out_features, r)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        scaling: float,
        init_lora_weights: str = "kaiming",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        in_features, out_features = in_out_features(base_layer)
        self.base_layer = base_layer
        # GPT-2 Conv1D keeps its weight as (in, out): deltas must be transposed.
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = scaling
        self.lora_dropout: nn.Module = (
            Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        )
        # LoRA factors stay float32 even over a half-precision base: the optimiser
        # state and the aggregated arrays keep full precision.
        # Built empty and filled by reset_lora_parameters: nn.Linear's own init would
        # draw from (and advance) the global RNG of the base layer's device.
        device = self._base_weight().device
        self.lora_A = nn.Linear(in_features, r, bias=False, device="meta")
        self.lora_B = nn.Linear(r, out_features, bias=False, device="meta")
        self.lora_A.to_empty(device=device)
        self.lora_B.to_empty(device=device)
        # Rank in use (<= r): rows of A and columns of B beyond it are zero and
        # skipped, so one allocated adapter serves every rank tier.
        self.active_r = r
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        # The pretrained weight W0, kept once a base delta is set, so that
        # W = W0 + delta is always computed from W0 (never accumulated).
        self._pristine_weight: torch.Tensor | None = None
        self._delta_active = False
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.reset_lora_parameters(init_lora_weights, generator=generator)
        # A new module starts in train mode; follow the layer it replaces, or LoRA
        # dropout would stay active inside a model that is in eval mode.
        self.train(base_layer.training)

    def _base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def _writable_base_weight(self, what: str) -> torch.Tensor:
        """Return the base weight; refuse a quantized one (integer codes)."""
        weight = self._base_weight()
        if not weight.dtype.is_floating_point:
            raise ValueError(
                f"cannot {what} a quantized base layer "
                f"({type(self.base_layer).__name__}, {weight.dtype}); keep the "
                "adapter separate, or load the base with model.quantization = "
                "'none' to merge"
            )
        return weight

    @torch.no_grad()
    def reset_lora_parameters(
        self,
        init_lora_weights: str = "kaiming",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Re-initialise A (Kaiming-uniform or Gaussian) and zero B.

        A is drawn on the CPU (from ``generator``, else the global CPU RNG) and then
        copied to the layer's device, so one seed gives the same A on every device.
        """
        lora_a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        if init_lora_weights == "kaiming":
            # Same bound as nn.Linear's default init (a=sqrt(5)), as in loralib.
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(lora_a, std=1.0 / self.r, generator=generator)
        else:
            raise ValueError(f"Unknown initialization {init_lora_weights=}")
        self.lora_A.weight.copy_(lora_a)
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def set_rank(self, rank: int) -> None:
        """Use only the first ``rank`` rows of A and columns of B; zero the rest.

        The scaling stays the allocated rank's, so a zero-padded or truncated
        factor pair keeps its product.
        """
        if not 1 <= rank <= self.r:
            raise ValueError(
                f"`rank` should be in [1, r={self.r}] but the value passed is {rank}"
            )
        self.lora_A.weight[rank:].zero_()
        self.lora_B.weight[:, rank:].zero_()
        self.active_r = rank

    @torch.no_grad()
    def set_base_delta(self, delta: torch.Tensor | None) -> None:
        """Set the frozen weight to ``W0 + delta`` (``delta`` is ``(out, in)``).

        ``W0`` is the pretrained weight, kept on the first call, so the result
        never depends on earlier deltas. None restores ``W0``.
        """
        if self.merged:
            raise ValueError("Unmerge the adapter before changing the base weights")
        weight = self._base_weight()
        if delta is None:
            if self._pristine_weight is not None:
                weight.copy_(self._pristine_weight)
            self._delta_active = False
            return
        weight = self._writable_base_weight("set a base delta on")
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"base delta of shape {tuple(delta.shape)}, expected "
                f"{(self.out_features, self.in_features)}"
            )
        if self._pristine_weight is None:
            self._pristine_weight = weight.detach().clone()
        d = delta.to(weight.device, torch.float32)
        if self.fan_in_fan_out:
            d = d.T
        weight.copy_((self._pristine_weight.to(torch.float32) + d).to(weight.dtype))
        self._delta_active = True

    @property
    def has_base_delta(self) -> bool:
        """Whether the frozen weight currently differs from ``W0`` by a delta."""
        return self._delta_active

    def get_delta_weight(self) -> torch.Tensor:
        """Return ``scaling * B @ A`` in the base weight's layout and dtype."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self._base_weight().dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: ``W0 <- W0 + delta``.

        A copy of ``W0`` is kept so that :meth:`unmerge` restores it bit for bit
        (subtracting the delta again would only restore it up to rounding).
        Merging an already merged layer does nothing.
        """
        if self.merged:
            return
        weight = self._writable_base_weight("merge LoRA into")
        merged = weight + self.get_delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(
                "NaNs or Infs detected in the merged weights; the adapter is broken"
            )
        self._unmerged_weight = weight.detach().clone()
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight saved by :meth:`merge`. No-op when not merged."""
        if not self.merged:
            return
        assert self._unmerged_weight is not None
        self._base_weight().copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute ``base(x) + scaling * B(A(dropout(x)))``."""
        result: torch.Tensor = self.base_layer(x)
        if self.merged:
            return result
        lora_a = self.lora_A.weight
        lora_x = self.lora_dropout(x).to(lora_a.dtype)
        update: torch.Tensor
        if self.active_r < self.r:
            rank = self.active_r
            hidden = nn.functional.linear(lora_x, lora_a[:rank])
            update = nn.functional.linear(hidden, self.lora_B.weight[:, :rank])
        else:
            update = self.lora_B(self.lora_A(lora_x))
        return result + update.to(result.dtype) * self.scaling

    def extra_repr(self) -> str:
        """Show rank and scaling in ``print(model)``."""
        return (
            f"r={self.r}, active_r={self.active_r}, scaling={self.scaling:g}, "
            f"merged={self.merged}"
        )
