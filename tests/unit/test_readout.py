"""After the last round: letter choice, greedy answers, the run's read-out files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_benchmark import _hf_llama, _save_mmlu

from lora_flwr import experiment, readout
from lora_flwr.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
)
from lora_flwr.data.chat import CHATML, _apply, render_prompt
from lora_flwr.evaluation import build_prompt, load_mmlu
from lora_flwr.evaluation.after_run import generate_greedy, summary_line
from lora_flwr.evaluation.generation import (
    answer_and_choose,
    encode_prompts,
    last_token_logits,
    next_tokens,
)
from lora_flwr.models import load_model

ALPACA = [
    {"instruction": f"Say {w}", "input": "", "output": f"{w}!"}
    for w in ("hi", "bye", "yes", "no", "ok", "go", "up", "in", "on", "at")
]


def _alpaca(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA), encoding="utf-8")
    return path


def _cfg(data: Path, **eval_kw: Any) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(
            name="tiny-llama",
            task="causal_lm",
            max_length=96,
            fallback_template="chatml",
        ),
        data=DataConfig(name=str(data), partitioner="iid", test_fraction=0.3),
        eval=EvalConfig(**eval_kw),
    )


# ------------------------------------------------------------ letter choice
def test_the_letter_choice_is_the_best_logit_among_the_option_letters(
    tmp_path: Path,
) -> None:
    # Prepare
    root = _save_mmlu(tmp_path / "mmlu")
    questions = load_mmlu("dev", root=root)
    bundle = load_model(ModelConfig(name="tiny-llama", task="causal_lm"))
    tok = bundle.tokenizer
    prompts = encode_prompts(tok, [build_prompt(q) for q in questions])
    letter_ids = [encode_prompts(tok, [c])[0][-1] for c in "ABCD"]

    # Execute
    outputs, letters = answer_and_choose(bundle.model, tok, questions, batch_size=3)

    # Assert: against each prompt's own logits, one prompt at a time
    with torch.no_grad():
        for prompt, output, letter in zip(prompts, outputs, letters, strict=True):
            logits = last_token_logits(bundle.model, [prompt], pad_token_id=0)[0]
            assert output == tok.decode(
                [int(logits.argmax())], skip_special_tokens=True
            )
            assert letter == "ABCD"[int(logits[letter_ids].argmax())]


def test_candidates_must_be_given_per_prompt() -> None:
    # Prepare
    model = _hf_llama()

    # Execute / Assert
    with pytest.raises(ValueError, match="non-empty list of tokens per prompt"):
        next_tokens(model, [[5, 6], [7]], pad_token_id=0, candidates=[[3, 4]])
    with pytest.raises(ValueError, match="non-empty list of tokens per prompt"):
        next_tokens(model, [[5, 6]], pad_token_id=0, candidates=[[]])


# ------------------------------------------------------------ greedy answers
def test_greedy_answers_equal_transformers_generate_and_stop_at_eos() -> None:
    # Prepare
    model = _hf_llama(seed=2)
    prompt = [5, 9, 14, 3, 22]

    # Execute
    ours = generate_greedy(model, prompt, max_new_tokens=8, stop=[], pad_token_id=0)
    with torch.no_grad():
        theirs = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    stopped = generate_greedy(
        model, prompt, max_new_tokens=8, stop=[ours[2]], pad_token_id=0
    )

    # Assert
    assert ours == theirs
    assert stopped == ours[: ours.index(ours[2])]


def test_the_sample_prompt_is_the_rendered_turns_before_the_response() -> None:
    # Prepare
    tok = load_model(ModelConfig(name="tiny-llama", task="causal_lm")).tokenizer
    conversation = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Yo"))

    # Execute
    prompt = render_prompt(tok, CHATML, conversation)
    whole = _apply(tok, CHATML, [{"role": r, "content": c} for r, c in conversation])

    # Assert
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert whole.startswith(prompt) and whole[len(prompt) :].startswith("Yo")
    with pytest.raises(ValueError, match="a turn before its last assistant turn"):
        render_prompt(tok, CHATML, (("assistant", "Yo"),))


# ------------------------------------------------------------ the run's files
def test_the_final_readout_writes_the_benchmark_and_the_answers(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    root = _save_mmlu(tmp_path / "mmlu")
    monkeypatch.setattr("lora_flwr.evaluation.mmlu.mmlu_root", lambda: root)
    cfg = _cfg(
        _alpaca(tmp_path),
        benchmark="mmlu",
        benchmark_split="dev",
        benchmark_per_subject=2,
        samples=2,
        sample_tokens=5,
    )
    ws = experiment.get_workspace(cfg)
    readout.check_readout(ws, cfg)
    out = tmp_path / "run"
    out.mkdir()

    # Execute
    lines = readout.final_readout(ws, cfg, out)

    # Assert
    report = json.loads((out / "benchmark.json").read_text())
    assert report["questions"] == 4 and report["split"] == "dev"
    assert report["per_subject"] == 2 and report["protocol"] == "flowertune-general-nlp"
    assert set(report["letter_choice"]["categories"]) == {"stem", "humanities"}
    assert lines[0] == summary_line(report)
    assert lines[0].startswith("MMLU dev (4 questions, at most 2 per subject)")
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    held_out = {r["instruction"]: r["output"] for r in ALPACA}
    assert len(rows) == 2
    for row in rows:
        assert row["reference"] == held_out[row["prompt"]]
        assert len(ws.bundle.tokenizer(row["answer"])["input_ids"]) <= 5 + 1
    assert lines[-1] == f"2 answers to held-out prompts -> {out / 'samples.jsonl'}"


def test_nothing_is_written_when_no_readout_is_asked(
    tmp_path: Path, cache: Path
) -> None:
    # Prepare
    cfg = _cfg(_alpaca(tmp_path))
    ws = experiment.get_workspace(cfg)
    out = tmp_path / "run"
    out.mkdir()

    # Execute
    lines = readout.final_readout(ws, cfg, out)

    # Assert
    assert not readout.wants_readout(cfg)
    assert lines == [] and list(out.iterdir()) == []


def test_a_readout_the_run_cannot_produce_is_refused(
    tmp_path: Path, cache: Path
) -> None:
    # Prepare
    classifier = ExperimentConfig(
        model=ModelConfig(name="tiny-bert", task="seq_cls"),
        lora=LoraConfig(target_modules=("query", "value")),
        data=DataConfig(name="synthetic"),
        eval=EvalConfig(benchmark="mmlu"),
    )
    plain_text = ExperimentConfig(
        model=ModelConfig(name="tiny-llama", task="causal_lm"),
        data=DataConfig(name="synthetic_lm"),
        eval=EvalConfig(samples=3),
    )

    # Execute / Assert
    with pytest.raises(ValueError, match="`eval.benchmark` needs a causal LM"):
        readout.check_readout(experiment.get_workspace(classifier), classifier)
    with pytest.raises(ValueError, match="`eval.samples` = 3 answers held-out"):
        readout.check_readout(experiment.get_workspace(plain_text), plain_text)


def test_the_builtin_instruction_data_refuses_another_format(cache: Path) -> None:
    # Execute / Assert: refused before anything is downloaded
    with pytest.raises(ValueError, match="is alpaca instruction data"):
        experiment.splits(
            ExperimentConfig(
                model=ModelConfig(name="tiny-llama", task="causal_lm"),
                data=DataConfig(name="alpaca_demo", format="chat"),
            )
        )
    assert not (cache / "downloads").exists()
