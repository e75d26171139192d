"""LoRAAdapter: put LoRA layers into a model and move their tensors in and out.

The seed's ``NewLoRAAdapter`` / ``Apply`` / ``GetWeights`` / ``SetWeights`` /
``Save`` / ``Load`` live here (save/load delegate to :mod:`lora_flwr.lora.io`).

Weight order
------------
:meth:`LoRAAdapter.weight_names` fixes the order of :meth:`LoRAAdapter.get_weights`:
wrapped modules in ``model.named_modules()`` order, each as ``<module>.lora_A.weight``
then ``<module>.lora_B.weight``; then the parameters of ``modules_to_save`` in
``named_parameters()`` order (``<module>.<param>``). The order depends only on the
model architecture and the config, so every client and the server agree on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from lora_flwr.config import LoraConfig
from lora_flwr.lora.layers import LoRALinear, is_conv1d

NDArray = npt.NDArray[np.float32]


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's rule: a str is a full-match regex; a list matches ``x`` or ``*.x``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_names(model: nn.Module) -> list[str]:
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)
    ]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` of ``model`` into its base layer, in place.

    Returns ``model`` with plain ``nn.Linear`` / ``Conv1D`` layers in place of the LoRA
    wrappers: the export a user deploys without this package.
    """
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    # Merge everything before replacing anything: a NaN in one layer then leaves the
    # model as it was instead of half unloaded.
    _merge_all([layer for _, layer in wrapped])
    for name, layer in wrapped:
        layer._unmerged_weight = None  # the backup is no longer needed
        _set_submodule(model, name, layer.base_layer)
    return model


def _merge_all(layers: Sequence[LoRALinear]) -> None:
    """Merge every layer, or none: a failure unmerges the ones merged so far."""
    merged: list[LoRALinear] = []
    try:
        for layer in layers:
            if not layer.merged:
                layer.merge()
                merged.append(layer)
    except Exception:
        for layer in merged:
            layer.unmerge()
        raise


