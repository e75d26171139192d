"""model.quantization: bitsandbytes' int8 / NF4 layers under LoRA, and the refusals."""

from __future__ import annotations

import builtins
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lora_flwr import experiment
from lora_flwr.config import ExperimentConfig
from lora_flwr.lora.layers import LoRALinear
from lora_flwr.models.quantize import (
    QuantizationUnavailable,
    check_device,
    dequantized_weight,
    quantize_linears,
)

pytest.importorskip("bitsandbytes")  # the quant extra; `make install` has it


def _tiny(mode: str, **extra: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "model": {"name": "tiny-llama", "task": "causal_lm", "quantization": mode},
            "data": {"name": "synthetic_lm"},
            "lora": {"target_modules": "q_proj,v_proj"},
            **extra,
        }
    )


@pytest.mark.parametrize(("mode", "tolerance"), [("int8", 0.02), ("nf4", 0.15)])
def test_linears_are_swapped_and_compute_close_to_float32(
    mode: str, tolerance: float
) -> None:
    # Prepare
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "body": nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64)),
            "lm_head": nn.Linear(64, 50),
            "classifier": nn.Linear(64, 2),
        }
    )
    x = torch.randn(8, 64)
    want = model["body"](x)
    quantized = copy.deepcopy(model)

    # Execute
    names = quantize_linears(quantized, mode, skip=("classifier",))
    got = quantized["body"](x)

    # Assert
    assert names == ["body.0", "body.2"]
    assert type(quantized["lm_head"]) is nn.Linear
    assert type(quantized["classifier"]) is nn.Linear
    stored = quantized["body"][0].weight
    assert stored.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert stored.numel() * stored.element_size() < 64 * 96 * 4 / 3
    relative = float((got - want).detach().norm() / want.detach().norm())
    assert 0 < relative < tolerance


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_lora_trains_on_a_quantized_base_that_stays_as_it_was(
    mode: str, cache: Path
) -> None:
    # Prepare
    cfg = _tiny(mode)
    ws = experiment.get_workspace(cfg)
    ws.reset_adapter()
    wrapped = [m for m in ws.bundle.model.modules() if isinstance(m, LoRALinear)]
    frozen = {
        n: p.detach().clone()
        for n, p in ws.bundle.model.named_parameters()
        if "lora_" not in n
    }
    start = {n: a.copy() for n, a in ws.adapter.get_named_weights().items()}
    train = experiment.centralized_train_data(ws, cfg)
    test = experiment.heldout_data(ws, cfg)
    before = ws.trainer.evaluate(test, progress=False)["loss"]

    # Execute
    ws.trainer.train(train, steps=6, seed=0)
    after = ws.trainer.evaluate(test, progress=False)["loss"]

    # Assert
    assert wrapped and all(
        type(m.base_layer).__name__ in ("FrozenLinear8bitLt", "FrozenLinear4bit")
        for m in wrapped
    )
    assert all(m.lora_A.weight.dtype == torch.float32 for m in wrapped)
    moved = ws.adapter.get_named_weights()
    assert any(not (moved[n] == start[n]).all() for n in start if "lora_B" in n)
    for n, p in ws.bundle.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.detach(), frozen[n]), n
    assert after < before


def test_a_rule_that_folds_into_the_base_is_refused_with_a_quantized_base() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="flora and fedex fold part of the update"):
        _tiny("nf4", fed={"aggregation": "flora"})
    with pytest.raises(ValueError, match="model.quantization"):
        _tiny("int8", fed={"aggregation": "fedex"})


def test_a_missing_library_or_an_unsupported_device_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    real_import = builtins.__import__

    def no_bitsandbytes(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)

    # Execute / Assert
    with pytest.raises(QuantizationUnavailable) as missing:
        quantize_linears(nn.Sequential(nn.Linear(4, 4)), "nf4")
    with pytest.raises(QuantizationUnavailable) as mps:
        check_device("int8", torch.device("mps"))
    assert len(str(missing.value).splitlines()) == 1
    assert "is not installed" in str(missing.value)
    assert "pip install 'bitsandbytes==0.50.2'" in str(missing.value)
    assert "not on 'mps'" in str(mps.value)
    with pytest.raises(ValueError, match="should be one of"):
        quantize_linears(nn.Sequential(nn.Linear(4, 4)), "int4")


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize("called_before", [False, True])
def test_the_frozen_base_keeps_nothing_for_backward_and_gives_the_exact_gradient(
    mode: str, called_before: bool
) -> None:
    # Prepare: a layer called once already has moved its int8 scales to its state
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 96))
    quantize_linears(model, mode)
    layer = model[0]
    if called_before:
        layer(torch.randn(2, 64))
    x = torch.randn(5, 64, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    # Execute
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    (y.square().sum()).backward()
    got = x.grad
    x.grad = None
    weight = dequantized_weight(layer)
    (x @ weight.T + layer.bias).square().sum().backward()

    # Assert
    assert type(layer).__name__ in ("FrozenLinear8bitLt", "FrozenLinear4bit")
    assert sum(saved) == 0
    assert got is not None and x.grad is not None
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-5)


def test_merging_into_a_quantized_layer_is_refused_not_silently_dropped() -> None:
    # Prepare
    model = nn.Sequential(nn.Linear(8, 8))
    quantize_linears(model, "int8")
    lora = LoRALinear(model[0], r=2, lora_alpha=2.0, lora_dropout=0.0, scaling=1.0)

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot merge LoRA into a quantized base"):
        lora.merge()
    with pytest.raises(ValueError, match="cannot set a base delta on a quantized"):
        lora.set_base_delta(torch.zeros(8, 8))
    lora.set_base_delta(None)  # the workspace's reset: nothing to undo, no error
