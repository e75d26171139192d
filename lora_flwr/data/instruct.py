"""Instruction data: Alpaca, chat and ShareGPT rows read with Hugging Face ``datasets``.

Every source becomes a :class:`~lora_flwr.data.corpus.TextDataset` whose
``messages`` hold one conversation per row, with the roles ``system``, ``user``
and ``assistant``:

* Alpaca (``data.format = "alpaca"``): ``instruction``, optional ``input`` and
  ``output``; Dolly's names ``context`` and ``response`` are read too, and a
  ``system`` column becomes a system turn. The user turn is the instruction, then
  a blank line and the input when there is one (Alpaca's own prompt order).
* chat (``"chat"``): ``messages``, a list of ``{"role", "content"}``, or
  ShareGPT's ``conversations``, a list of ``{"from", "value"}`` (``human`` ->
  user, ``gpt`` -> assistant). Turns after the last assistant turn carry no
  loss and are left out.

Files are read by ``datasets`` itself (``load_dataset("json" | "parquet")``,
``Dataset.from_file`` for ``.arrow``, ``load_from_disk`` for a ``save_to_disk``
folder), not by a parser of ours; a Hub id goes through flwr-datasets'
``FederatedDataset``. Errors name the file, the row and the field, never the
text there (see :mod:`lora_flwr.data.local_files`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_flwr.assets import cache_dir
from lora_flwr.data.corpus import Conversation, Message, TextDataset, _Corpus

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Suffixes ``datasets`` reads for us (a folder is a save_to_disk one).
HF_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".parquet", ".arrow")
# Alpaca's field names first, then Dolly's (databricks-dolly-15k).
RESPONSE_FIELDS = ("output", "response")
INPUT_FIELDS = ("input", "context")
INSTRUCTION_FIELD = "instruction"
SYSTEM_FIELD = "system"
CHAT_FIELDS = ("messages", "conversations")
# ShareGPT speakers -> roles.
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def detect_format(columns: Sequence[str]) -> str:
    """Return ``"chat"``, ``"alpaca"`` or ``"text"`` from a source's columns."""
    if any(c in columns for c in CHAT_FIELDS):
        return "chat"
    if INSTRUCTION_FIELD in columns or any(c in columns for c in RESPONSE_FIELDS):
        return "alpaca"
    return "text"


def read_hf(name: str) -> tuple[datasets.Dataset, str]:
    """Read a file, a ``save_to_disk`` folder or a Hub id with ``datasets``.

    Parameters
    ----------
    name
        ``data.name``: a ``.json`` / ``.jsonl`` / ``.parquet`` / ``.arrow`` (or
        ``.csv``) file,
        a folder written by ``Dataset.save_to_disk`` (a ``DatasetDict`` gives its
        ``train`` split, or its only one), or a Hub data set id.

    Returns
    -------
    tuple[datasets.Dataset, str]
        The rows and what to call the source in messages.

    Raises
    ------
    ValueError
        For a file ``datasets`` cannot read, a folder that is no saved data set,
        or a Hub id that cannot be loaded (offline: the message names the local
        alternatives).
    """
    import datasets

    path = Path(name).expanduser()
    with _quiet():
        if path.is_dir():
            return _read_saved(path), str(path)
        if not path.is_file():
            return _read_hub(name), name
        suffix = path.suffix.lower()
        try:
            if suffix == ".arrow":
                return datasets.Dataset.from_file(str(path)), str(path)
            builder = {".parquet": "parquet", ".csv": "csv"}.get(suffix, "json")
            ds = datasets.load_dataset(
                builder,
                data_files=str(path),
                split="train",
                cache_dir=str(cache_dir() / "datasets"),
            )
        except Exception as exc:  # datasets wraps parser errors in many types
            raise ValueError(
                f"{path} cannot be read as {suffix[1:]} by `datasets` "
                f"({type(exc).__name__}); check the file (the file's content is not "
                "shown)"
            ) from None
    assert isinstance(ds, datasets.Dataset), "split='train' gives one Dataset"
    return ds, str(path)


