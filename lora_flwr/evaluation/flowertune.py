r"""FlowerTune's General-NLP protocol: the prompt, the answer's scoring, the board.

Everything here follows adap/flower ``benchmarks/flowertune-llm/evaluation/
general-nlp`` (``benchmarks.py``: ``MMLU_CATEGORY``, ``INSTRUCTIONS``,
``infer_mmlu``, ``inference``, ``accuracy_compute``; ``utils.py``:
``format_example``, ``format_answer``, ``clean_mcq_answer``):

* prompt: ``"Answer the following multiple choice question.\n"`` + ``"Question:
  {q}\n\nOptions:\nA. ..\nB. ..\nC. ..\nD. .."`` + ``"\nThe answer is:\n"``,
  where ``q`` gets a ``?`` unless it ends in ``?`` or ``.``; wrapped as
  ``"<|im_start|>question\n{prompt}<|im_end|>\n<|im_start|>answer\n"`` (the role
  names are literally ``question``/``answer``; the tokenizer's chat template is not
  used) and encoded with the tokenizer's default special tokens;
* generation: greedy, ``max_new_tokens = len(tokenizer(gold))``, i.e. one token for
  a letter, decoded with ``skip_special_tokens=True``;
* scoring: lower-case, non-alphanumerics to spaces, strip, first character,
  compared with the gold letter;
* the board: accuracy per category and the unweighted mean of STEM, social
  sciences and humanities (``other`` is reported, never averaged).

Differences that remain: FlowerTune loads the base in 4-bit (bitsandbytes); we
evaluate the float32 model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

INSTRUCTION = "Answer the following multiple choice question."

# FlowerTune's MMLU_CATEGORY (benchmarks.py), subject -> category, verbatim.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology",
        "college_chemistry", "college_computer_science", "college_mathematics",
        "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics",
        "machine_learning",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography",
        "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence",
        "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics",
        "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}  # fmt: skip
BOARD_CATEGORIES: tuple[str, ...] = ("stem", "social_sciences", "humanities")
SUBJECT_CATEGORY: dict[str, str] = {
    subject: category
    for category, subjects in CATEGORIES.items()
    for subject in subjects
}
# The answers format_answer accepts; anything else is compared whole (and loses).
_ACCEPTED = frozenset({"a", "b", "c", "d", "e", "yes", "no"})


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question.

    Attributes
    ----------
    question
        The question text as stored.
    choices
        The options, shown as ``A.``, ``B.``, ... in this order.
    answer
        Index of the correct option in ``choices``.
    subject
        The MMLU subject (e.g. ``abstract_algebra``); picks the category.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str

    def __post_init__(self) -> None:
        """Check the number of choices and the answer index."""
        if not 2 <= len(self.choices) <= 26:
            raise ValueError(
                f"`choices` should hold 2 to 26 options but {self.subject!r} has "
                f"{len(self.choices)}: {self.question[:60]!r}"
            )
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(
                f"`answer` should index one of {len(self.choices)} choices but the "
                f"value passed is {self.answer} ({self.subject}: "
                f"{self.question[:60]!r})"
            )

    @property
    def gold(self) -> str:
        """The correct option's letter (``"A"`` for index 0)."""
        return chr(ord("A") + self.answer)

    @property
    def category(self) -> str:
        """FlowerTune's category of the subject; ``"other"`` if it has none."""
        return SUBJECT_CATEGORY.get(self.subject, "other")


def format_question(question: str, choices: Sequence[str]) -> str:
    """Render ``Question: ...`` and the lettered options (``format_example``)."""
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    options = "\n".join(f"{chr(65 + i)}. {choice}" for i, choice in enumerate(choices))
    return "Question: " + question + "\n\nOptions:\n" + options


def build_prompt(item: MCQuestion) -> str:
    r"""Return the model's full input text for ``item``, wrapper included.

    Parameters
    ----------
    item
        The question.

    Returns
    -------
    str
        ``"<|im_start|>question\n{instruction}\n{question and options}\nThe
        answer is:\n<|im_end|>\n<|im_start|>answer\n"``, as FlowerTune's
        ``infer_mmlu`` and ``inference`` build it.
    """
    prompt = f"{INSTRUCTION}\n{format_question(item.question, item.choices)}"
    prompt = f"{prompt}\nThe answer is:\n"
    return f"<|im_start|>question\n{prompt}<|im_end|>\n<|im_start|>answer\n"


