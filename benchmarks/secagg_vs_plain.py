"""SecAgg+ against the plain run: one round, the same seeds, the same clients.

    PYTHONPATH=. python benchmarks/secagg_vs_plain.py [--out DIR]

For the ``honest`` and ``leave`` probes of ``reliability_probes.py`` (smoke config at
3 clients; in ``leave`` partition 2 fails every fit) it runs one round plain and one
through SecAgg+ and prints the largest difference between the two global adapters,
the quantisation bound, and both held-out losses, as a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reliability_probes as rp  # noqa: E402

from lora_flwr.fl.server_app import SECAGG_LEVELS  # noqa: E402
from lora_flwr.server.record import TEST_LOSS  # noqa: E402

SIZES = (97, 97, 96)  # training examples of the smoke config's 3 partitions


def bound(counts: list[int], peak: float) -> float:
    """Largest quantisation error of the SecAgg+ weighted mean (see the test)."""
    clip = float(rp.SECAGG["secagg"].get("clip", 2.0))
    weight_sum = sum(counts) / float(rp.SECAGG["secagg"]["max_weight"])
    k = len(counts)
    step = 2 * clip / SECAGG_LEVELS
    return (k * step + 2 * k * peak / SECAGG_LEVELS) / weight_sum + 2.0**-23 * peak


def main() -> None:
    """Run both probes plain and under SecAgg+; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="secagg-"))
    print("| probe | max abs difference | bound | loss plain | loss SecAgg+ |")
    print("|---|---|---|---|---|")
    for probe, counts in (("honest", list(SIZES)), ("leave", list(SIZES[:2]))):
        runs = {}
        for secagg in (False, True):
            sets = {"fed": {"num_rounds": 1}, **(rp.SECAGG if secagg else {})}
            runs[secagg] = rp.run_probe(
                out,
                probe,
                guards=False,
                sets=sets,
                tag="secagg" if secagg else "plain",
            )
        a, b = (
            load_file(
                str(Path(runs[s]["run_dir"]) / "adapter/adapter_model.safetensors")
            )
            for s in (False, True)
        )
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        peak = max(float(np.abs(v).max()) for v in a.values())
        print(
            f"| {probe} | {diff:.2g} (values up to {peak:.2f}) | "
            f"{bound(counts, peak):.2g} | {runs[False][TEST_LOSS]:.6f} | "
            f"{runs[True][TEST_LOSS]:.6f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
