"""flwr-clientapp imports the client app for every message: it must stay light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "safetensors", "tokenizers", "flwr_datasets")


def _modules_after(statement: str) -> dict[str, bool]:
    """Run ``statement`` in a fresh interpreter; which heavy modules got imported."""
    code = (
        f"import json, sys\n{statement}\n"
        f"print(json.dumps({{m: m in sys.modules for m in {list(HEAVY)!r}}}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    result: dict[str, bool] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_importing_the_client_app_loads_no_model_machinery() -> None:
    # Execute
    loaded = _modules_after("import lora_flwr.fl.client_app")

    # Assert
    assert loaded == dict.fromkeys(HEAVY, False)


def test_a_client_answers_get_properties_without_torch() -> None:
    # Prepare: the handshake every round's sampling starts with
    statement = (
        "from flwr.common import Context, RecordDict\n"
        "from lora_flwr.config import ExperimentConfig\n"
        "from lora_flwr.fl.client import make_client_fn\n"
        "ctx = Context(run_id=1, node_id=1, node_config={'partition-id': 3, "
        "'num-partitions': 4}, state=RecordDict(), run_config={})\n"
        "client = make_client_fn(ExperimentConfig())(ctx)\n"
        "from flwr.common import GetPropertiesIns\n"
        "res = client.get_properties(GetPropertiesIns(config={}))\n"
        "assert res.properties == {'partition_id': 3}, res.properties"
    )

    # Execute
    loaded = _modules_after(statement)

    # Assert
    assert loaded["torch"] is False
    assert loaded["transformers"] is False