def extract_answer(output: str) -> str:
    r"""Return the scored answer of a generated text (``format_answer``, mcq).

    The text is lower-cased (as ``accuracy_compute`` does), cut to the line after
    ``\n##`` if there is one, its non-alphanumerics become spaces, and the first
    character of what is left is the answer. When that is not one of ``a``-``e``,
    ``yes``, ``no``, the whole lower-cased text is the answer (and cannot match a
    letter).
    """
    full = output.lower()
    text = full
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0].strip()
    text = re.sub(r"[^a-zA-Z0-9]", " ", text).strip()
    text = re.sub(" +", " ", text)
    text = text.encode("ascii", "ignore").decode("ascii")[:1]
    return text if text in _ACCEPTED else full


def is_correct(output: str, gold: str) -> bool:
    """Whether a generated text answers ``gold`` (a letter) under the protocol."""
    return extract_answer(output) == gold.lower()


@dataclass(frozen=True)
class Score:
    """Correct answers out of a number of questions."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        """``correct / total``; NaN when there are no questions."""
        return self.correct / self.total if self.total else math.nan


@dataclass(frozen=True)
class BenchmarkResult:
    """Accuracy per category and per subject, and the board's average.

    Attributes
    ----------
    categories
        Category -> score, for every category with at least one question, in
        the order stem, social_sciences, humanities, other.
    subjects
        Subject -> score, sorted by subject.
    """

    categories: dict[str, Score]
    subjects: dict[str, Score]

    @property
    def average(self) -> float:
        """Unweighted mean accuracy of the board's categories that have questions.

        FlowerTune's board averages STEM, social sciences and humanities; ``other``
        never counts. NaN when none of the three has a question.
        """
        accs = [self.categories[c].accuracy for c in BOARD_CATEGORIES if c in self]
        return sum(accs) / len(accs) if accs else math.nan

    def __contains__(self, category: object) -> bool:
        """Whether ``category`` has questions."""
        return category in self.categories

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: counts, accuracies and the average."""

        def row(score: Score) -> dict[str, Any]:
            acc = score.accuracy
            return {
                "correct": score.correct,
                "total": score.total,
                "accuracy": None if math.isnan(acc) else acc,
            }

        average = self.average
        return {
            "categories": {c: row(s) for c, s in self.categories.items()},
            "average": None if math.isnan(average) else average,
            "averaged": [c for c in BOARD_CATEGORIES if c in self],
            "subjects": {name: row(s) for name, s in self.subjects.items()},
        }


def score_outputs(
    questions: Sequence[MCQuestion], outputs: Sequence[str]
) -> BenchmarkResult:
    """Score generated texts against their questions, per subject and category.

    Parameters
    ----------
    questions
        The questions, in any order.
    outputs
        The decoded generation for each question, in the same order.

    Returns
    -------
    BenchmarkResult
        Counts per category and subject; the average as FlowerTune's board takes it.

    Raises
    ------
    ValueError
        If the two sequences differ in length.
    """
    if len(questions) != len(outputs):
        raise ValueError(
            f"{len(outputs)} outputs for {len(questions)} questions: each question "
            "needs exactly one output"
        )
    counts: dict[str, list[int]] = {}
    for item, output in zip(questions, outputs, strict=True):
        tally = counts.setdefault(item.subject, [0, 0])
        tally[0] += is_correct(output, item.gold)
        tally[1] += 1
    subjects = {s: Score(*counts[s]) for s in sorted(counts)}
    categories: dict[str, Score] = {}
    for category in CATEGORIES:
        in_cat = [
            score
            for s, score in subjects.items()
            if SUBJECT_CATEGORY.get(s, "other") == category
        ]
        if in_cat:
            categories[category] = Score(
                sum(x.correct for x in in_cat), sum(x.total for x in in_cat)
            )
    return BenchmarkResult(categories, subjects)
