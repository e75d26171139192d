"""A tokenizer on the ``tokenizers`` library alone (a model's ``tokenizer.json``).

:class:`NativeTokenizer` offers the part of a ``transformers`` fast tokenizer's API
that lora_flwr uses (batched encoding with truncation, optional padding and
character offsets, the special tokens and their ids, ``len``, ``decode``,
``name_or_path``, ``save_pretrained``, ``apply_chat_template``). Both read the
same ``tokenizer.json``, so they give the same ids; importing it costs
milliseconds instead of transformers' seconds.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Encoding, Tokenizer

SPECIAL_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Larger values in tokenizer_config.json mean "no limit" (transformers' sentinel).
_NO_LIMIT = 10**12


class NativeTokenizer:
    """Encode and decode text with a ``tokenizers.Tokenizer``.

    Parameters
    ----------
    backend
        The Rust tokenizer; its own padding and truncation settings are cleared
        (a call's arguments decide them).
    name_or_path
        Where it was read from (the partition cache hashes that directory's files).
    special_tokens
        ``pad_token``, ``eos_token``, ... by name; each must be in the vocabulary.
    model_max_length
        Truncation length when a call asks for truncation without ``max_length``.
    model_input_names
        What a call returns besides ``input_ids`` by default (``attention_mask``,
        and ``token_type_ids`` for BERT).
    chat_template
        The model's Jinja chat template (``chat_template.jinja`` or the
        ``chat_template`` of ``tokenizer_config.json``), or None.
    """

    def __init__(
        self,
        backend: Tokenizer,
        *,
        name_or_path: str,
        special_tokens: dict[str, str],
        model_max_length: int,
        model_input_names: Sequence[str] = ("input_ids", "attention_mask"),
        chat_template: str | None = None,
    ) -> None:
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._lock = threading.Lock()  # truncation is a setting of the backend
        self.name_or_path = name_or_path
        self.model_max_length = model_max_length
        self.model_input_names = list(model_input_names)
        self.chat_template = chat_template
        self._special: dict[str, str | None] = dict.fromkeys(SPECIAL_NAMES)
        for name, token in special_tokens.items():
            self._set_special(name, token)

    @classmethod
    def from_dir(
        cls, path: Path, *, model_input_names: Sequence[str] = ("input_ids",)
    ) -> NativeTokenizer:
        """Read ``tokenizer.json`` and the special tokens of a model directory.

        Raises
        ------
        RuntimeError
            If ``tokenizer.json`` is missing or unreadable (the message names it).
        """
        file = path / "tokenizer.json"
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise RuntimeError(
                f"Cannot read the tokenizer {file}: {type(exc).__name__}: {exc}. "
                f"Delete {path} to fetch the model again."
            ) from exc
        settings: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            extra = path / name
            if extra.is_file():
                settings.update(json.loads(extra.read_text(encoding="utf-8")))
        special = {
            name: _content(settings[name])
            for name in SPECIAL_NAMES
            if settings.get(name) is not None
        }
        limit = int(settings.get("model_max_length", _NO_LIMIT) or _NO_LIMIT)
        # transformers >= 4.43 saves the template as its own file.
        jinja = path / "chat_template.jinja"
        template = settings.get("chat_template")
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        return cls(
            backend,
            name_or_path=str(path),
            special_tokens=special,
            model_max_length=min(limit, _NO_LIMIT),
            model_input_names=model_input_names,
            chat_template=template if isinstance(template, str) else None,
        )

    # ------------------------------------------------------------ special tokens
    def _set_special(self, name: str, token: str | None) -> None:
        if token is not None and self._backend.token_to_id(token) is None:
            raise ValueError(
                f"`{name}` {token!r} is not in the tokenizer's vocabulary of "
                f"{len(self)} tokens"
            )
        self._special[name] = token

    def _id(self, name: str) -> int | None:
        token = self._special[name]
        return None if token is None else self._backend.token_to_id(token)

    @property
    def pad_token(self) -> str | None:
        """The padding token."""
        return self._special["pad_token"]

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        self._set_special("pad_token", token)

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token."""
        return self._special["eos_token"]

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token."""
        return self._special["bos_token"]

    @property
    def unk_token(self) -> str | None:
        """The unknown token."""
        return self._special["unk_token"]

    @property
    def cls_token(self) -> str | None:
        """The classification token (BERT's ``[CLS]``)."""
        return self._special["cls_token"]

    @property
    def sep_token(self) -> str | None:
        """The separator token (BERT's ``[SEP]``)."""
        return self._special["sep_token"]

    @property
    def pad_token_id(self) -> int | None:
        """Id of :attr:`pad_token`."""
        return self._id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of :attr:`eos_token`."""
        return self._id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of :attr:`bos_token`."""
        return self._id("bos_token")

    @property
    def unk_token_id(self) -> int | None:
        """Id of :attr:`unk_token`."""
        return self._id("unk_token")

    @property
    def cls_token_id(self) -> int | None:
        """Id of :attr:`cls_token`."""
        return self._id("cls_token")

    @property
    def sep_token_id(self) -> int | None:
        """Id of :attr:`sep_token`."""
        return self._id("sep_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every special token that is set."""
        ids = (self._id(n) for n in SPECIAL_NAMES)
        return sorted({i for i in ids if i is not None})

    def __len__(self) -> int:
        """Vocabulary size, added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    # ------------------------------------------------------------ encode/decode
    def __call__(
        self,
        text: str | Sequence[str],
        *,
        truncation: bool = False,
        max_length: int | None = None,
        padding: bool | str = False,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        return_token_type_ids: bool | None = None,
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
    ) -> dict[str, Any]:
        """Encode one text or a batch, as a ``transformers`` tokenizer call does.

        Parameters
        ----------
        text
            A string (lists come back unbatched) or a sequence of strings.
        truncation
            Cut each encoding to ``max_length`` (special tokens included), or to
            ``model_max_length`` when ``max_length`` is None.
        max_length
            See ``truncation`` and ``padding``.
        padding
            False / ``"do_not_pad"``; True / ``"longest"`` (right padding to the
            longest in the batch); ``"max_length"``.
        return_tensors
            None for lists, ``"pt"`` for int64 torch tensors.
        return_attention_mask, return_token_type_ids
            Include these; None follows ``model_input_names``.
        add_special_tokens
            Apply the tokenizer's template (``[CLS] ... [SEP]`` for BERT).
        return_offsets_mapping
            Include ``offset_mapping``: each token's ``(start, end)`` characters.

        Returns
        -------
        dict
            ``input_ids`` and the asked-for masks.

        Raises
        ------
        ValueError
            For an unknown ``padding`` or ``return_tensors``, or padding without a
            pad token, or ragged ``"pt"`` output.
        """
        single = isinstance(text, str)
        texts = [text] if isinstance(text, str) else list(text)
        limit = None
        if truncation:
            limit = self.model_max_length if max_length is None else max_length
        encodings = self._encode(texts, limit, add_special_tokens)
        ids = [list(e.ids) for e in encodings]
        types = [list(e.type_ids) for e in encodings]
        masks = [[1] * len(row) for row in ids]
        width = _pad_width(padding, ids, max_length)
        if width is not None:
            ids, types, masks = self._pad(ids, types, masks, width)
        out: dict[str, Any] = {"input_ids": ids}
        if self._wants("token_type_ids", return_token_type_ids):
            out["token_type_ids"] = types
        if self._wants("attention_mask", return_attention_mask):
            out["attention_mask"] = masks
        if return_offsets_mapping:
            out["offset_mapping"] = [[tuple(o) for o in e.offsets] for e in encodings]
        return _finish(out, return_tensors, single)

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> str | list[int]:
        """Render a conversation with a chat template, as ``transformers`` does.

        The rendering is transformers' own (``render_jinja_template``, imported
        here, ~1 s once), with the special tokens as template variables, so the
        text is the one a ``transformers`` tokenizer renders.

        Parameters
        ----------
        conversation
            Messages with ``role`` and ``content``.
        chat_template
            The template (default: :attr:`chat_template`).
        add_generation_prompt
            End with the header of an assistant turn.
        tokenize
            Return ids (no special tokens added) instead of the text.

        Returns
        -------
        str | list[int]
            The rendered text, or its ids.

        Raises
        ------
        ValueError
            If there is no template.
        """
        from transformers.utils.chat_template_utils import render_jinja_template

        template = self.chat_template if chat_template is None else chat_template
        if not template:
            raise ValueError(f"The tokenizer {self.name_or_path} has no chat template")
        # Special tokens are template variables, as transformers passes them.
        specials: dict[str, Any] = {
            k: v for k, v in self._special.items() if v is not None
        }
        # Annotated "-> str" but returns (texts, generation indices).
        out: Any = render_jinja_template(
            conversations=[conversation],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **specials,
        )
        text = str(out[0][0])
        if not tokenize:
            return text
        return list(self(text, add_special_tokens=False)["input_ids"])

    def _encode(
        self, texts: list[str], limit: int | None, add_special_tokens: bool
    ) -> list[Encoding]:
        """Encode a batch, cut to ``limit`` tokens (None: no truncation)."""
        # Truncation is a setting of the shared backend: set, use and clear it
        # under the lock so that concurrent calls never see each other's limit.
        with self._lock:
            if limit is None:
                self._backend.no_truncation()
            else:
                self._backend.enable_truncation(limit)
            try:
                return list(
                    self._backend.encode_batch(
                        texts, add_special_tokens=add_special_tokens
                    )
                )
            finally:
                self._backend.no_truncation()

    def _pad(
        self,
        ids: list[list[int]],
        types: list[list[int]],
        masks: list[list[int]],
        width: int,
    ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Right-pad every row to ``width``: the pad id, type 0, mask 0.

        Raises
        ------
        ValueError
            If no pad token is set.
        """
        pad = self.pad_token_id
        if pad is None:
            raise ValueError(
                "Padding needs a pad token; set `tokenizer.pad_token` first"
            )
        return (
            [row + [pad] * (width - len(row)) for row in ids],
            [row + [0] * (width - len(row)) for row in types],
            [row + [0] * (width - len(row)) for row in masks],
        )

    def _wants(self, name: str, asked: bool | None) -> bool:
        """Whether to return ``name``: as asked, else as ``model_input_names`` says."""
        return name in self.model_input_names if asked is None else asked

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Turn ids back into text."""
        return str(
            self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        )

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Return the token string of each id."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]:
        """Return the id of each token string (None for an unknown string)."""
        return [self._backend.token_to_id(t) for t in tokens]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``directory``.

        ``transformers.AutoTokenizer`` loads the result as a fast tokenizer.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out / "tokenizer.json"))
        settings: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.model_max_length,
            "model_input_names": self.model_input_names,
            **{k: v for k, v in self._special.items() if v is not None},
        }
        if self.chat_template:
            settings["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(
            json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8"
        )
        return out


def _content(value: Any) -> str:
    """Return a special token's string (stored as text or as an AddedToken dict)."""
    if isinstance(value, dict):
        return str(value["content"])
    return str(value)


def _finish(
    out: dict[str, Any], return_tensors: str | None, single: bool
) -> dict[str, Any]:
    """Return the columns as lists (one text: unbatched) or as int64 tensors.

    Raises
    ------
    ValueError
        For ragged rows with ``"pt"``, or a ``return_tensors`` other than None/"pt".
    """
    if return_tensors == "pt":
        if len({len(row) for row in out["input_ids"]}) > 1:
            raise ValueError(
                "Rows of different lengths cannot form a tensor; pass padding=True"
            )
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    if return_tensors is not None:
        raise ValueError(
            f"`return_tensors` should be None or 'pt' but the value passed is "
            f"{return_tensors!r}"
        )
    if single:
        return {k: v[0] for k, v in out.items()}
    return out


def _pad_width(
    padding: bool | str, ids: list[list[int]], max_length: int | None
) -> int | None:
    """How wide to pad the batch, or None for no padding."""
    if padding in (False, "do_not_pad"):
        return None
    if padding in (True, "longest"):
        return max((len(row) for row in ids), default=0)
    if padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs `max_length`")
        return max_length
    raise ValueError(
        "`padding` should be True, False, 'longest', 'max_length' or 'do_not_pad' "
        f"but the value passed is {padding!r}"
    )
