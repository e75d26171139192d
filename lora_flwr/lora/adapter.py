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

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from lora_flwr.config import LoraConfig
from lora_flwr.lora import io
from lora_flwr.lora.layers import LoRALinear, is_conv1d
from lora_flwr.lora.model_ops import (
    linear_names,
    matches,
    merge_all,
    merge_and_unload,
    set_submodule,
)
from lora_flwr.validation import check_arrays

# Largest magnitude a loaded adapter value may have (files only; trained LoRA
# factors and heads are orders of magnitude smaller).
MAX_ABS_VALUE = 1e4

NDArray = npt.NDArray[np.float32]


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
            if name and matches(name, cfg.target_modules)
        ]
        if not targets:
            linear = linear_names(model)
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
            set_submodule(model, name, layer)
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
            names = [n for n, _ in model.named_modules() if n and matches(n, (entry,))]
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

    def head_layer(self, num_labels: int) -> tuple[str, nn.Linear]:
        """Return the output layer of the saved head: ``(name, module)``.

        The one ``nn.Linear`` inside ``modules_to_save`` with ``num_labels``
        outputs and a bias (``classifier``; a RoBERTa-style head's
        ``classifier.out_proj``).

        Raises
        ------
        ValueError
            If there is not exactly one such layer.
        """
        model = self.model
        prefixes = sorted({n.rsplit(".", 1)[0] for n in self._saved})
        found = [
            (name, module)
            for name, module in model.named_modules()
            if any(name == p or name.startswith(p + ".") for p in prefixes)
            and isinstance(module, nn.Linear)
            and module.out_features == num_labels
            and module.bias is not None
        ]
        if len(found) != 1:
            raise ValueError(
                f"expected one linear layer with {num_labels} outputs and a bias "
                f"inside modules_to_save {prefixes}, found {[n for n, _ in found]}"
            )
        return found[0]

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

    def weight_shape(self, name: str, rank: int | None = None) -> tuple[int, ...]:
        """Shape of weight ``name`` at ``rank`` (default: the allocated rank)."""
        shape = tuple(dict(self.named_tensors())[name].shape)
        if rank is None:
            return shape
        if name.endswith(".lora_A.weight"):
            return (rank, shape[1])
        if name.endswith(".lora_B.weight"):
            return (shape[0], rank)
        return shape

    def get_named_weights(self, rank: int | None = None) -> dict[str, NDArray]:
        """Return every adapter tensor by name, A and B cut to ``rank``."""
        out: dict[str, NDArray] = {}
        for name, tensor in self.named_tensors():
            array = tensor.detach().to("cpu", torch.float32).numpy()
            if rank is not None and name.endswith(".lora_A.weight"):
                array = array[:rank]
            elif rank is not None and name.endswith(".lora_B.weight"):
                array = array[:, :rank]
            out[name] = np.ascontiguousarray(array).copy()
        return out

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
        self.set_named_weights(dict(zip(names, arrays, strict=True)))

    def set_named_weights(
        self, arrays: Mapping[str, object], rank: int | None = None
    ) -> None:
        """Overwrite every adapter tensor by name, all-or-nothing.

        With ``rank`` below the allocated rank, A arrives as ``(rank, in)`` and B as
        ``(out, rank)``; they fill the first rows/columns, the rest is zeroed and
        every layer runs at that rank (:meth:`set_rank`).

        Raises
        ------
        ValueError
            From :func:`lora_flwr.validation.check_arrays`: wrong names, a
            non-float32 dtype, a wrong shape or a NaN/Inf value, naming the tensor.
        """
        rank = self.rank if rank is None else rank
        if not 1 <= rank <= self.rank:
            raise ValueError(
                f"`rank` should be in [1, r={self.rank}] but the value passed is {rank}"
            )
        expected = {n: self.weight_shape(n, rank) for n in self.weight_names()}
        check_arrays(arrays, expected, dtype=np.float32, what="adapter weights")
        self.set_rank(rank)
        with torch.no_grad():
            for name, target in self.named_tensors():
                array = arrays[name]
                assert isinstance(array, np.ndarray)
                # A copy: arrays decoded from a message may be read-only buffers.
                value = torch.from_numpy(np.array(array, copy=True, order="C"))
                value = value.to(target.device, target.dtype)
                if name.endswith(".lora_A.weight"):
                    target[:rank].copy_(value)
                elif name.endswith(".lora_B.weight"):
                    target[:, :rank].copy_(value)
                else:
                    target.copy_(value)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite adapter tensors by name, all-or-nothing.

        Values of any floating dtype are accepted and cast to float32 first.

        Raises
        ------
        ValueError
            On missing or unexpected keys, a shape mismatch, a non-floating dtype, a
            non-finite value or one above ``MAX_ABS_VALUE`` in magnitude; the message
            names the tensor.
        """
        arrays: dict[str, object] = {}
        for name, value in state.items():
            if not value.is_floating_point():
                raise ValueError(f"{name}: dtype {value.dtype} is not floating point")
            # Checked after the cast: a finite float64 may overflow float32.
            array = value.detach().to("cpu", torch.float32).numpy()
            finite = bool(np.isfinite(array).all())  # else check_arrays names it
            peak = float(np.abs(array).max()) if array.size and finite else 0.0
            if peak > MAX_ABS_VALUE:
                raise ValueError(
                    f"{name}: a value of magnitude {peak:.3g} exceeds "
                    f"{MAX_ABS_VALUE:g}; trained LoRA tensors stay far below that, "
                    "so the file is corrupt or hostile"
                )
            arrays[name] = array
        try:
            self.set_named_weights(arrays)
        except ValueError as exc:
            raise ValueError(
                f"{exc} (was the adapter saved for another model or config? check r "
                "and the base model)"
            ) from None

    # ---------------------------------------------------------- rank & groups
    @property
    def rank(self) -> int:
        """Allocated rank ``r`` (the largest rank a client may run at)."""
        return self.config.r

    @property
    def active_rank(self) -> int:
        """Rank the layers run at now (:meth:`set_rank`)."""
        ranks = {layer.active_r for layer in self._layers.values()}
        return ranks.pop() if len(ranks) == 1 else self.rank

    def set_rank(self, rank: int) -> None:
        """Run every layer at ``rank`` <= ``r``; zero A rows / B columns beyond it."""
        for layer in self._layers.values():
            layer.set_rank(rank)

    def set_trainable(
        self, *, lora_A: bool = True, lora_B: bool = True, saved: bool = True
    ) -> None:
        """Choose which factor groups train (``requires_grad``); the rest freeze."""
        for name, tensor in self.named_tensors():
            if name.endswith(".lora_A.weight"):
                flag = lora_A
            elif name.endswith(".lora_B.weight"):
                flag = lora_B
            else:
                flag = saved
            tensor.requires_grad_(flag)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Adapter parameters that currently train (``requires_grad``)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------- base deltas
    def set_base_delta(self, deltas: Mapping[str, object] | None) -> None:
        """Set each wrapped layer's frozen weight to ``W0 + delta``, all-or-nothing.

        ``deltas`` maps module names to float32 arrays ``(out, in)`` (the layout of
        ``B @ A``, whatever the base layer's); modules left out get ``W0``. None
        restores every ``W0``. This is how a merged global update (FLoRA,
        FedEx-LoRA) becomes part of the frozen model: the adapter then restarts
        on top of it, and :meth:`merge` / :meth:`merge_and_unload` include it.

        Raises
        ------
        ValueError
            On an unknown module, a wrong shape or dtype, or a NaN/Inf value.
        """
        deltas = {} if deltas is None else deltas
        unknown = [m for m in deltas if m not in self._layers]
        if unknown:
            raise ValueError(
                f"base delta for unknown modules {unknown[:3]}; the adapter wraps "
                f"{self.module_names[:3]}..."
            )
        expected = {
            m: (self._layers[m].out_features, self._layers[m].in_features)
            for m in deltas
        }
        check_arrays(deltas, expected, dtype=np.float32, what="base delta")
        for name, layer in self._layers.items():
            value = deltas.get(name)
            if value is None:
                layer.set_base_delta(None)
            else:
                assert isinstance(value, np.ndarray)
                layer.set_base_delta(torch.from_numpy(np.ascontiguousarray(value)))

    @property
    def has_base_delta(self) -> bool:
        """Whether any frozen weight currently holds a base delta."""
        return any(layer.has_base_delta for layer in self._layers.values())

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
        merge_all(list(self._layers.values()))

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
        if format == "peft":
            return io.save_peft(self, path)
        if format == "json":
            return io.save_json(self, path)
        raise ValueError(f"`format` should be 'peft' or 'json' but is {format!r}")

    def load(self, path: str | Path) -> None:
        """Load tensors from a PEFT directory or a JSON file (detected by suffix)."""
        path = Path(path)
        if path.suffix == ".json" and not path.is_dir():
            io.load_json(self, path)
        else:
            io.load_peft(self, path)


def load_adapter(model: nn.Module, path: str | Path, *, seed: int = 0) -> LoRAAdapter:
    """Build an adapter from a PEFT directory's config, apply it to ``model`` and load.

    ``modules_to_save`` entries that name no module of ``model`` are dropped, as PEFT
    does: its sequence-classification saves list both ``classifier`` and ``score``.
    Their weights, if the file holds any, are still rejected as unexpected keys.
    """
    config = io.read_peft_config(path)
    present = tuple(
        entry
        for entry in config.modules_to_save
        if any(name and matches(name, (entry,)) for name, _ in model.named_modules())
    )
    config = dataclasses.replace(config, modules_to_save=present)
    adapter = LoRAAdapter(config, seed=seed)
    adapter.apply(model)
    io.load_peft(adapter, path)
    return adapter