class LoRAAdapter:
    """A LoRA adapter for one model.

    Parameters
    ----------
    config
        LoRA hyper-parameters; defaults are the seed's (r=8, alpha=16, dropout 0.1,
        ``q_proj``/``v_proj``).
    seed
        Seeds the initialisation of every A, so two adapters built with the same seed
        on the same architecture hold identical tensors.

    Examples
    --------
    >>> adapter = LoRAAdapter(LoraConfig(r=8, target_modules=("q_proj",)))
    >>> adapter.apply(model)  # doctest: +SKIP
    >>> arrays = adapter.get_weights()  # doctest: +SKIP
    """

    def __init__(self, config: LoraConfig | None = None, *, seed: int = 0) -> None:
        self.config = config if config is not None else LoraConfig()
        self.seed = seed
        self._model: nn.Module | None = None
        self._layers: dict[str, LoRALinear] = {}
        self._saved: dict[str, nn.Parameter] = {}

    # ------------------------------------------------------------------ apply
    @property
    def model(self) -> nn.Module:
        """The model the adapter was applied to."""
        if self._model is None:
            raise RuntimeError("The adapter is not applied; call `apply(model)` first")
        return self._model

    @property
    def is_applied(self) -> bool:
        """Whether :meth:`apply` has been called (and not undone)."""
        return self._model is not None

    def apply(self, model: nn.Module) -> nn.Module:
        """Wrap every matching linear layer of ``model`` with a :class:`LoRALinear`.

        The model is changed in place and returned. All base parameters are frozen;
        the LoRA factors and the ``modules_to_save`` parameters are trainable.
        Calling it twice raises: LoRA would be added twice.

        Raises
        ------
        ValueError
            If the model already holds LoRA layers, if no module matches
            ``target_modules`` (the message lists the linear layers that exist), if a
            match is not a linear layer, or if a ``modules_to_save`` entry matches
            nothing.
        """
        if self._model is not None:
            raise ValueError("This adapter is already applied to a model")
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ValueError(
                "The model already contains LoRA layers; applying LoRA twice would "
                "stack two adapters. Load a fresh base model."
            )
        cfg = self.config
        targets = [
            (name, module)
            for name, module in model.named_modules()
            if name and _matches(name, cfg.target_modules)
        ]
        if not targets:
            linear = _linear_names(model)
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise ValueError(
                f"`target_modules`={cfg.target_modules!r} matches no module of "
                f"{type(model).__name__}. Linear layer names that exist: {leaves} "
                f"(e.g. {linear[:4]}). Use exact names, '.name' suffixes, or a regex."
            )
        saved = self._find_modules_to_save(model)
        for name, module in targets:
            if not (isinstance(module, nn.Linear) or is_conv1d(module)):
                raise ValueError(
                    f"`target_modules` matched {name!r}, a {type(module).__name__}; "
                    "LoRA supports nn.Linear and Conv1D only. Use a more specific name."
                )
            if any(name == s or name.startswith(s + ".") for s in saved):
                raise ValueError(
                    f"{name!r} is both a LoRA target and inside modules_to_save"
                )
        for p in model.parameters():
            p.requires_grad_(False)
        # A private CPU generator: the same A on every device, and the caller's
        # global RNGs (CPU and CUDA) are left untouched.
        generator = torch.Generator().manual_seed(self.seed)
        for name, module in targets:
            layer = LoRALinear(
                module,
                r=cfg.r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                scaling=cfg.scaling,
                init_lora_weights=cfg.init_lora_weights,
                generator=generator,
            )
            _set_submodule(model, name, layer)
            self._layers[name] = layer
        self._saved = {}
        for prefix in saved:
            for pname, param in model.get_submodule(prefix).named_parameters():
                param.requires_grad_(True)
                self._saved[f"{prefix}.{pname}"] = param
        self._model = model
        return model

    def _find_modules_to_save(self, model: nn.Module) -> list[str]:
        found: list[str] = []
        for entry in self.config.modules_to_save:
            names = [n for n, _ in model.named_modules() if n and _matches(n, (entry,))]
            if not names:
                top = [n for n, _ in model.named_children()]
                raise ValueError(
                    f"`modules_to_save` entry {entry!r} matches no module of "
                    f"{type(model).__name__}; top-level modules: {top}"
                )
            found.extend(names)
        return found

    # ---------------------------------------------------------------- weights
    @property
    def module_names(self) -> list[str]:
        """Names of the wrapped modules, in weight order."""
        self.model  # noqa: B018 - raises if not applied
        return list(self._layers)

    @property
    def layers(self) -> Mapping[str, LoRALinear]:
        """Wrapped modules by name."""
        return dict(self._layers)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` in weight order (live tensors, not copies)."""
        self.model  # noqa: B018 - raises if not applied
        for name, layer in self._layers.items():
            yield f"{name}.lora_A.weight", layer.lora_A.weight
            yield f"{name}.lora_B.weight", layer.lora_B.weight
        yield from self._saved.items()

    def weight_names(self) -> list[str]:
        """Names of :meth:`get_weights`'s arrays, in order."""
        return [name for name, _ in self.named_tensors()]

    def weight_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of :meth:`get_weights`'s arrays, in order."""
        return [tuple(t.shape) for _, t in self.named_tensors()]

    def num_parameters(self) -> int:
        """Count the values that travel: ``r * (in + out)`` per module + saved ones."""
        return sum(t.numel() for _, t in self.named_tensors())

    def parameters(self) -> list[nn.Parameter]:
        """Return the trainable parameters (LoRA factors and ``modules_to_save``)."""
        params = []
        for _, tensor in self.named_tensors():
            assert isinstance(tensor, nn.Parameter)
            params.append(tensor)
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the adapter tensors, in weight order."""
        return {n: t.detach().cpu().clone() for n, t in self.named_tensors()}

    def get_weights(self) -> list[NDArray]:
        """Return the adapter tensors as float32 numpy arrays in weight order."""
        return [
            t.detach().to("cpu", torch.float32).numpy().copy()
            for _, t in self.named_tensors()
        ]

    def set_weights(self, arrays: Sequence[npt.NDArray[np.generic]]) -> None:
        """Overwrite the adapter tensors with ``arrays`` (:meth:`weight_names` order).

        Everything is checked before anything is written, so a rejected call leaves
        the adapter unchanged.

        Raises
        ------
        ValueError
            On a wrong number of arrays, a wrong shape or dtype (names the tensor),
            or a NaN/Inf value.
        """
        names = self.weight_names()
        if len(arrays) != len(names):
            raise ValueError(
                f"Expected {len(names)} adapter arrays ({names[:2]}...), got "
                f"{len(arrays)}; the sender uses a different adapter layout"
            )
        tensors = {}
        for name, array in zip(names, arrays, strict=True):
            if not isinstance(array, np.ndarray):
                raise ValueError(f"{name}: expected a numpy array, got {type(array)}")
            if array.dtype != np.float32:
                raise ValueError(
                    f"{name}: dtype {array.dtype} but the adapter holds float32"
                )
            # A copy: arrays decoded from a message may be read-only buffers.
            tensors[name] = torch.from_numpy(np.array(array, copy=True, order="C"))
        self.load_state_dict(tensors)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite adapter tensors by name, all-or-nothing.

        Raises
        ------
        ValueError
            On missing or unexpected keys, a shape mismatch, a non-floating dtype or a
            non-finite value; the message names the tensor.
        """
        expected = dict(self.named_tensors())
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(
                f"Adapter keys do not match the model: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
                f"({len(unexpected)}). Was it saved for another model or config?"
            )
        for name, target in expected.items():
            value = state[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{name}: shape {tuple(value.shape)} but the model expects "
                    f"{tuple(target.shape)} (check r and the base model)"
                )
            if not value.is_floating_point():
                raise ValueError(f"{name}: dtype {value.dtype} is not floating point")
            # Checked after the cast: a finite float64 may overflow float32.
            if not torch.isfinite(value.to(target.dtype)).all():
                raise ValueError(f"{name}: contains NaN or Inf values")
        with torch.no_grad():
            for name, target in expected.items():
                target.copy_(state[name].to(target.device, target.dtype))

    @torch.no_grad()
    def reset(self, seed: int | None = None) -> None:
        """Re-initialise every A (seeded) and zero every B.

        ``modules_to_save`` parameters are left as they are.
        """
        self.model  # noqa: B018 - raises if not applied
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        for layer in self._layers.values():
            layer.reset_lora_parameters(
                self.config.init_lora_weights, generator=generator
            )

    # ------------------------------------------------------------------ merge
    def merge(self) -> None:
        """Fold ``scaling * B @ A`` into every base weight (in place, all or none)."""
        _merge_all(list(self._layers.values()))

    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the base weights exactly."""
        for layer in self._layers.values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge, then replace every LoRA layer by its plain base layer.

        Returns the plain model (no LoRA modules) and detaches the adapter from it.
        """
        model = merge_and_unload(self.model)
        self._model = None
        self._layers = {}
        self._saved = {}
        return model

    # -------------------------------------------------------------------- I/O
    def save(self, path: str | Path, *, format: str = "peft") -> Path:
        """Save to a PEFT directory (``format="peft"``) or a JSON file (``"json"``)."""
        from lora_flwr.lora import io

        if format == "peft":
            return io.save_peft(self, path)
        if format == "json":
            return io.save_json(self, path)
        raise ValueError(f"`format` should be 'peft' or 'json' but is {format!r}")

    def load(self, path: str | Path) -> None:
        """Load tensors from a PEFT directory or a JSON file (detected by suffix)."""
        from lora_flwr.lora import io

        path = Path(path)
        if path.suffix == ".json" and not path.is_dir():
            io.load_json(self, path)
        else:
            io.load_peft(self, path)
