"""Where a model's weights live: the name PEFT and transformers load it by.

An exported adapter names its base in ``adapter_config.json``
(``base_model_name_or_path``), and ``peft.AutoPeftModel*.from_pretrained`` loads the
base from that string with transformers. The project's short names (``minilm``,
``smollm2-135m``) mean nothing to them, so exports name what the project loaded:

=======================  ==============================================================
``model.name``           ``base_model_name_or_path``
=======================  ==============================================================
``minilm``               the unpacked HF directory of the pinned release (absolute)
``smollm2-135m``         the cached safetensors conversion of its GGUF file (absolute)
``tiny-*``               the name itself: these exist only in code, there is no base
                         to point at (export the merged model instead)
a local directory        its absolute path
anything else            as given: a Hugging Face Hub id
=======================  ==============================================================

The built-ins' directories live in the asset cache (``$LORA_FLWR_CACHE``), so an
adapter exported on one machine names a path of that machine.
"""

from __future__ import annotations

from pathlib import Path

from lora_flwr.assets import fetch_asset
from lora_flwr.models.loading import BUILTIN_MODELS
from lora_flwr.models.smollm2 import _smollm2_hf_dir

# Built-ins built from a directory of the asset cache (the others exist only in
# code): name -> function returning that directory, fetching it if needed.
_BUILTIN_DIRS = {
    "minilm": lambda: fetch_asset("minilm"),
    "smollm2-135m": lambda: _smollm2_hf_dir(),
}
TINY_MODELS: tuple[str, ...] = tuple(
    n for n in BUILTIN_MODELS if n not in _BUILTIN_DIRS
)


def base_model_source(name: str) -> str:
    """Return what PEFT and transformers load the base model ``name`` by.

    Parameters
    ----------
    name
        A ``model.name``: a built-in, a local directory or a Hub id. A built-in
        directory is fetched (or converted) if the cache lacks it.

    Returns
    -------
    str
        An absolute directory path (built-ins with weights on disk, local
        directories), the Hub id as given, or a tiny model's name unchanged.
    """
    if name in _BUILTIN_DIRS:
        return str(_BUILTIN_DIRS[name]().resolve())
    if name in TINY_MODELS:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name
