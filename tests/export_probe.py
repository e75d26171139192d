"""Load exports the way a user without lora_flwr does, and write their logits.

    python tests/export_probe.py JOBS.json OUT.safetensors

``JOBS.json`` is a list of ``{"loader", "path", "input_ids", "text", "kwargs"}``:
``loader`` is ``peft-causal_lm`` / ``peft-seq_cls`` (``peft.AutoPeftModelFor*``) or
``causal_lm`` / ``seq_cls`` (``transformers.AutoModelFor*``), ``input_ids`` a batch
of token ids, ``kwargs`` go to ``from_pretrained``. Job ``i`` writes ``logits_i``,
and with ``text`` also ``ids_i`` (the directory's tokenizer, loaded by
``AutoTokenizer``, on that text). This script never imports lora_flwr and fails if
anything it loads did. Tests call :func:`run_probe`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def run_probe(jobs: Sequence[dict[str, Any]], workdir: Path) -> dict[str, torch.Tensor]:
    """Run this script on ``jobs`` in a fresh, isolated interpreter; its tensors.

    ``-I`` and no ``PYTHONPATH``: the checkout is not on the path, and the working
    directory is ``workdir``.
    """
    jobs_file, out = workdir / "jobs.json", workdir / "probe.safetensors"
    jobs_file.write_text(json.dumps(list(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-I", __file__, str(jobs_file), str(out)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out))


def _load(loader: str, path: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    if loader.startswith("peft-"):
        import peft

        peft_classes = {
            "peft-causal_lm": peft.AutoPeftModelForCausalLM,
            "peft-seq_cls": peft.AutoPeftModelForSequenceClassification,
        }
        return peft_classes[loader].from_pretrained(path, **kwargs).eval()
    import transformers

    classes = {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
    }
    return classes[loader].from_pretrained(path, **kwargs).eval()


def main() -> None:
    jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
    out: dict[str, torch.Tensor] = {}
    for i, job in enumerate(jobs):
        model = _load(job["loader"], job["path"], job.get("kwargs", {}))
        ids = torch.tensor(job["input_ids"], dtype=torch.long)
        with torch.no_grad():
            out[f"logits_{i}"] = model(input_ids=ids).logits.float().contiguous()
        if job.get("text") is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(job["path"])
            out[f"ids_{i}"] = torch.tensor(tokenizer(job["text"]).input_ids)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "lora_flwr")
    if leaked:
        raise SystemExit(f"lora_flwr was imported: {leaked}")
    save_file(out, sys.argv[2])


if __name__ == "__main__":
    main()
