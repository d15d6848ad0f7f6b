"""Optimisation shared by every trainer (centralized VLP, a site's round, MLM central and
at a site): seeding, AdamW, the warm-up + cosine schedule, and the optimizer step
(accumulation, AMP grad scaling, clipping).

A federated round is a slice of the centralized schedule: a site's :class:`Stepper` starts
at ``first_step`` = (round - 1) x local steps of a schedule that spans rounds x local
steps, so that a federation and a centralized run of the same budget see the same
learning rates.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Optional

import numpy as np
import torch

from medunic_core.models import trainable_parameters

ROUND_SEED_STRIDE = 7919  # a prime: round r of a site draws from seed + stride * r


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def round_seed(seed: int, server_round: int) -> int:
    """The data-order seed of one federated round: distinct per round, the same at every run."""
    return seed + ROUND_SEED_STRIDE * server_round


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """lr multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; biases and norm scales get no weight decay."""
    decay, no_decay = [], []
    for _, p in trainable_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


class Stepper:
    """The optimizer step every trainer takes, once per ``accum_steps`` backward passes.

    ``backward`` scales the loss (by 1 / accum_steps, and by the AMP grad scaler on CUDA);
    ``step`` unscales, clips the gradient norm to ``grad_clip`` (None: no clipping, e.g.
    under DP-SGD, which clips per sample), steps the optimizer and the schedule, and
    returns the gradient norm. The learning rate of step ``s`` is ``lr x factor(first_step + s)``.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, factor: Callable[[int], float],
        grad_clip: Optional[float], accum_steps: int = 1, first_step: int = 0, amp: bool = False,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.grad_clip, self.accum_steps = grad_clip, accum_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(first_step + s))
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return float(self.scheduler.get_last_lr()[0])

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accum_steps).backward()

    def step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                if self.grad_clip is not None else torch.tensor(float("nan")))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_optimizer_state(state)
        self.scheduler.load_state_dict(state["scheduler"])

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """The optimizer's moments and the grad scaler, not the schedule: a site's next round
        has its own place on the schedule (``first_step``), the rate the saved state holds."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
