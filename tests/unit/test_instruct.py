"""Instruction data: formats, chat-template rendering, response-only loss, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_flwr import experiment, simulation
from lora_flwr.config import DataConfig, ExperimentConfig, ModelConfig
from lora_flwr.data import (
    IGNORE_INDEX,
    TextDataset,
    collate,
    load_splits,
    node_cache,
    tokenize,
)
from lora_flwr.data.chat import CHATML, chat_template
from lora_flwr.data.partition import partition_indices
from lora_flwr.models import load_model
from lora_flwr.preflight import preflight

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"

ALPACA = [
    {"instruction": "Add", "input": "2 and 2", "output": "4", "category": "math"},
    {"instruction": "Greet", "input": "", "output": "Hello!", "category": "chat"},
    {"instruction": "Sub", "input": "5 - 3", "output": "2", "category": "math"},
    {"instruction": "Say bye", "input": "", "output": "Bye.", "category": "chat"},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Color?"},
            {"role": "assistant", "content": "Blue"},
            {"role": "user", "content": "Thanks"},  # no answer: left out
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]
SHAREGPT = [
    {
        "id": "a",
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Yo"},
        ],
    }
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _corpus(name: str | Path, **kw: Any) -> TextDataset:
    cfg = DataConfig(name=str(name), test_fraction=0.25, **kw)
    splits = load_splits(cfg, seed=0)
    both = [*splits.train.messages, *splits.test.messages]  # type: ignore[misc]
    return TextDataset(tuple(map(str, both)), None, ("",) * len(both), tuple(both))


def _tiny_tokenizer() -> Any:
    return load_model(ModelConfig(name="tiny-llama", task="causal_lm")).tokenizer


def _ids(tok: Any, text: str) -> list[int]:
    """Ids of the character tokenizer, one per character."""
    return list(tok.convert_tokens_to_ids(list(text)))


# ------------------------------------------------------------------ formats
def test_alpaca_json_and_jsonl_give_the_same_conversations(tmp_path: Path) -> None:
    # Prepare
    as_json = tmp_path / "alpaca.json"
    as_json.write_text(json.dumps(ALPACA), encoding="utf-8")
    as_jsonl = _jsonl(tmp_path / "alpaca.jsonl", ALPACA)

    # Execute
    splits = load_splits(DataConfig(name=str(as_json), test_fraction=0.25), seed=0)
    a = _corpus(as_json)
    b = _corpus(as_jsonl)

    # Assert
    assert splits.task == "causal_lm" and splits.num_labels == 0
    assert sorted(a.messages or ()) == sorted(b.messages or ())
    assert (("user", "Add\n\n2 and 2"), ("assistant", "4")) in (a.messages or ())
    assert (("user", "Greet"), ("assistant", "Hello!")) in (a.messages or ())


def test_chat_and_sharegpt_rows_become_roles(tmp_path: Path) -> None:
    # Prepare
    chat = _jsonl(tmp_path / "chat.jsonl", CHAT * 2)
    share = tmp_path / "share.json"
    share.write_text(json.dumps(SHAREGPT * 4), encoding="utf-8")

    # Execute
    got_chat = set(_corpus(chat).messages or ())
    got_share = set(_corpus(share).messages or ())

    # Assert: the trailing unanswered user turn is left out
    assert got_chat == {
        (
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Yo"),
            ("user", "Color?"),
            ("assistant", "Blue"),
        ),
        (("user", "2+2?"), ("assistant", "4")),
    }
    assert got_share == {(("user", "Hi"), ("assistant", "Yo"))}


def test_save_to_disk_parquet_and_arrow_read_like_jsonl(tmp_path: Path) -> None:
    # Prepare
    import datasets

    ds = datasets.Dataset.from_list(ALPACA)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "a.parquet"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    want = sorted(_corpus(_jsonl(tmp_path / "a.jsonl", ALPACA)).messages or ())

    # Execute / Assert
    for name in ("saved", "dict", "a.parquet", arrow):
        assert sorted(_corpus(tmp_path / name).messages or ()) == want, name


def test_a_plain_jsonl_text_file_stays_plain_text(tmp_path: Path) -> None:
    # Prepare
    path = _jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(8)])

    # Execute
    splits = load_splits(DataConfig(name=str(path), test_fraction=0.25), seed=0)

    # Assert
    assert splits.train.messages is None and splits.task == "causal_lm"


@pytest.mark.parametrize(
    ("rows", "fmt", "message"),
    [
        (
            [{"instruction": "a", "input": ""}],
            "auto",
            r"has no response column: instruction data needs `output`",
        ),
        (
            [{"instruction": "a", "output": "  "}],
            "auto",
            r"row 1, has an empty response \(`output`\)",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}]}],
            "auto",
            r"row 1, `messages` has no assistant turn",
        ),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": ""},
                    ]
                }
            ],
            "auto",
            r"row 1, `messages`, turn 1, is an empty response",
        ),
        (
            [{"conversations": [{"from": "robot", "value": "secret"}]}],
            "chat",
            r"turn 0, has an unknown `from` \(not shown\)",
        ),
        ([{"text": "a"}], "chat", r"`data.format` = 'chat' needs a `messages`"),
    ],
)
def test_bad_instruction_rows_are_refused_in_one_line(
    tmp_path: Path, rows: list[dict[str, Any]], fmt: str, message: str
) -> None:
    # Prepare
    path = _jsonl(tmp_path / "bad.jsonl", rows * 4)

    # Execute / Assert
    with pytest.raises(ValueError, match=message) as info:
        load_splits(DataConfig(name=str(path), format=fmt), seed=0)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and "secret" not in str(info.value)


def test_an_unreachable_hub_id_names_the_offline_alternatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    import flwr_datasets

    class Offline:
        def __init__(self, **kwargs: Any) -> None:
            raise ConnectionError("Couldn't reach 'org/none' on the Hub")

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", Offline)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"save_to_disk\(DIR\)`, or a \.json"):
        load_splits(DataConfig(name="org/none"), seed=0)


# ------------------------------------------------------- rendering and masks
def test_response_tokens_alone_carry_loss() -> None:
    # Prepare
    tok = _tiny_tokenizer()
    conv = (("user", "hi"), ("assistant", "yo!"), ("user", "ok?"), ("assistant", "k"))
    ds = TextDataset(("x",), None, ("",), (conv,))

    # Execute
    out = tokenize(ds, tok, "causal_lm", 256, fallback_template="chatml")
    batch = collate(out, [0])

    # Assert: ids are ChatML, char by char; labels are the responses + <|im_end|>
    text = (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo!<|im_end|>\n"
        "<|im_start|>user\nok?<|im_end|>\n<|im_start|>assistant\nk<|im_end|>\n"
    )
    assert out.input_ids[0].tolist() == _ids(tok, text)
    want = [IGNORE_INDEX] * len(text)
    for answer in ("yo!<|im_end|>", "k<|im_end|>"):
        start = text.index(answer, text.index("assistant\n" + answer[0]))
        want[start : start + len(answer)] = _ids(tok, answer)
    assert batch["labels"][0].tolist() == want


def test_a_tokenizer_without_template_is_refused_unless_a_fallback_is_set() -> None:
    # Prepare
    tok = _tiny_tokenizer()

    # Execute / Assert
    with pytest.raises(ValueError, match=r"^`model.name` = 'tiny-llama' has a tok"):
        chat_template(tok, "none", "tiny-llama")
    assert chat_template(tok, "chatml", "tiny-llama") == CHATML


def test_the_tokenizers_own_template_is_used_as_apply_chat_template_renders() -> None:
    # Prepare: a template that is not ChatML, with a default system turn
    tok = _tiny_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}[S]sys\n{% endif %}"
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    conv = (("user", "a"), ("assistant", "bc"))
    ds = TextDataset(("x",), None, ("",), (conv,))

    # Execute
    out = tokenize(ds, tok, "causal_lm", 256, fallback_template="chatml")

    # Assert
    msgs = [{"role": r, "content": c} for r, c in conv]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == "[S]sys\n[user]a</s>[assistant]bc</s>"
    assert (
        out.input_ids[0].tolist()
        == tok(rendered, add_special_tokens=False)["input_ids"]
    )
    kept = out.input_ids[0][out.targets[0]].tolist()  # type: ignore[index]
    assert tok.decode(kept) == "bc</s>"


def test_truncation_counts_cut_and_dropped_responses() -> None:
    # Prepare: short's prompt is 52 characters, its response "abcd<|im_end|>"
    tok = _tiny_tokenizer()
    short = (("user", "hi"), ("assistant", "abcd"))
    long = (("user", "x" * 60), ("assistant", "abcd"))
    ds = TextDataset(("s", "l"), None, ("", ""), (short, long))

    # Execute
    out = tokenize(ds, tok, "causal_lm", 56, fallback_template="chatml")

    # Assert: short is cut inside its response (kept), long loses it all (dropped)
    assert (len(out), out.truncated, out.dropped) == (1, 1, 1)
    kept = out.input_ids[0][out.targets[0]].tolist()  # type: ignore[index]
    assert tok.decode(kept) == "abcd"
    assert out.input_ids[0].numel() == 56


def test_a_max_length_that_cuts_every_response_is_refused() -> None:
    # Prepare
    tok = _tiny_tokenizer()
    ds = TextDataset(("l",), None, ("",), ((("user", "x" * 60), ("assistant", "a")),))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"`model.max_length` = 40 cuts every resp"):
        tokenize(ds, tok, "causal_lm", 40, fallback_template="chatml")


def test_the_node_cache_keeps_target_masks_and_counts(tmp_path: Path) -> None:
    # Prepare
    tok = _tiny_tokenizer()
    convs = (
        (("user", "hi"), ("assistant", "abcd")),
        (("user", "x"), ("assistant", "y")),
    )
    ds = TextDataset(("a", "b"), None, ("", ""), convs)
    out = tokenize(ds, tok, "causal_lm", 64, fallback_template="chatml")
    path = tmp_path / "p.safetensors"

    # Execute
    node_cache.save_partition(path, {"k": 1}, {"train": out, "test": out.subset([])})
    back = node_cache.load_partition(path, {"k": 1})

    # Assert
    assert back is not None
    got = back["train"]
    assert (got.truncated, got.dropped) == (out.truncated, out.dropped) == (1, 0)
    assert got.targets is not None and out.targets is not None
    for a, b in zip(got.targets, out.targets, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------- partitions
def test_dirichlet_and_natural_split_over_the_category_column(tmp_path: Path) -> None:
    # Prepare: 40 rows over 4 categories
    rows = [
        {"instruction": f"q{i}", "output": f"a{i}", "category": f"c{i % 4}"}
        for i in range(40)
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    cfgs = {
        p: DataConfig(name=str(path), group_column="category", partitioner=p)
        for p in ("dirichlet", "natural", "iid")
    }

    # Execute
    train = load_splits(cfgs["natural"], seed=0).train
    parts = {p: partition_indices(train, c, 2, seed=0) for p, c in cfgs.items()}

    # Assert
    for p, got in parts.items():
        assert sorted(i for part in got for i in part) == list(range(len(train))), p
    natural = [{train.groups[i] for i in part} for part in parts["natural"]]
    assert natural[0].isdisjoint(natural[1]) and len(natural[0] | natural[1]) == 4
    assert len(parts["iid"][0]) == len(train) // 2


# ---------------------------------------------------------------- training
def test_evaluation_loss_is_the_mean_over_response_tokens(cache: Path) -> None:
    # Prepare
    cfg = ExperimentConfig(
        model=ModelConfig(
            name="tiny-llama", max_length=128, fallback_template="chatml"
        ),
        data=DataConfig(name="synthetic_lm"),
    )
    ws = experiment.get_workspace(cfg)
    ws.bundle.model.eval()
    convs = (
        (("user", "hi"), ("assistant", "abc")),
        (("user", "q"), ("assistant", "z")),
    )
    data = tokenize(
        TextDataset(("a", "b"), None, ("", ""), convs),
        ws.bundle.tokenizer,
        "causal_lm",
        128,
        fallback_template="chatml",
    )

    # Execute
    got = ws.trainer.evaluate(data, progress=False)

    # Assert: cross-entropy over exactly the target positions (shifted by one)
    total, count = 0.0, 0
    for ids, target in zip(data.input_ids, data.targets or (), strict=True):
        with torch.no_grad():
            logits = ws.bundle.model(input_ids=ids[None]).logits[0].float()
        picked = target[1:].nonzero().flatten()
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:-1][picked], ids[1:][picked], reduction="sum"
            )
        )
        count += picked.numel()
    assert count == len("abc<|im_end|>") + len("z<|im_end|>")
    assert math.isclose(got["loss"], total / count, rel_tol=1e-5)


# ------------------------------------------------------ refusals before Ray
def test_preflight_refuses_a_tokenizer_without_a_chat_template(
    tmp_path: Path, cache: Path
) -> None:
    # Prepare
    path = _jsonl(tmp_path / "a.jsonl", ALPACA * 5)
    cfg = ExperimentConfig(
        model=ModelConfig(name="tiny-llama"),
        data=DataConfig(name=str(path), partitioner="iid"),
    )

    # Execute / Assert
    with pytest.raises(ValueError, match="fallback_template = 'chatml'"):
        preflight(cfg)


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"instruction": "a"}], [], "has no response column"),
        ([{"instruction": "a", "output": ""}], [], "has an empty response"),
        (ALPACA, [], "has a tokenizer without a chat template"),
    ],
)
def test_bad_instruction_input_exits_2_in_one_line_before_ray(
    tmp_path: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rows: list[dict[str, Any]],
    extra: list[str],
    message: str,
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    path = _jsonl(tmp_path / "data.jsonl", rows * 5)
    started: list[ExperimentConfig] = []
    sets = [
        f"data.name={path}",
        "model.name=tiny-llama",
        "lora.target_modules=q_proj,v_proj",
        "lora.modules_to_save=",
        *extra,
    ]

    # Execute
    code = simulation.main(
        ["--config", str(SMOKE), *[a for s in sets for a in ("--set", s)]],
        run_fn=lambda cfg, verbose=False: started.append(cfg),
        hard_exit=False,
    )
    err = capsys.readouterr().err.strip().splitlines()

    # Assert
    assert code == 2 and started == []
    assert len(err) == 1 and message in err[0], err
