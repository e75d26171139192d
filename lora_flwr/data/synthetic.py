"""Two small synthetic corpora: ``synthetic`` (classification) and ``synthetic_lm``.

Both are generated from a fixed seed, so they are the same for every experiment.
"""

from __future__ import annotations

import numpy as np

from lora_flwr.data.corpus import TextDataset, _Corpus

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
