"""The rungs of the search: ASHA's grace period, reduction factor and top rung (``max_t``).

Sized from the proxy and the full-training budget (``search.max_epochs``/``grace_period``/
``reduction_factor`` left null): a trial that reaches the top rung has seen
``search.top_rung_fraction`` of the utterances full training will see (``train.epochs`` over
the pool's training split), so the incumbent is past its blank-only phase there and the top
rung ranks what full training would. Utterances seen, not optimizer steps: the learning rate
follows the global batch (linear scaling rule), so DDP's larger batch takes fewer, larger
steps over the same data. With ``proxy_train`` and ``pool_train`` utterances::

    max_t = max(2, ⌈top_rung_fraction × train.epochs × pool_train / proxy_train⌉)
    reduction_factor = 2,  grace_period = max(1, round(max_t / reduction_factor²))   # three rungs

A trial is full training compressed to ``max_t`` proxy epochs: its warm-up is scaled by
``warmup_scale`` (its optimizer steps at the top rung over full training's, ``full_steps =
train.epochs × ⌊⌈pool_train / batch⌉ / train.num_workers⌋`` per DDP rank), so warm-up takes
the same share of the trial as it will of full training. Trials checkpoint only at the rungs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import SearchConfig, TrainConfig

TIME_ATTR = "epoch"


@dataclass(frozen=True)
class RungPlan:
    grace_period: int
    reduction_factor: int
    max_t: int
    milestones: tuple[int, ...]  # ASHA's rungs below the top, in epochs
    warmup_scale: float  # a trial's warm-up steps = round(warmup_steps × this)
    sized: bool  # True when any of the three was sized rather than configured
    proxy_train: int
    pool_train: int
    proxy_steps_per_epoch: int
    full_steps: int

    @property
    def rungs(self) -> tuple[int, ...]:
        """Every rung a trial can stop at, the top one included (where trials checkpoint)."""
        return tuple(sorted({*self.milestones, self.max_t}))

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "rungs": list(self.rungs), "milestones": list(self.milestones)}


def asha_milestones(grace: int, rf: int, max_t: int) -> tuple[int, ...]:
    """The milestones of Ray's ASHA bracket (``_Bracket(grace, max_t, rf, s=0)``), ascending."""
    n = int(np.log(max_t / grace) / np.log(rf) + 1)
    return tuple(sorted(int(grace * rf**k) for k in range(n)))


def plan_rungs(s: SearchConfig, train: TrainConfig, *, proxy_train: int, pool_train: int, batch_size: int) -> RungPlan:
    """The rungs for a proxy of ``proxy_train`` training utterances and a pool of ``pool_train``."""
    batch = max(1, batch_size)
    proxy_steps = max(1, math.ceil(proxy_train / batch))
    full_steps = train.epochs * max(1, math.ceil(pool_train / batch) // train.num_workers)
    sized_max = max(2, math.ceil(s.top_rung_fraction * train.epochs * pool_train / max(1, proxy_train)))
    max_t = s.max_epochs or sized_max
    rf = s.reduction_factor or 2
    grace = s.grace_period or max(1, round(max_t / rf**2))
    grace = min(grace, max_t)
    return RungPlan(
        grace_period=grace, reduction_factor=rf, max_t=max_t, milestones=asha_milestones(grace, rf, max_t),
        warmup_scale=round(min(1.0, max_t * proxy_steps / full_steps), 4),
        sized=None in (s.max_epochs, s.grace_period, s.reduction_factor),
        proxy_train=proxy_train, pool_train=pool_train, proxy_steps_per_epoch=proxy_steps, full_steps=full_steps,
    )

