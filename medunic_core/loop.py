"""The one local training loop: centralized VLP, a site's VLP round, and MLM (central and at
a site) all run :func:`train_local`.

The caller brings the batches, a ``loss_fn`` (a batch -> its named loss parts and its
number of examples) and a :class:`~medunic_core.optim.Stepper`; the loop does the rest the
same way for all of them: stop at the first non-finite loss, backward with accumulation,
an optimizer step every ``accum_steps`` batches, the per-step and overall means of every
loss part, a progress bar, and an ``on_step`` hook after each step, where checkpointing,
logging and early stops live.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from medunic_core.losses import check_finite_loss
from medunic_core.optim import Stepper

LossFn = Callable[[Any], tuple[dict[str, torch.Tensor], int]]

# Steps a fresh model's first kernels and allocations take: left out of ``steady_pairs_per_s``
# (as benchmarks/train_throughput.py leaves them out of its timing), so that a round's figure
# splits into a per-round start-up cost and the loop's own speed.
WARMUP_STEPS = 3


@dataclass
class StepRecord:
    """One optimizer step: its number on the schedule, the mean of each loss part over its
    batches, its learning rate and gradient norm, and the examples it saw."""

    step: int
    parts: dict[str, float]
    lr: float
    grad_norm: float
    examples: int


@dataclass
class LocalResult:
    """What :func:`train_local` did: steps, examples, the mean of each loss part over all
    batches plus the last step's ``lr``, the loop's wall time (``seconds``, data included)
    and ``pairs_per_s``, ``steady_pairs_per_s`` after the first :data:`WARMUP_STEPS` steps
    (when there are more), and one :class:`StepRecord` per step."""

    steps: int
    num_examples: int
    metrics: dict[str, float]
    history: list[StepRecord] = field(default_factory=list)


def train_local(
    batches: Iterable[Any], loss_fn: LossFn, stepper: Stepper, steps: int, *, first_step: int = 0,
    on_step: Optional[Callable[[StepRecord], bool]] = None, where: str = "training", progress: bool = False,
) -> LocalResult:
    """Take ``steps`` optimizer steps (numbered from ``first_step`` + 1) over ``batches``.

    ``on_step`` runs after every step; returning True ends the loop there (a preemption, a
    checkpoint-and-stop). Raises DivergenceError at the first non-finite loss, before it
    reaches the weights.
    """
    totals: dict[str, float] = {}
    group: dict[str, float] = {}
    history: list[StepRecord] = []
    seen = group_seen = micro = done = 0
    lr = stepper.lr
    bar = tqdm(total=steps, desc=where, disable=not progress)
    start = warm = time.perf_counter()
    warm_seen = 0
    for batch in batches if steps > 0 else ():
        parts, n = loss_fn(batch)
        check_finite_loss(parts, f"{where}: step {first_step + done + 1}")
        stepper.backward(parts["loss"])
        for k, v in parts.items():
            value = float(v.detach())
            totals[k] = totals.get(k, 0.0) + value
            group[k] = group.get(k, 0.0) + value / stepper.accum_steps
        seen, group_seen, micro = seen + n, group_seen + n, micro + 1
        if micro % stepper.accum_steps:
            continue
        lr = stepper.lr
        norm = stepper.step()
        done += 1
        bar.update(1)
        record = StepRecord(first_step + done, group, lr, norm, group_seen)
        history.append(record)
        group, group_seen = {}, 0
        if done == WARMUP_STEPS:
            warm, warm_seen = time.perf_counter(), seen
        if (on_step is not None and on_step(record)) or done >= steps:
            break  # right after the step: a stream's position is then the next batch to train on
    bar.close()
    end = time.perf_counter()
    seconds = end - start
    metrics = {k: v / max(micro, 1) for k, v in totals.items()}
    metrics.update(lr=lr, seconds=seconds, pairs_per_s=seen / max(seconds, 1e-9))
    if done > WARMUP_STEPS:
        metrics["steady_pairs_per_s"] = (seen - warm_seen) / max(end - warm, 1e-9)
    return LocalResult(done, seen, metrics, history)
