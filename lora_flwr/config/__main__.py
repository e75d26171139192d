"""``python -m lora_flwr.config --app-config``: see :mod:`.app_config`."""

from lora_flwr.config.app_config import main

raise SystemExit(main())
