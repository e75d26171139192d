"""ExperimentConfig: defaults, builders (TOML, flat, overrides), checks, round trips."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest

from lora_flwr.config import (
    RENAMED,
    ComputeConfig,
    DataConfig,
    ExperimentConfig,
    FedConfig,
    GuardsConfig,
    LoraConfig,
    ModelConfig,
    SamplingConfig,
    TrainConfig,
    parse_value,
    unflatten,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.toml"))


def _custom() -> ExperimentConfig:
    """A config that differs from the defaults in every section and type."""
    return ExperimentConfig(
        name="run-1.b_c",
        seed=7,
        output_dir='out/"quoted" \\ dir',
        on_existing="overwrite",
        model=ModelConfig(name="tiny-llama", task="causal_lm", max_length=16),
        lora=LoraConfig(
            r=4,
            lora_alpha=8.5,
            lora_dropout=0.0,
            target_modules=r".*\.(q|v)_proj",
            init_lora_weights="gaussian",
            use_rslora=True,
            modules_to_save=("classifier", "score"),
        ),
        data=DataConfig(name="synthetic", partitioner="dirichlet", dirichlet_alpha=0.1),
        train=TrainConfig(lr=5e-5, local_epochs=1.5),
        compute=ComputeConfig(precision="bf16", device="cuda:1"),
        fed=FedConfig(num_rounds=3, num_clients=4, lr_decay=0.99),
        sampling=SamplingConfig(min_clients=4),
        guards=GuardsConfig(
            weight_cap=2.5,
            norm_guard="reject",
            robust="trimmed_mean",
            trim_fraction=0.25,
        ),
    )


# ----------------------------------------------------------------- defaults
def test_lora_defaults_are_the_seeds() -> None:
    # Prepare / Execute
    cfg = LoraConfig()

    # Assert
    assert cfg.r == 8
    assert cfg.lora_alpha == 16.0
    assert cfg.lora_dropout == 0.1
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert cfg.init_lora_weights == "kaiming"
    assert cfg.use_rslora is False
    assert cfg.modules_to_save == ()
    assert cfg.scaling == 2.0


def test_experiment_defaults_nest_every_section() -> None:
    # Prepare / Execute
    cfg = ExperimentConfig()

    # Assert
    assert cfg.lora == LoraConfig()
    assert cfg.train == TrainConfig()
    assert cfg.fed == FedConfig()
    assert cfg.model == ModelConfig() and cfg.data == DataConfig()
    assert ExperimentConfig.from_dict({}) == cfg
    assert ExperimentConfig.from_flat({}) == cfg


def test_scaling_is_alpha_over_r_or_sqrt_r() -> None:
    # Prepare / Execute
    plain = LoraConfig(r=16, lora_alpha=32)
    rslora = LoraConfig(r=16, lora_alpha=32, use_rslora=True)

    # Assert
    assert plain.scaling == 2.0
    assert rslora.scaling == 8.0
    assert LoraConfig(r=3, lora_alpha=1, use_rslora=True).scaling == 1 / math.sqrt(3)


def test_configs_are_frozen() -> None:
    # Prepare
    cfg = ExperimentConfig()

    # Execute / Assert
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.r = 4  # type: ignore[misc]


# ----------------------------------------------------------------- builders
def test_from_toml_reads_sections_and_keeps_other_defaults(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "exp.toml"
    path.write_text(
        'name = "exp"\nseed = 3\n\n[lora]\nr = 4\nlora_alpha = 32\n'
        'target_modules = ["query", "value"]\n\n[fed]\nnum_rounds = 2\n'
    )

    # Execute
    cfg = ExperimentConfig.from_toml(path)

    # Assert
    assert (cfg.name, cfg.seed) == ("exp", 3)
    assert cfg.lora.r == 4
    assert cfg.lora.lora_alpha == 32.0 and isinstance(cfg.lora.lora_alpha, float)
    assert cfg.lora.target_modules == ("query", "value")
    assert cfg.lora.lora_dropout == 0.1
    assert cfg.fed.num_rounds == 2 and cfg.fed.num_clients == 10
    assert cfg.train == TrainConfig()


def test_from_flat_reads_dotted_keys_and_comma_lists() -> None:
    # Prepare
    flat = {
        "seed": 1,
        "lora.r": 16,
        "lora.target_modules": "q_proj, k_proj ,v_proj",
        "lora.modules_to_save": "",
        "train.lr": 0.01,
        "fed.num_clients": 3,
        "sampling.min_clients": 3,
        "sampling.min_available": 3,
        "eval.min_clients": 1,
    }

    # Execute
    cfg = ExperimentConfig.from_flat(flat)

    # Assert
    assert cfg.seed == 1
    assert cfg.lora.r == 16
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert cfg.lora.modules_to_save == ()
    assert cfg.train.lr == 0.01
    assert cfg.fed.num_clients == 3


def test_with_overrides_parses_literals_and_leaves_the_original() -> None:
    # Prepare
    base = ExperimentConfig()

    # Execute
    cfg = base.with_overrides(
        [
            "lora.r=4",
            "train.lr = 1e-3",
            "lora.use_rslora=true",
            "lora.target_modules=q_proj,k_proj",
            "lora.modules_to_save=['score']",
            "compute.device=cuda:0",
            "model.name='tiny-bert'",
            "lora.lora_alpha=32",
        ]
    )

    # Assert
    assert cfg.lora.r == 4
    assert cfg.train.lr == 1e-3
    assert cfg.lora.use_rslora is True
    assert cfg.lora.target_modules == ("q_proj", "k_proj")
    assert cfg.lora.modules_to_save == ("score",)
    assert cfg.compute.device == "cuda:0"
    assert cfg.model.name == "tiny-bert"
    assert cfg.lora.lora_alpha == 32.0
    assert base == ExperimentConfig()


def test_integral_float_is_accepted_for_an_int() -> None:
    # Prepare / Execute
    cfg = ExperimentConfig.from_flat({"lora.r": 4.0})

    # Assert
    assert cfg.lora.r == 4 and isinstance(cfg.lora.r, int)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3", 3),
        ("1e-3", 1e-3),
        ("True", True),
        ("false", False),
        ("'x'", "x"),
        ("plain", "plain"),
        ("cuda:0", "cuda:0"),
        ("[1, 2]", "1,2"),
        ("None", "None"),
    ],
)
def test_parse_value(raw: str, expected: object) -> None:
    # Prepare / Execute
    value = parse_value(raw)

    # Assert
    assert value == expected and type(value) is type(expected)


def test_unflatten_nests_dotted_keys() -> None:
    # Prepare / Execute
    nested = unflatten({"a.b": 1, "a.c": "x", "d": True})

    # Assert
    assert nested == {"a": {"b": 1, "c": "x"}, "d": True}
    with pytest.raises(ValueError, match="clashes"):
        unflatten({"a": 1, "a.b": 2})


# ------------------------------------------------------------ unknown keys
@pytest.mark.parametrize(
    "build",
    [
        lambda: ExperimentConfig.from_flat({"lora.rank": 4}),
        lambda: ExperimentConfig.from_dict({"lora": {"rank": 4}}),
        lambda: ExperimentConfig().with_overrides(["lora.rank=4"]),
    ],
    ids=["from_flat", "from_dict", "with_overrides"],
)
def test_unknown_key_is_named(build: Any) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=re.escape("Unknown config key: lora.rank")):
        build()


def test_unknown_key_in_toml_and_unknown_section_are_named(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")

    # Execute / Assert
    with pytest.raises(ValueError, match="Unknown config key: train.learning_rate"):
        ExperimentConfig.from_toml(path)
    with pytest.raises(ValueError, match="Unknown config key: optim"):
        ExperimentConfig.from_dict({"optim": {"lr": 1}})
    with pytest.raises(ValueError, match="Unknown config key: seeds"):
        ExperimentConfig.from_flat({"seeds": 1})


def test_override_without_equals_sign_is_rejected() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="should look like section.key=value"):
        ExperimentConfig().with_overrides(["lora.r"])


def test_missing_or_invalid_toml_file(tmp_path: Path) -> None:
    # Prepare
    broken = tmp_path / "broken.toml"
    broken.write_text("[lora\nr = ")

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        ExperimentConfig.from_toml(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="is not valid TOML"):
        ExperimentConfig.from_toml(broken)


# -------------------------------------------------------------- bad values
BAD_VALUES = [
    ("lora.r", 0),
    ("lora.r", -1),
    ("lora.r", "8"),
    ("lora.r", True),
    ("lora.r", 2.5),
    ("lora.lora_alpha", 0),
    ("lora.lora_alpha", "16"),
    ("lora.lora_dropout", 1.5),
    ("lora.lora_dropout", 1.0),
    ("lora.lora_dropout", -0.1),
    ("lora.init_lora_weights", "xavier"),
    ("lora.target_modules", ""),
    ("lora.target_modules", "re:"),
    ("lora.target_modules", "re:(unclosed"),
    ("lora.target_modules", 5),
    ("lora.use_rslora", "yes"),
    ("lora.use_rslora", 1),
    ("lora.modules_to_save", 3),
    ("model.name", ""),
    ("model.task", "seq2seq"),
    ("model.num_labels", 1),
    ("model.max_length", 1),
    ("data.test_fraction", 1.0),
    ("data.test_fraction", 0.0),
    ("data.local_test_fraction", 1.0),
    ("data.max_examples", -1),
    ("data.partitioner", "random"),
    ("data.dirichlet_alpha", 0.0),
    ("eval.max_examples", -5),
    ("train.lr", 0.0),
    ("train.lr", "fast"),
    ("train.batch_size", 0),
    ("eval.batch_size", 0),
    ("train.local_steps", -1),
    ("train.local_steps", 0),  # with local_epochs = 0: nothing would train
    ("train.warmup_steps", -1),
    ("train.lr_schedule", "linear"),
    ("train.weight_decay", -0.1),
    ("train.max_grad_norm", -1.0),
    ("compute.device", "tpu"),
    ("compute.precision", "fp8"),
    ("compute.num_threads", -1),
    ("train.optimizer", "adam"),
    ("train.momentum", 0.9),  # with adamw: momentum is sgd's
    ("train.momentum", 1.0),
    ("fed.num_rounds", 0),
    ("fed.num_clients", 0),
    ("sampling.fraction", 0.0),
    ("sampling.fraction", 1.5),
    ("eval.fraction", -0.5),
    ("sampling.min_clients", 11),
    ("eval.min_clients", 0),
    ("sampling.min_available", 11),
    ("fed.aggregation", ""),
    ("fed.lr_decay", 0.0),
    ("fed.lr_decay", 1.5),
    ("eval.every", -1),
    ("guards.max_update_norm", -1.0),
    ("compression.codec", "int4"),
    ("head.mode", "shared"),
    ("head.warmup_rounds", 2),  # with head = averaged
    ("head.warmup_rounds", -1),
    ("compression.codec", "FP16"),
    ("compression.topk_fraction", 0.0),
    ("compression.topk_fraction", 1.5),
    ("compression.topk_fraction", -0.1),
    ("compute.client_cpus", 0.0),
    ("compute.client_gpus", -1.0),
    ("seed", -1),
    ("seed", 1.5),
    ("name", ""),
    ("name", 3),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_value_raises_naming_the_field(key: str, value: object) -> None:
    # Prepare
    field = key.rsplit(".", 1)[-1]
    # `r` inside LoraConfig, `lora.r` or `train.lr` from the coercion step
    named = re.compile(rf"`([a-z]+\.)?{field}`")

    # Execute / Assert
    with pytest.raises(ValueError) as info:
        ExperimentConfig.from_flat({key: value})
    assert named.search(str(info.value)), str(info.value)
    assert repr(value) in str(info.value) or key == "lora.target_modules"


def test_min_clients_above_num_clients_is_rejected() -> None:
    # Prepare
    flat = {"fed.num_clients": 3, "sampling.min_clients": 4}

    # Execute / Assert
    with pytest.raises(ValueError, match=r"`sampling\.min_clients`.*num_clients=3"):
        ExperimentConfig.from_flat(flat)


def test_section_that_is_not_a_table_is_rejected() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="Config section `lora` should be a table"):
        ExperimentConfig.from_dict({"lora": 5})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 0},
        {"target_modules": ()},
        {"target_modules": ("q_proj", "")},
        {"modules_to_save": "classifier"},
        {"use_rslora": "no"},
        {"init_lora_weights": "zeros"},
    ],
)
def test_lora_config_validates_direct_construction(kwargs: dict[str, Any]) -> None:
    # Prepare
    field = next(iter(kwargs))

    # Execute / Assert
    with pytest.raises(ValueError, match=f"`lora\\.{field}` should be"):
        LoraConfig(**kwargs)


# ------------------------------------------------------------- regex prefix
def test_re_prefix_makes_a_regex_that_round_trips() -> None:
    # Prepare
    flat = {"lora.target_modules": r"re:.*\.(q|v)_proj"}

    # Execute
    cfg = ExperimentConfig.from_flat(flat)
    back = cfg.to_flat()

    # Assert
    assert cfg.lora.target_modules == r".*\.(q|v)_proj"
    assert back["lora.target_modules"] == r"re:.*\.(q|v)_proj"
    assert ExperimentConfig.from_flat(back) == cfg
    assert cfg.with_overrides([]) == cfg


def test_regex_with_commas_is_not_split() -> None:
    # Prepare / Execute
    cfg = ExperimentConfig().with_overrides([r"lora.target_modules=re:.*(a|b){1,2}"])

    # Assert
    assert cfg.lora.target_modules == r".*(a|b){1,2}"


# -------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "cfg", [ExperimentConfig(), _custom()], ids=["default", "custom"]
)
def test_to_toml_from_toml_round_trip(cfg: ExperimentConfig, tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "cfg.toml"

    # Execute
    path.write_text(cfg.to_toml())
    back = ExperimentConfig.from_toml(path)

    # Assert
    assert back == cfg


@pytest.mark.parametrize(
    "cfg", [ExperimentConfig(), _custom()], ids=["default", "custom"]
)
def test_flat_and_dict_round_trips(cfg: ExperimentConfig) -> None:
    # Prepare / Execute
    flat = cfg.to_flat()
    plain = cfg.to_dict()

    # Assert
    assert all(type(v) in (bool, int, float, str) for v in flat.values())
    assert ExperimentConfig.from_flat(flat) == cfg
    assert ExperimentConfig.from_dict(plain) == cfg
    assert set(flat) == {
        f"{section}.{key}" if isinstance(plain[section], dict) else section
        for section in plain
        for key in (plain[section] if isinstance(plain[section], dict) else [None])
    }


def test_to_flat_keys_are_what_overrides_accept() -> None:
    # Prepare
    cfg = ExperimentConfig()

    # Execute
    flat = cfg.to_flat()

    # Assert
    assert "lora.r" in flat and "fed.num_rounds" in flat and "seed" in flat
    assert flat["lora.target_modules"] == "q_proj,v_proj"
    assert flat["lora.modules_to_save"] == ""
    for key, value in flat.items():
        assert cfg.with_overrides([f"{key}={value}"]) == cfg, key


# ------------------------------------------------------------ shipped files
@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = ExperimentConfig.from_toml(path)
    copy = tmp_path / path.name

    # Execute
    copy.write_text(cfg.to_toml())

    # Assert
    assert ExperimentConfig.from_toml(copy) == cfg
    assert ExperimentConfig.from_flat(cfg.to_flat()) == cfg


def test_default_toml_keeps_the_seed_lora_hyper_parameters() -> None:
    # Prepare
    path = ROOT / "configs" / "default.toml"
    if not path.is_file():
        pytest.skip("configs/default.toml is not written yet")

    # Execute
    cfg = ExperimentConfig.from_toml(path)

    # Assert: rank, alpha and dropout are the seed's; targets follow the model
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (8, 16.0, 0.1)


# ------------------------------------------------------------- moved keys
@pytest.mark.parametrize("old", sorted(RENAMED))
def test_a_moved_key_is_refused_naming_its_new_key(old: str) -> None:
    # Prepare
    new = RENAMED[old]
    section, name = new.split(".")
    wanted = (
        f"Config key `{old}` has moved to `{new}`: write it under [{section}] as "
        f"`{name} = ...` (or --set {new}=...)"
    )
    value = ExperimentConfig().to_flat()[new]

    # Execute / Assert: in a TOML table, a flat run config and a --set override
    for build in (
        lambda: ExperimentConfig.from_dict(unflatten({old: value})),
        lambda: ExperimentConfig.from_flat({old: value}),
        lambda: ExperimentConfig().with_overrides([f"{old}={value}"]),
    ):
        with pytest.raises(ValueError) as info:
            build()
        assert str(info.value) == wanted


def test_moved_keys_point_at_keys_the_schema_has() -> None:
    # Prepare
    keys = set(ExperimentConfig().to_flat())

    # Execute / Assert: every target exists, no old key survives, none collide
    assert set(RENAMED.values()) <= keys
    assert not set(RENAMED) & keys
    assert len(set(RENAMED.values())) == len(RENAMED)


def test_an_old_layout_file_fails_on_its_first_moved_key(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "old.toml"
    path.write_text("[fed]\nnum_rounds = 2\ndp_noise_multiplier = 1.0\n")

    # Execute / Assert
    with pytest.raises(ValueError, match=r"^Config key `fed\.dp_noise_multiplier` "):
        ExperimentConfig.from_toml(path)


def test_every_section_has_about_ten_keys_or_fewer() -> None:
    # Prepare
    plain = ExperimentConfig().to_dict()

    # Execute
    sizes = {name: len(v) for name, v in plain.items() if isinstance(v, dict)}

    # Assert
    assert max(sizes.values()) <= 11, sizes
