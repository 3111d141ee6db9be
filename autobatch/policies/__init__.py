"""Batch-size policies: each proposes the next global batch size from what the loop measured.

The training loop builds a :class:`PolicyContext` every ``decide_every`` optimizer steps and
calls :meth:`BatchSizePolicy.propose`; it also multiplies the LR by
:meth:`BatchSizePolicy.lr_factor` (on top of the LR scaling rule) at every step. All batch
sizes here are *global* (examples per optimizer step, all micro-batches together). One module
per policy, named as in :data:`autobatch.registry.POLICIES`:

- :mod:`~autobatch.policies.budget` (the default): ``gns`` under a budget-aware bound, the
  largest batch the (guarded) LR factor can follow when samples bind the run.
- :mod:`~autobatch.policies.guard`: the loss-spike guard that lowers the allowed LR factor.
- :mod:`~autobatch.policies.gns`: follow ``noise_multiplier x B_simple``, the smoothed
  gradient noise scale (McCandlish et al. 2018), at most ``max_growth`` times per decision.
- :mod:`~autobatch.policies.goodput`: maximise measured throughput x statistical efficiency
  (Pollux, Qiao et al., OSDI 2021); its model is plain functions.
- :mod:`~autobatch.policies.ramp`: grow the batch where a step schedule would decay the LR
  (Smith et al. 2017), and decay the LR only once the batch is capped.
- :mod:`~autobatch.policies.schedule`: grow the batch where the user's LR scheduler decays
  the LR (Seesaw for Adam, Smith et al. for SGD), never past the noise scale.
- :mod:`~autobatch.policies.fixed`: keep the initial batch; decay the LR at the milestones.
- :mod:`~autobatch.policies.measure`: keep the initial batch and the LR; only measure the noise
  scale (a user's fixed-B run, watched).
- :mod:`~autobatch.policies.base`: the base class, the context and the shared rounding.
"""

from __future__ import annotations

from autobatch.policies.base import BatchSizePolicy, PolicyContext, round_batch_size
from autobatch.policies.budget import BudgetPolicy
from autobatch.policies.fixed import FixedPolicy
from autobatch.policies.gns import GNSPolicy
from autobatch.policies.goodput import (
    GoodputPolicy,
    fit_step_time,
    goodput,
    statistical_efficiency,
)
from autobatch.policies.guard import LossSpikeGuard
from autobatch.policies.measure import MeasurePolicy
from autobatch.policies.ramp import RampPolicy
from autobatch.policies.schedule import SchedulePolicy

__all__ = [
    "BatchSizePolicy",
    "BudgetPolicy",
    "FixedPolicy",
    "GNSPolicy",
    "GoodputPolicy",
    "LossSpikeGuard",
    "MeasurePolicy",
    "PolicyContext",
    "RampPolicy",
    "SchedulePolicy",
    "fit_step_time",
    "goodput",
    "round_batch_size",
    "statistical_efficiency",
]
