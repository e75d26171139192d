"""Load exports the way a user without lora_flwr does, and write their logits.

    python tests/export_probe.py JOBS.json OUT.safetensors

``JOBS.json`` is a list of ``{"loader", "path", "input_ids", "text"}``: ``loader``
one of ``peft-causal_lm`` / ``peft-seq_cls`` (``peft.AutoPeftModelFor*``) or
``causal_lm`` / ``seq_cls`` (``transformers.AutoModelFor*``); ``input_ids`` a batch
of token ids. Job ``i`` writes ``logits_i``, and with ``text`` also ``ids_i`` (the
directory's tokenizer loaded by ``AutoTokenizer`` on that text). This script never
imports lora_flwr and fails if anything it loads did.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file


def _load(loader: str, path: str) -> torch.nn.Module:
    if loader.startswith("peft-"):
        import peft

        peft_classes = {
            "peft-causal_lm": peft.AutoPeftModelForCausalLM,
            "peft-seq_cls": peft.AutoPeftModelForSequenceClassification,
        }
        return peft_classes[loader].from_pretrained(path).eval()
    import transformers

    classes = {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
    }
    return classes[loader].from_pretrained(path).eval()


def main() -> None:
    jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
    out: dict[str, torch.Tensor] = {}
    for i, job in enumerate(jobs):
        model = _load(job["loader"], job["path"])
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
