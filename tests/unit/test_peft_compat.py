"""Our PEFT export loads in Hugging Face PEFT, and PEFT's saves load in ours."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_flwr.config import LoraConfig
from lora_flwr.lora import LoRAAdapter, load_adapter, save_peft

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.peft_compat

R = 4
ATOL = 1e-5

# name -> (model factory fixture, our target_modules, modules_to_save, PEFT task_type)
CASES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str | None]] = {
    "bert-seq-cls": ("make_tiny_bert", ("query", "value"), ("classifier",), None),
    "llama-causal-lm": ("make_tiny_llama", ("q_proj", "v_proj"), (), "CAUSAL_LM"),
    "gpt2-conv1d": ("make_tiny_gpt2", ("c_attn", "c_fc"), (), "CAUSAL_LM"),
}


def _logits(model: Any, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_our_export_loads_in_peft(
    case: str,
    request: pytest.FixtureRequest,
    randomize: Callable[..., None],
    token_ids: torch.Tensor,
    tmp_path: Path,
) -> None:
    # Prepare
    factory_name, targets, saved, task_type = CASES[case]
    model = request.getfixturevalue(factory_name)()
    base_copy = copy.deepcopy(model)  # taken before apply: the plain base model
    config = LoraConfig(
        r=R,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=saved,
    )
    adapter = LoRAAdapter(config, seed=0)
    adapter.apply(model)
    randomize(adapter, seed=3)  # non-zero B (and a new head for modules_to_save)
    ours = _logits(model, token_ids)
    assert not torch.allclose(ours, _logits(base_copy, token_ids), atol=1e-3)

    # Execute
    save_peft(adapter, tmp_path, task_type=task_type)
    peft_model = peft.PeftModel.from_pretrained(base_copy, str(tmp_path)).eval()

    # Assert
    lora_layers = [
        m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    ]
    assert len(lora_layers) == len(adapter.module_names)
    torch.testing.assert_close(_logits(peft_model, token_ids), ours, rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_save_loads_in_ours(
    case: str,
    request: pytest.FixtureRequest,
    token_ids: torch.Tensor,
    tmp_path: Path,
) -> None:
    # Prepare
    factory_name, targets, saved, _ = CASES[case]
    model = request.getfixturevalue(factory_name)()
    base_copy = copy.deepcopy(model)
    is_gpt2 = case.startswith("gpt2")
    peft_config = peft.LoraConfig(
        r=R,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=list(targets),
        fan_in_fan_out=is_gpt2,
        # Sequence classification: PEFT itself adds "classifier" and "score"
        # (0.22 also "pre_classifier", which these models do not have).
        task_type="SEQ_CLS" if saved else None,
    )
    peft_model = peft.get_peft_model(model, peft_config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:  # lora_A, lora_B and the trainable head copy
                assert "lora_" in name or "modules_to_save" in name, name
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.eval()
    theirs = _logits(peft_model, token_ids)
    peft_model.save_pretrained(str(tmp_path))

    # Execute
    adapter = load_adapter(base_copy, tmp_path)

    # Assert
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter.config.r == R and adapter.config.scaling == 2.0
    assert adapter.config.modules_to_save == saved
    if saved:
        assert {"classifier", "score"} <= set(saved_config["modules_to_save"])
    assert len(adapter.module_names) == 2 * len(targets)
    torch.testing.assert_close(_logits(base_copy, token_ids), theirs, rtol=0, atol=ATOL)
