"""The exports of a real built-in load with PEFT and transformers alone.

SmolLM2-135M-Instruct (``smollm2-135m``, the cached conversion of its GGUF file)
with a small random adapter on q_proj and v_proj, and MiniLM (``minilm``, a BertModel
directory) with a new 3-class head in ``modules_to_save``. The project's own model
is the native one (``model.implementation = "auto"``); PEFT and transformers load
the base from the directory the adapter names, in a process without lora_flwr.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_probe import run_probe  # tests/: on the path, beside conftest.py
from export_runs import NUM_LABELS, TEXT, logits, make_run, token_batch

from lora_flwr.config import Task
from lora_flwr.export import main
from lora_flwr.models import base_model_source

pytest.importorskip("peft")

# 30 float32 layers computed by two implementations (native vs transformers, merged
# vs not): SmolLM2's logits (magnitude ~20) differed by at most 3.9e-5 (2026-12-07);
# MiniLM's agree within 1e-5.
ATOL = 1e-4

# built-in -> (task, targets, saved modules, kwargs PEFT's base needs)
CASES: dict[str, tuple[Task, tuple[str, ...], tuple[str, ...], dict[str, int]]] = {
    "smollm2-135m": ("causal_lm", ("q_proj", "v_proj"), (), {}),
    "minilm": ("seq_cls", ("query", "value"), ("classifier",), {"num_labels": 3}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_real_builtin_exports_load_without_project_code(
    name: str, tmp_path: Path
) -> None:
    # Prepare
    task, targets, saved, kwargs = CASES[name]
    assert kwargs.get("num_labels", NUM_LABELS) == NUM_LABELS
    run = make_run(tmp_path, name, task, targets, saved, std=0.02)
    batch = token_batch(run.tokenizer)
    ours = logits(run.model, batch)
    adapter_dir = run.run_dir / "adapter"
    # The adapter moves the logits well beyond the tolerance.
    run.adapter.set_weights([w * 0 for w in run.adapter.get_weights()])
    assert not torch.allclose(logits(run.model, batch), ours, atol=1e-2)

    # Execute
    assert main(["--run", str(run.run_dir), "--merged", str(tmp_path / "m")]) == 0
    got = run_probe(
        [
            {
                "loader": f"peft-{task}",
                "path": str(adapter_dir),
                "input_ids": batch,
                "kwargs": kwargs,
            },
            {
                "loader": task,
                "path": str(tmp_path / "m"),
                "input_ids": batch,
                "text": TEXT,
            },
        ],
        tmp_path,
    )

    # Assert
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_model_source(name)
    assert Path(config["base_model_name_or_path"]).is_absolute()
    torch.testing.assert_close(got["logits_0"], ours, rtol=0, atol=ATOL)
    torch.testing.assert_close(got["logits_1"], ours, rtol=0, atol=ATOL)
    assert got["ids_1"].tolist() == batch[0]
    if task == "causal_lm":  # SmolLM2's ChatML template travels with the tokenizer
        assert (tmp_path / "m" / "generation_config.json").is_file()
        assert "<|im_start|>" in (tmp_path / "m" / "chat_template.jinja").read_text()
