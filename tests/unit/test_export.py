"""Exports load with PEFT and transformers alone and give the project's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_probe import run_probe  # tests/: on the path, beside conftest.py
from export_runs import TEXT, logits, make_run, token_batch
from safetensors.torch import load_file

from lora_flwr.atomic import write_text_atomic
from lora_flwr.config import ExperimentConfig, Task
from lora_flwr.export import ExportError, export_merged, export_peft, main
from lora_flwr.lora import load_adapter, save_base_delta
from lora_flwr.lora.io import PEFT_TASK_TYPES
from lora_flwr.models import base_model_source, load_model
from lora_flwr.models import source as model_source

pytest.importorskip("peft")

ATOL = 1e-5

# name -> (tiny built-in saved as the base directory, task, targets, saved modules)
CASES: dict[str, tuple[str, Task, tuple[str, ...], tuple[str, ...]]] = {
    "llama-causal_lm": ("tiny-llama", "causal_lm", ("q_proj", "v_proj"), ()),
    "gpt2-causal_lm": ("tiny-gpt2", "causal_lm", ("c_attn", "c_fc"), ()),
    "bert-seq_cls": ("tiny-bert", "seq_cls", ("query", "value"), ("classifier",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exports_load_without_project_code(case: str, tmp_path: Path) -> None:
    # Prepare
    builtin, task, targets, saved = CASES[case]
    run = make_run(tmp_path, "", task, targets, saved, save_base=builtin)
    batch = token_batch(run.tokenizer)
    ours = logits(run.model, batch)

    # Execute
    rc = main(["--run", str(run.run_dir), "--merged", str(tmp_path / "merged")])
    got = run_probe(
        [
            {
                "loader": f"peft-{task}",
                "path": str(run.run_dir / "adapter"),
                "input_ids": batch,
            },
            {
                "loader": task,
                "path": str(tmp_path / "merged"),
                "input_ids": batch,
                "text": TEXT,
            },
        ],
        tmp_path,
    )

    # Assert
    config = json.loads((run.run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert config["task_type"] == PEFT_TASK_TYPES[task]
    assert rc == 0
    torch.testing.assert_close(got["logits_0"], ours, rtol=0, atol=ATOL)
    torch.testing.assert_close(got["logits_1"], ours, rtol=0, atol=ATOL)
    assert got["ids_1"].tolist() == batch[0]
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    merged_keys = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in merged_keys)


def test_merged_export_folds_the_base_delta(tmp_path: Path) -> None:
    # Prepare: a FLoRA / FedEx-LoRA run keeps part of the update in the base weights
    from transformers import AutoModelForCausalLM

    run = make_run(
        tmp_path, "", "causal_lm", ("q_proj", "v_proj"), (), save_base="tiny-llama"
    )
    generator = torch.Generator().manual_seed(11)
    deltas = {
        name: (
            torch.randn(layer.out_features, layer.in_features, generator=generator)
            * 0.1
        ).numpy()
        for name, layer in run.adapter.layers.items()
    }
    save_base_delta(deltas, run.run_dir / "adapter" / "base_delta.safetensors")
    run.adapter.set_base_delta(deltas)
    batch = token_batch(run.tokenizer)
    ours = logits(run.model, batch)
    without = logits(load_model(run.cfg.model, seed=run.cfg.seed).model, batch)

    # Execute
    export_merged(run.run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()

    # Assert
    torch.testing.assert_close(logits(merged, batch), ours, rtol=0, atol=ATOL)
    assert not torch.allclose(ours, without, atol=1e-3)


def test_merged_export_in_bfloat16(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path, "", "causal_lm", ("q_proj",), (), save_base="tiny-llama")

    # Execute
    export_merged(run.run_dir, tmp_path / "merged", dtype="bfloat16")

    # Assert
    tensors = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_peft_export_rewrites_an_old_short_base_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: adapters saved before this export named the base by model.name
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path, "", "causal_lm", ("q_proj",), (), save_base="tiny-llama")
    old = run.run_dir / "adapter"
    config = json.loads((old / "adapter_config.json").read_text())
    config.update(base_model_name_or_path="base", task_type=None)
    (old / "adapter_config.json").write_text(json.dumps(config))
    cfg_text = (run.run_dir / "config.toml").read_text()
    (run.run_dir / "config.toml").write_text(
        cfg_text.replace(str(tmp_path / "base"), "base")
    )

    # Execute
    export_peft(run.run_dir, tmp_path / "new")

    # Assert
    new = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert new["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert new["task_type"] == "CAUSAL_LM"
    assert {
        k: v
        for k, v in new.items()
        if k not in ("base_model_name_or_path", "task_type")
    } == {
        k: v
        for k, v in config.items()
        if k not in ("base_model_name_or_path", "task_type")
    }
    assert (tmp_path / "new" / "adapter_model.safetensors").read_bytes() == (
        old / "adapter_model.safetensors"
    ).read_bytes()
    # The project's own loader reads both, whatever the base is called.
    for path in (old, tmp_path / "new"):
        fresh = load_model(run.cfg.model, seed=run.cfg.seed).model
        load_adapter(fresh, path, seed=run.cfg.seed)
        batch = token_batch(run.tokenizer)
        torch.testing.assert_close(
            logits(fresh, batch), logits(run.model, batch), rtol=0, atol=0
        )


def test_base_model_source_names_what_transformers_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(model_source, "fetch_asset", lambda name: tmp_path / name)
    monkeypatch.setattr(model_source, "_smollm2_hf_dir", lambda: tmp_path / "hf")
    (tmp_path / "local").mkdir()
    monkeypatch.chdir(tmp_path)

    # Execute / Assert
    assert base_model_source("minilm") == str(tmp_path.resolve() / "minilm")
    assert base_model_source("smollm2-135m") == str(tmp_path.resolve() / "hf")
    assert base_model_source("local") == str((tmp_path / "local").resolve())
    assert base_model_source("org/model") == "org/model"
    assert base_model_source("tiny-llama") == "tiny-llama"


def _error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()  # drop what preparing the run printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_missing_run_dir_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error_line(["--run", str(tmp_path / "nope"), "--merged", "m"], capsys)
    assert "Run directory not found" in err


def test_run_without_adapter_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    (tmp_path / "run").mkdir()
    write_text_atomic(tmp_path / "run" / "config.toml", ExperimentConfig().to_toml())

    # Execute
    err = _error_line(["--run", str(tmp_path / "run"), "--peft", "p"], capsys)

    # Assert
    assert "has no final adapter" in err


def test_missing_base_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run = make_run(tmp_path, "", "causal_lm", ("q_proj",), (), save_base="tiny-llama")
    for path in (tmp_path / "base").iterdir():
        path.unlink()
    (tmp_path / "base").rmdir()

    # Execute
    err = _error_line(["--run", str(run.run_dir), "--merged", "m"], capsys)

    # Assert
    assert "Cannot load the run's base model" in err
    assert not (tmp_path / "m").exists()


def test_dtype_is_checked() -> None:
    with pytest.raises(ExportError, match="`dtype`"):
        export_merged("anywhere", "out", dtype="int8")
