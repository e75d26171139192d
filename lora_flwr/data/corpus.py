"""The types every corpus loader shares: :class:`TextDataset` and ``_Corpus``.

A leaf module, so that the loaders (:mod:`lora_flwr.data.shakespeare`,
:mod:`lora_flwr.data.synthetic`, :mod:`lora_flwr.data.local_files`) and the dispatch
in :mod:`lora_flwr.data.datasets` can all import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# One chat turn, ``(role, content)``; roles are "system", "user" and "assistant".
Message = tuple[str, str]
# A whole conversation, in order; it ends with an assistant turn.
Conversation = tuple[Message, ...]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


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
        Natural owner of each example: a movie, ``"<play>/<ROLE>"``, a category
        (instruction data), or ``""`` when unknown.
    messages
        Instruction data: one :data:`Conversation` per example, rendered with the
        tokenizer's chat template and trained on its assistant turns only
        (``texts`` then hold a plain flattening, for reading only). ``None`` for
        plain text and classification corpora.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    groups: tuple[str, ...]
    messages: tuple[Conversation, ...] | None = None

    def __post_init__(self) -> None:
        """Check the tuples are parallel."""
        if (
            len(self.groups) != len(self.texts)
            or (self.labels is not None and len(self.labels) != len(self.texts))
            or (self.messages is not None and len(self.messages) != len(self.texts))
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
        labels, messages = self.labels, self.messages
        return TextDataset(
            texts=tuple(texts[i] for i in idx),
            labels=None if labels is None else tuple(labels[i] for i in idx),
            groups=tuple(groups[i] for i in idx),
            messages=None if messages is None else tuple(messages[i] for i in idx),
        )


@dataclass(frozen=True)
class _Corpus:
    """A loaded corpus before splitting."""

    data: TextDataset
    num_labels: int  # 0: causal LM
    # Why a corpus has no labels, said where that matters (a classifier asked for).
    unlabelled: str = ""