def _read_saved(path: Path) -> datasets.Dataset:
    """Read the rows of a ``save_to_disk`` folder (a DatasetDict: its train split)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise ValueError(
            f"`data.name` = {str(path)!r} is a folder but no data set written by "
            "`save_to_disk` (no dataset_info.json / dataset_dict.json); pass the "
            "folder `save_to_disk` wrote, or a .json / .jsonl / .parquet file"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            return loaded["train"]
        if len(splits) == 1:
            return loaded[splits[0]]
        raise ValueError(
            f"{path} holds the splits {splits} and none is called 'train'; save the "
            "one to train on alone"
        )
    return loaded


def _read_hub(name: str) -> datasets.Dataset:
    """Read a Hub data set's train split through flwr-datasets' FederatedDataset."""
    from flwr_datasets import FederatedDataset

    try:
        fds = FederatedDataset(dataset=name, partitioners={"train": 1})
        ds = fds.load_split("train")
    except Exception as exc:  # offline, unknown id, no train split, ...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ValueError(
            f"`data.name` = {name!r} is neither a file nor a folder and cannot be "
            f"loaded from the Hugging Face Hub ({type(exc).__name__}: {first}); "
            "offline, pass a local copy instead: a folder written by "
            "`datasets.load_dataset(...).save_to_disk(DIR)`, or a .json / .jsonl / "
            ".parquet / .arrow file"
        ) from None
    return ds


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide datasets' progress bars ("Generating train split") for one read."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def load_instruct(
    rows: datasets.Dataset, source: str, fmt: str, group_column: str
) -> _Corpus:
    """Turn rows into conversations (``fmt``: ``"alpaca"`` or ``"chat"``).

    Parameters
    ----------
    rows
        The data set, as :func:`read_hf` gives it.
    source
        What to call it in messages (the path or Hub id).
    fmt
        ``"alpaca"`` or ``"chat"``.
    group_column
        Column naming each row's category (``""``: none).

    Returns
    -------
    _Corpus
        A corpus without labels whose ``data.messages`` hold one conversation per
        row.

    Raises
    ------
    ValueError
        For a source without a response field, a row with an empty response, an
        unknown role, or a missing group column. The message names the row, never
        its text.
    """
    columns = list(rows.column_names)
    if group_column and group_column not in columns:
        raise ValueError(
            f"`data.group_column` = {group_column!r} is not a column of {source}; "
            f"its columns are {columns} (leave it empty when there is none)"
        )
    if fmt == "alpaca":
        to_conversation = _alpaca_reader(columns, source)
    else:
        to_conversation = _chat_reader(columns, source)
    conversations: list[Conversation] = []
    groups: list[str] = []
    for row_no, row in enumerate(rows, start=1):
        conversations.append(to_conversation(row, row_no))
        groups.append(str(row.get(group_column, "")) if group_column else "")
    texts = tuple("\n\n".join(f"{r}: {c}" for r, c in conv) for conv in conversations)
    unlabelled = f"{source} is instruction data ({fmt}: prompts and responses)"
    data = TextDataset(texts, None, tuple(groups), tuple(conversations))
    return _Corpus(data, 0, unlabelled)


def _alpaca_reader(
    columns: Sequence[str], source: str
) -> Callable[[Mapping[str, Any], int], Conversation]:
    """Return a function ``(row, row_no) -> Conversation`` for Alpaca rows."""
    response = next((c for c in RESPONSE_FIELDS if c in columns), None)
    if response is None:
        raise ValueError(
            f"{source} has no response column: instruction data needs `output` "
            f"(Alpaca) or `response` (Dolly) but its columns are {list(columns)}"
        )
    if INSTRUCTION_FIELD not in columns:
        raise ValueError(
            f"{source} has no `instruction` column (its columns are "
            f"{list(columns)}); Alpaca rows are instruction, input, output"
        )
    extra = next((c for c in INPUT_FIELDS if c in columns), None)
    system = SYSTEM_FIELD if SYSTEM_FIELD in columns else None

    def convert(row: Mapping[str, Any], row_no: int) -> Conversation:
        answer = _text(row.get(response))
        if not answer.strip():
            raise ValueError(
                f"{source}, row {row_no}, has an empty response (`{response}`); "
                "fill it or drop the row"
            )
        prompt = _text(row.get(INSTRUCTION_FIELD)).strip()
        more = _text(row.get(extra)).strip() if extra else ""
        prompt = f"{prompt}\n\n{more}" if prompt and more else prompt or more
        if not prompt:
            raise ValueError(
                f"{source}, row {row_no}, has an empty instruction; fill it or drop "
                "the row"
            )
        turns: list[Message] = []
        sys_text = _text(row.get(system)).strip() if system else ""
        if sys_text:
            turns.append(("system", sys_text))
        turns += [("user", prompt), ("assistant", answer)]
        return tuple(turns)

    return convert


def _chat_reader(
    columns: Sequence[str], source: str
) -> Callable[[Mapping[str, Any], int], Conversation]:
    """Return a function ``(row, row_no) -> Conversation`` for chat rows."""
    field = next((c for c in CHAT_FIELDS if c in columns), None)
    if field is None:
        raise ValueError(
            f"`data.format` = 'chat' needs a `messages` (role / content) or "
            f"`conversations` (from / value) column but {source} has "
            f"{list(columns)}; use data.format = 'alpaca' for instruction / output "
            "rows"
        )
    return lambda row, row_no: _chat(row[field], field, source, row_no)


def _chat(value: Any, field: str, source: str, row_no: int) -> Conversation:
    """One ``messages`` / ``conversations`` value as a conversation."""
    where = f"{source}, row {row_no}, `{field}`"
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} should be a non-empty list of turns")
    sharegpt = field == "conversations"
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    names = _SHAREGPT_ROLES if sharegpt else _ROLES
    turns: list[Message] = []
    for k, turn in enumerate(value):
        if not isinstance(turn, Mapping) or role_key not in turn:
            raise ValueError(
                f"{where}, turn {k}, should be an object with `{role_key}` and "
                f"`{text_key}`"
            )
        role = names.get(str(turn[role_key]).strip().lower())
        if role is None:
            raise ValueError(
                f"{where}, turn {k}, has an unknown `{role_key}` (not shown); known "
                f"roles are {sorted(names)}"
            )
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise ValueError(
                f"{where}, turn {k}, should have a text `{text_key}` but has a "
                f"{type(content).__name__} (multimodal parts are not supported)"
            )
        if role == "assistant" and not content.strip():
            raise ValueError(
                f"{where}, turn {k}, is an empty response; fill it or drop the turn"
            )
        turns.append((role, content))
    last = max((k for k, (r, _) in enumerate(turns) if r == "assistant"), default=-1)
    if last < 0:
        raise ValueError(f"{where} has no assistant turn, so nothing to learn")
    return tuple(turns[: last + 1])


def _text(value: object) -> str:
    """Return a cell as text (None: empty)."""
    return "" if value is None else str(value)
