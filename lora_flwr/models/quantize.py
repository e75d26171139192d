"""A frozen base in 8 or 4 bits (``model.quantization``), with bitsandbytes' layers.

QLoRA's recipe (Dettmers et al. 2023): every linear layer of the frozen base holds
its weight in int8 (LLM.int8(), ``Linear8bitLt``) or NF4 (``Linear4bit``) and
dequantizes it on the fly; the LoRA factors, the head and the embeddings stay in
float32. bitsandbytes runs both on CUDA and on the CPU (its own kernels; 0.50.2
measured here), so one code path serves both; the layers are swapped in place after the
model is built in float32, before LoRA wraps them, and move to a GPU with the
model (bitsandbytes carries their scales along).

The layers run under :class:`_FrozenBase`: their forward keeps nothing for the
backward pass, which recomputes the input's gradient from the quantized weight
(dequantized for the moment it takes). bitsandbytes' own autograd keeps a float
copy of every weight (and int8 also the layer's input) until backward, so without
this a quantized base would need *more* memory in training than a float32 one.
What this gives and costs is measured in docs/BENCHMARKS.md.

Merging a delta into a quantized weight is not defined, so the rules that keep part
of the update in the base (flora, fedex) are refused with a quantized base, and
``lora_flwr.export --merged`` folds the adapter into a float32 base instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# model.quantization -> what bitsandbytes calls it.
MODES = ("int8", "nf4")
# The release whose CPU kernels were measured here; any later one should do.
BITSANDBYTES = "bitsandbytes==0.50.2"
# Never quantized: the output projection (often tied to the embeddings), the
# classification heads of BERT- and Llama-style models, and (passed by the caller)
# any module trained in full (modules_to_save).
ALWAYS_SKIPPED = ("lm_head", "classifier", "score")


class QuantizationUnavailable(ValueError):
    """The requested quantization cannot run here (library missing, device)."""


def load_bitsandbytes(mode: str) -> Any:
    """Import bitsandbytes, or raise one line that says how to get it.

    Raises
    ------
    QuantizationUnavailable
        When bitsandbytes is not installed or cannot load its kernels.
    """
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or its own kernel-loading errors
        raise QuantizationUnavailable(
            f"`model.quantization` = {mode!r} needs bitsandbytes, which "
            f"{'is not installed' if isinstance(exc, ImportError) else 'fails to load'}"
            f" ({type(exc).__name__}); install it with `pip install '{BITSANDBYTES}'` "
            "(CPU and CUDA kernels) or set model.quantization = 'none'"
        ) from None
    # Said on every int8 matmul of a float32 model; the cast is the design.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    return bitsandbytes


def check_device(mode: str, device: torch.device) -> None:
    """Refuse a device bitsandbytes has no kernels for (Apple's MPS)."""
    if device.type not in ("cpu", "cuda"):
        raise QuantizationUnavailable(
            f"`model.quantization` = {mode!r} runs on the CPU and on CUDA GPUs "
            f"(bitsandbytes), not on {device.type!r}; set compute.device = 'cpu' or "
            "model.quantization = 'none'"
        )


def quantize_linears(
    model: nn.Module, mode: str, *, skip: Sequence[str] = ()
) -> list[str]:
    """Replace the model's ``nn.Linear`` layers by bitsandbytes' quantized ones.

    Parameters
    ----------
    model
        A float32 model on the CPU, before LoRA is applied.
    mode
        ``"int8"`` (``Linear8bitLt``, no outlier threshold: every column int8)
        or ``"nf4"`` (``Linear4bit``, NF4, float32 compute).
    skip
        Module names (or name suffixes) kept in full precision besides
        :data:`ALWAYS_SKIPPED`.

    Returns
    -------
    list[str]
        The names of the layers replaced.

    Raises
    ------
    QuantizationUnavailable
        If bitsandbytes is missing; ValueError for an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(
            f"`model.quantization` should be one of {('none', *MODES)} but the value "
            f"passed is {mode!r}"
        )
    bnb = load_bitsandbytes(mode)
    kept = (*ALWAYS_SKIPPED, *skip)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and not any(name == k or name.endswith("." + k) for k in kept)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(bnb, linear, mode))
    return [name for name, _ in targets]


class _FrozenBase(torch.autograd.Function):
    """``y = layer(x)`` for a frozen quantized layer, saving nothing for backward.

    The weight takes no gradient, so the only gradient is the input's,
    ``dL/dx = dL/dy @ W``; backward dequantizes ``W`` to compute it.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module, run: Any) -> Any:
        ctx.layer = layer
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        weight = dequantized_weight(ctx.layer)
        return grad @ weight.to(grad.dtype), None, None


def dequantized_weight(layer: Any) -> torch.Tensor:
    """Return the float32 ``(out, in)`` weight a quantized layer computes with."""
    import bitsandbytes as bnb

    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        out = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        return torch.as_tensor(out).float()
    # LLM.int8() without outliers: each row is int8 codes times its absmax / 127.
    # The row scales move from the weight to the layer's state at its first call.
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB
    return torch.as_tensor(weight.data.float() * (scales.float() / 127.0)[:, None])


_CLASSES: dict[str, type[nn.Module]] = {}


def _frozen_class(bnb: Any, mode: str) -> type[nn.Module]:
    """Return the bitsandbytes layer class for ``mode``, run by :class:`_FrozenBase`."""
    if mode not in _CLASSES:
        base = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit

        class Frozen(base):  # type: ignore[misc, valid-type]
            def forward(self, x: torch.Tensor) -> Any:
                return _FrozenBase.apply(x, self, super().forward)  # type: ignore[no-untyped-call]

        Frozen.__name__ = Frozen.__qualname__ = "Frozen" + base.__name__
        _CLASSES[mode] = Frozen
    return _CLASSES[mode]


def _quantized(bnb: Any, linear: nn.Linear, mode: str) -> nn.Module:
    """One bitsandbytes layer holding ``linear``'s weight and bias, quantized."""
    weight = linear.weight.detach().float().contiguous()
    bias = linear.bias is not None
    layer: nn.Module
    cls = _frozen_class(bnb, mode)
    if mode == "int8":
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=0.0,
        )
        layer.weight = bnb.nn.Int8Params(
            weight, requires_grad=False, has_fp16_weights=False
        )
    else:
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=torch.float32,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    # bitsandbytes quantizes a weight when it is moved to a device.
    return layer.to(weight.device)
