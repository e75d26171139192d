"""lora_flwr.sweep: variants file, splits, run planning and the report block."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_compare import _history

from lora_flwr.compare import BEGIN as COMPARE_BEGIN
from lora_flwr.compare import END as COMPARE_END
from lora_flwr.config import ExperimentConfig
from lora_flwr.sweep import (
    BEGIN,
    END,
    main,
    plan_sweep,
    read_variants,
    split_label,
    split_overrides,
)

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"


def _variants(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "variants.toml"
    path.write_text(text)
    return path


def test_read_variants_reads_names_overrides_and_notes(tmp_path: Path) -> None:
    # Prepare
    path = _variants(
        tmp_path,
        '[plain]\noverrides = []\n\n[lc]\nabout = "FedLC"\n'
        'overrides = ["loss.name=fedlc", "head.mode=frozen"]\n',
    )
    cfg = ExperimentConfig.from_toml(SMOKE)

    # Execute
    variants = read_variants(path, cfg)

    # Assert
    assert [(v.name, v.overrides, v.about) for v in variants] == [
        ("plain", (), ""),
        ("lc", ("loss.name=fedlc", "head.mode=frozen"), "FedLC"),
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[a]\noverrides = 'train.lr=1'\n", "list of 'key=value'"),
        ("[a]\nsteps = 3\n", "should be a table with 'overrides'"),
        ("[a]\noverrides = ['train.lr=-1']\n", "variant 'a'.*train.lr"),
        ("[a]\noverrides = ['train.nope=1']\n", "variant 'a'.*nope"),
        ('["a b"]\n', "variant 'a b'.*name"),
        ("", "defines no variant"),
        ("[a\n", "variants file"),
    ],
)
def test_bad_variants_files_are_clear_errors(
    tmp_path: Path, text: str, match: str
) -> None:
    cfg = ExperimentConfig.from_toml(SMOKE)
    with pytest.raises(ValueError, match=match):
        read_variants(_variants(tmp_path, text), cfg)


def test_a_missing_variants_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        read_variants(tmp_path / "missing.toml", ExperimentConfig.from_toml(SMOKE))


@pytest.mark.parametrize(
    ("split", "overrides", "label"),
    [
        ("natural", ["data.partitioner=natural"], "natural"),
        ("iid", ["data.partitioner=iid"], "iid"),
        ("0.1", ["data.partitioner=dirichlet", "data.dirichlet_alpha=0.1"], "alpha0.1"),
        (
            "0.50",
            ["data.partitioner=dirichlet", "data.dirichlet_alpha=0.5"],
            "alpha0.5",
        ),
    ],
)
def test_splits_select_the_partitioner(
    split: str, overrides: list[str], label: str
) -> None:
    assert split_overrides(split) == overrides
    assert split_label(split) == label


@pytest.mark.parametrize("split", ["-0.1", "0", "nan", "skewed"])
def test_a_bad_split_is_a_clear_error(split: str) -> None:
    with pytest.raises(ValueError, match="Dirichlet alpha > 0"):
        split_overrides(split)


def test_plan_sweep_gives_every_variant_every_split_and_seed(tmp_path: Path) -> None:
    # Prepare
    cfg = ExperimentConfig.from_toml(SMOKE)
    path = _variants(
        tmp_path, '[plain]\noverrides = []\n[lc]\noverrides = ["loss.name=fedlc"]\n'
    )
    variants = read_variants(path, cfg)

    # Execute
    specs = plan_sweep(cfg, variants, ["0.1", "natural"], [0, 1], Path("/w"))

    # Assert: 2 variants x 2 splits x 2 seeds, seed 0 first, distinct directories.
    assert len(specs) == 8
    assert [s.seed for s in specs[:4]] == [0] * 4
    dirs = {(s.cfg.output_dir, s.cfg.name) for s in specs}
    assert len(dirs) == 8
    for spec in specs:
        assert spec.cfg.seed == spec.seed
        assert spec.cfg.name == f"{spec.rule}-s{spec.seed}"
        assert spec.cfg.output_dir == f"/w/{spec.setting}"
        assert spec.cfg.loss.name == ("fedlc" if spec.rule == "lc" else "ce")
        if spec.setting == "alpha0.1":
            assert spec.cfg.data.partitioner == "dirichlet"
            assert spec.cfg.data.dirichlet_alpha == 0.1
        else:
            assert spec.cfg.data.partitioner == "natural"


def _fake_run(spec: Any, accs: list[float]) -> None:
    """What a finished run leaves behind (history, config, wall, local eval)."""
    run = Path(spec.cfg.output_dir) / spec.cfg.name
    run.mkdir(parents=True)
    (run / "history.json").write_text(json.dumps(_history(accs)))
    (run / "config.toml").write_text(spec.cfg.to_toml())
    (run / "wall.json").write_text(json.dumps({"seconds": 50.0}))
    (run / "local_eval.json").write_text(json.dumps({"accuracy": accs[-1] + 0.1}))


def test_report_only_writes_a_table_per_split_beside_the_compare_block(
    tmp_path: Path,
) -> None:
    # Prepare: finished runs for two variants at alpha 0.1, seeds 0 and 1.
    cfg = ExperimentConfig.from_toml(SMOKE)
    path = _variants(
        tmp_path, '[plain]\noverrides = []\n[lc]\noverrides = ["loss.name=fedlc"]\n'
    )
    work = tmp_path / "work"
    specs = plan_sweep(cfg, read_variants(path, cfg), ["0.1"], [0, 1], work)
    for spec in specs:
        accs = [0.5, 0.6, 0.8] if spec.rule == "lc" else [0.5, 0.44, 0.56]
        _fake_run(spec, accs[: cfg.fed.num_rounds + 1])
    for seed, acc in ((0, 0.78), (1, 0.8)):
        ref = work / "centralized" / f"centralized-s{seed}"
        ref.mkdir(parents=True)
        final = {"accuracy": acc, "step": 480}
        (ref / "history.json").write_text(json.dumps({"final": final}))
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# R\n\n{COMPARE_BEGIN}\nrules\n{COMPARE_END}\n")

    # Execute
    code = main(
        [
            "--config",
            str(SMOKE),
            "--variants",
            str(path),
            "--splits",
            "0.1",
            "--seeds",
            "2",
            "--work",
            str(work),
            "--out",
            str(out),
            "--report-only",
        ]
    )

    # Assert: the rule comparison's block is untouched, the sweep's appended.
    assert code == 0
    text = out.read_text()
    assert f"{COMPARE_BEGIN}\nrules\n{COMPARE_END}" in text
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert "#### alpha0.1" in block
    rows = [line for line in block.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant | final |")
    final = {"plain": 0.56, "lc": 0.8}
    for name in ("plain", "lc"):
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        assert f"| {final[name]:.3f} ± 0.000 |" in row
        assert f"{final[name] + 0.1:.3f} ± 0.000 |" in row
    assert "**lc**: `loss.name=fedlc`" in block
    assert (tmp_path / "results" / "sweep-alpha0.1-round.png").is_file()
    assert "(same training pool, 480 steps" in block
    assert "seeds [0, 1]): 0.790 ± 0.014." in block


def test_main_refuses_an_unknown_variant_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _variants(tmp_path, "[plain]\noverrides = []\n")
    code = main(["--config", str(SMOKE), "--variants", str(path), "--only", "nope"])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_the_shipped_label_skew_config_is_default_plus_split_plus_its_variant() -> None:
    # configs/label_skew.toml says which variant it ships; the sweep measures that
    # variant on configs/default.toml, so the three files must agree.
    default = ExperimentConfig.from_toml(REPO / "configs" / "default.toml")
    shipped = ExperimentConfig.from_toml(REPO / "configs" / "label_skew.toml")
    variants = read_variants(REPO / "configs" / "variants" / "label_skew.toml", default)
    text = (REPO / "configs" / "label_skew.toml").read_text()
    chosen = [v for v in variants if f"variant `{v.name}`" in text]
    assert len(chosen) == 1, "label_skew.toml should name exactly one variant"
    alpha = shipped.data.dirichlet_alpha
    want = default.with_overrides([*split_overrides(f"{alpha}"), *chosen[0].overrides])
    assert shipped.data.partitioner == "dirichlet"
    assert shipped == replace(want, name=shipped.name)
