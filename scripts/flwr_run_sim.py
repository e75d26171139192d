"""Run the Flower app under ``flwr run`` in simulation, isolated and cleaned up.

    python scripts/flwr_run_sim.py [--config configs/smoke.toml] [--num-supernodes 2]
                                   [--set fed.num_rounds=3 ...] [--output-dir DIR]

What ``flwr run .`` does on a workstation, made safe for tests and CI:

* a private ``FLWR_HOME`` whose ``config.toml`` has one connection ``local`` with
  ``address = ":local:"``: ``flwr run`` uses the local SuperLink in simulation
  mode (the simulation runtime runs the SuperNodes on Ray);
* that SuperLink listens on free ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
  ``FLWR_LOCAL_CONTROL_API_PORT``), so it can never reuse another user's SuperLink
  on the default port 39091;
* it is started here, with the options ``flwr run`` would start it with, before
  ``flwr run``: flwr gives the one it starts 15 s to answer (fixed in flwr 1.42),
  which a loaded machine can exceed; finding it up, ``flwr run`` uses it;
* ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (no ``uv sync``; works offline);
* the experiment goes in as ``--run-config <flat toml>``, with an absolute
  ``output_dir``, and the simulation size as
  ``--federation-config "num-supernodes=N client-resources-num-cpus=C"``;
* success is read from ``flwr ls --format json`` (``flwr run`` exits 0 on failure);
* the SuperLink and all its helpers are stopped by PID at the end.

Results go to ``<output_dir>/<name>/``; logs, run config, runs.json and pids.json to
``<output_dir>/<name>/deploy/``. The work is done by the ``lora_flwr.deploy``
package (``lora_flwr/deploy/local_sim.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lora_flwr.deploy.errors import DeployError
from lora_flwr.deploy.local_sim import simulate_from_options
from lora_flwr.deploy.options import exit_code, parse_args

# Errors reported as one line: exit 2 for a config, data, model or run folder
# refused before any process starts (BadInput), else 1; anything else is a bug.
ERRORS = (DeployError, ValueError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    options = parse_args(argv, __doc__)
    return exit_code(lambda: simulate_from_options(options), ERRORS)


if __name__ == "__main__":
    sys.exit(main())
