"""AdamW and SGD for the CPU, without ``torch.optim``'s import of ``torch._dynamo``.

Every ``torch.optim`` optimizer imports ``torch._dynamo`` when it is built and when
it steps (its methods are wrapped to be skipped by ``torch.compile``): ~3 s in a
fresh process, which a deployed node pays for every training message. This class
does the arithmetic of ``torch.optim.AdamW``'s single-tensor path, the one torch
uses for CPU tensors, operation for operation (Loshchilov & Hutter 2019: decoupled
weight decay, then Adam's bias-corrected moments), so on the CPU both give
bit-identical parameters (tests/unit/test_trainer.py checks it). :class:`SGD`
does the same for ``torch.optim.SGD`` (momentum, coupled weight decay).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class _Optimizer:
    """What the trainer uses of ``torch.optim.Optimizer``: groups and zero_grad."""

    param_groups: list[dict[str, Any]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients (set them to None, or to zero)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()


class AdamW(_Optimizer):
    """Decoupled-weight-decay Adam over one parameter group.

    Parameters
    ----------
    params
        The parameters to update (those with a gradient are stepped).
    lr, betas, eps, weight_decay
        As ``torch.optim.AdamW``; ``param_groups[0]["lr"]`` may be changed
        between steps (a learning-rate schedule).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        self.param_groups: list[dict[str, Any]] = [
            {
                "params": list(params),
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
            }
        ]
        self.state: dict[torch.nn.Parameter, dict[str, Any]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient."""
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = group["betas"]
            eps, decay = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state.get(p)
                if state is None:
                    state = {
                        "step": 0.0,
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }
                    self.state[p] = state
                state["step"] += 1.0
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if decay != 0:
                    p.mul_(1 - lr * decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)


class SGD(_Optimizer):
    """Stochastic gradient descent with momentum over one parameter group.

    As ``torch.optim.SGD`` (no dampening, no Nesterov): ``g = grad + wd * p``,
    ``buf = momentum * buf + g`` (``buf = g`` on the first step), ``p -= lr * buf``.
    Unlike Adam, a step is proportional to the gradient, so a client whose loss is
    already small moves little (what FedLC's and FedRS's local losses rely on).

    Parameters
    ----------
    params
        The parameters to update (those with a gradient are stepped).
    lr, momentum, weight_decay
        As ``torch.optim.SGD``; ``param_groups[0]["lr"]`` may change between steps.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float = 1e-2,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.param_groups: list[dict[str, Any]] = [
            {
                "params": list(params),
                "lr": lr,
                "momentum": momentum,
                "weight_decay": weight_decay,
            }
        ]
        self.state: dict[torch.nn.Parameter, dict[str, Any]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient."""
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), float(group["momentum"])
            decay = float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if decay != 0:
                    grad = grad.add(p, alpha=decay)
                if momentum != 0:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = torch.clone(grad).detach()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(grad)
                    grad = buf
                p.add_(grad, alpha=-lr)
