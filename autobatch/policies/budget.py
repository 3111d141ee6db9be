"""``budget``: the noise scale, bounded by what the LR can follow under the run's budget.

Which batch is best depends on what the run is short of (docs/design/gns.md, last section):

- **Samples** (``epochs`` or ``max_samples`` bind; the usual case). In McCandlish et al.'s
  (2018) model a step of batch ``B`` makes ``1/(1 + B_noise/B)`` of a full-batch step's
  progress, so per example a small batch is best, and SGD's final accuracy follows the noise
  temperature ``LR/B`` (Smith & Le 2017): growing ``B`` without growing the LR is an LR
  decay the run did not ask for. Measured (MNIST-1D CNN, SGD, B0 = 32, 40 epochs, 3 seeds):
  the ``gns`` policy with the LR factor capped at 2 let B reach 216-352 and finished 4.2
  points below fixed B0 at base LR 0.05; the same run with B <= 64 and the linear rule
  (LR x2, ``LR/B`` kept) finished 0.8 points *above* it in 0.52-0.55x the steps. So the batch
  grows only as far as the LR factor can follow: ``B <= the largest B whose LR-rule factor
  is <= F``, where ``F`` is the allowed factor (``max_lr_factor``, lowered by the
  :class:`~autobatch.policies.guard.LossSpikeGuard` when a larger LR proved unstable). With
  the linear rule (this policy's default, for every optimizer) that is ``B0 x F``; with the
  square-root rule (Adam-family, Malladi et al. 2022) it would be ``B0 x F^2``. Below that bound B
  follows the noise scale as ``gns`` does
  (never above ``B_noise``: past it Adam's best LR falls again, Li et al. 2024 "Surge").
- **Steps** (only ``max_steps`` binds): more examples per step cost no steps, so B follows
  the noise scale freely; the LR factor is still the rule's, capped at ``F``.

**Annealing by batch.** Once the guard has cut the factor, the run has found its LR's
stability edge: the LR cannot follow a larger batch, and every step the policy saves must come
from a batch that outgrows the LR, which lowers ``LR/B`` as an LR decay would. A decay belongs
at the end of a run, so it waits for ``anneal_after`` (0.5) of the sample budget
(:attr:`PolicyContext.progress`) and for a calm loss (:meth:`LossSpikeGuard.calm`: no spike
being recovered from; a decay in the middle of a blow-up froze a half-recovered model at 55-70%
accuracy when tried as a fixed ramp). The batch then grows by ``max_growth`` per decision to
``anneal_factor`` (8) x the batch the LR can follow, and drops back to that batch while the
loss is not calm. Measured on the MNIST-1D CNN (SGD, B0 = 32, 40 epochs, seeds 3-7, outside
the benchmark's seeds 0-2), mean accuracy against fixed B0 and steps: at base LR 0.2 (the tuned
one) -0.11 points in 0.53x the steps (without the anneal +0.01 in 0.96x); at 0.1, -0.27 in
0.48x (without: -0.01 in 0.79x). Starting at 0.6 of the budget kept about 0.1 point more but
took 0.62x the steps at LR 0.2; a factor of 4 saved fewer steps for about the same accuracy
(-0.12 in 0.59x at LR 0.2, -0.23 in 0.53x at 0.1). The target
is a schedule, not the noise scale: near interpolation (train loss 1e-3) the estimate swung
between 3 and 400 and was often undefined, and following it to B = 600-3,600 cost 0.2-0.6
points more on seeds 0-2. A run whose guard never fired (its LR could follow the batch) does
not anneal: there, at base LR 0.05, doubling LR and batch ended 0.6-1.1 points above fixed B0.
Nor does a run with a user's LR scheduler (``PolicyContext.lr_scheduled``; the Hugging Face
Trainer's default linear decay included): its LR decay is the user's, and a batch anneal on
top would decay twice.

The policy returns, as its own LR factor, whatever brings the controller's
``min(rule(B), max_lr_factor)`` down to ``F``, so the guard's cut acts at once, before the
batch shrinks at the next decision.

Knobs: ``max_lr_factor`` (config, default 2: the LR never exceeds twice the base LR, so
under a sample budget SGD's batch stays <= 2 x B0 and Adam's <= 4 x B0 until an anneal), the
``gns`` settings (``noise_multiplier``, ``noise_confidence``, ``max_growth``, ``hysteresis``,
``round_to``), ``anneal_after`` (0.5; None: never) and ``anneal_factor`` (8), and the guard's
(``spike_ratio`` 1.5, ``smoothing`` 0.98, ``min_updates`` 50, ``cut`` 0.5); all but the
first five constructor only: ``fit(model, data, policy=BudgetPolicy(anneal_after=None))``.

Rejected, with what was measured (MNIST-1D CNN, SGD, B0 = 32, 40 epochs, seeds 0-2):

- ``gns`` with the LR factor capped at 2 (the old default): B grew to 216-352, -4.2 points
  mean at base LR 0.05, -0.6 at 0.2.
- Letting B grow freely in the last 40% of the budget whatever the guard saw (annealing by
  batch in every run): -2 to -3 points at base LR 0.05, about -1 at 0.2. Hence the anneal
  above waits for a cut.
- A curvature bound (power-iteration ``lambda_max``, LR <= 2/lambda): at LR 0.05 it measured
  ``lambda`` 16-26, i.e. a bound of 0.08-0.12, yet LR 0.1 helped; at 0.2 it sat at the edge
  of stability (``lambda ~ 2/LR``) whether or not the increase hurt. It does not tell harmful
  increases from harmless ones, so the guard watches the loss instead.
- The AdaScale gain as the SGD rule: at ``B = B_noise`` it is only about half the linear
  factor, so it too lowers ``LR/B``; this policy's default rule is the linear one (capped at
  ``1 + B_noise/B0``), for SGD and Adam alike. Measured with this policy
  (``fit(..., lr_scaling="adascale")``; seeds 0-2, against fixed B0): at base LR 0.05 -0.60
  points mean (the linear rule: +0.71), at 0.2 0.65x the steps (linear: 0.51x). It is the
  better rule where the base LR is already tuned to the stability edge: on the time-to-target
  benchmark (MNIST-1D, B0 = 16, its tuned LR 0.2, seeds 0-5) it reached 90% accuracy in 0.66x
  fixed B0's steps with a final 94.2%, the linear rule in 0.90x with 92.9%.
- The square-root rule for Adam (Malladi et al. 2022) under a sample budget: on charlm
  (AdamW, 6 epochs, B0 = 32, seed 0) it finished 4.4% / 3.1% above fixed B0's loss at base
  LR 7.5e-4 / 1.5e-3 in 0.70x / 0.79x the steps; the linear rule 1.3% / 2.1% in 0.72x / 0.78x.
  The square-root rule keeps Adam's SDE in the noise-dominated regime; these short runs were
  short of optimizer progress, where the LR must follow the batch linearly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from autobatch.policies.base import PolicyContext, growth_window, round_batch_size
from autobatch.policies.gns import GNSPolicy
from autobatch.policies.guard import LossSpikeGuard

__all__ = ["BudgetPolicy", "largest_batch_within"]

def largest_batch_within(rule: Any, factor: float, lo: int, hi: int) -> int:
    """The largest ``B`` in ``[lo, hi]`` with ``rule(B) <= factor`` (``lo`` if none).

    ``rule`` maps a global batch size to the LR rule's factor and must not decrease with
    ``B`` (true of every built-in rule). Bisection: ``O(log(hi - lo))`` calls.
    """
    tol = 1e-9 * max(1.0, factor)
    if rule(hi) <= factor + tol:
        return hi
    if rule(lo) > factor + tol:
        return lo
    a, b = lo, hi  # rule(a) <= factor < rule(b)
    while b - a > 1:
        mid = (a + b) // 2
        if rule(mid) <= factor + tol:
            a = mid
        else:
            b = mid
    return a


class BudgetPolicy(GNSPolicy):
    """Follow the noise scale like ``gns``, but under a sample budget never past the batch
    the (guarded) LR factor can follow; see the module docstring for the reasons.

    Args:
        noise_multiplier, max_growth, hysteresis, round_to, confidence: as
            :class:`~autobatch.policies.GNSPolicy`.
        guard: the stability guard: True (default) for a fresh :class:`LossSpikeGuard`, an
            instance to use, or False for none (the factor stays at ``max_lr_factor``, and
            the batch never anneals).
        anneal_after: the fraction of a sample budget after which, once the guard has cut,
            the batch may outgrow the LR (None: never).
        anneal_factor: the annealed batch, as a multiple of the batch the LR can follow.

    Raises:
        ValueError: for ``anneal_after`` outside ``[0, 1]`` or ``anneal_factor < 1`` (both
            reported).

    The context's ``limited_by``, ``max_lr_factor``, ``lr_rule`` and ``train_loss`` come from the
    controller. Without ``lr_rule`` (a loop that does not give it) the linear rule ``B/B0`` is
    assumed. The default LR rule is ``linear`` (see the module docstring for why, Adam included).
    """

    config_settings: ClassVar[Mapping[str, str]] = GNSPolicy.config_settings
    # The LR follows the batch linearly for every optimizer: under a sample budget the runs
    # measured were short of optimizer progress, not of noise (charlm, AdamW, 6 epochs: the
    # square-root rule finished 4.4% / 3.1% above fixed B0's loss at base LR 7.5e-4 / 1.5e-3,
    # the linear rule 1.3% / 2.1%). A config that names a rule keeps it.
    default_lr_scaling: ClassVar[str | None] = "linear"

    def __init__(self, *, guard: LossSpikeGuard | bool = True, anneal_after: float | None = 0.5,
                 anneal_factor: float = 8.0, **gns_settings: Any) -> None:
        super().__init__(**gns_settings)
        problems = []
        if anneal_after is not None and not 0.0 <= anneal_after <= 1.0:
            problems.append(f"anneal_after must be in [0, 1] or None (got anneal_after={anneal_after}); "
                            "e.g. 0.5, the second half of the budget")
        if not anneal_factor >= 1.0:
            problems.append(f"anneal_factor must be >= 1 (got anneal_factor={anneal_factor}); e.g. 8")
        if problems:
            raise ValueError("; ".join(problems))
        self.anneal_factor = anneal_factor
        self.guard = guard if isinstance(guard, LossSpikeGuard) else LossSpikeGuard()
        self.use_guard = guard is not False
        self.anneal_after = anneal_after
        self._seen_step = -1

    # -- what the LR may do ---------------------------------------------------------------
    def allowed_factor(self, ctx: PolicyContext) -> float:
        """``F``: the LR factor allowed now, ``max_lr_factor`` lowered by the guard."""
        cap = ctx.max_lr_factor if ctx.max_lr_factor is not None else math.inf
        return min(cap, self.guard.allowed) if self.use_guard else cap

    def batch_cap(self, ctx: PolicyContext) -> int:
        """The largest global batch whose LR-rule factor stays within :meth:`allowed_factor`
        (``max_batch_size`` under a steps budget, an unbounded factor or an anneal)."""
        return self._cap(ctx, self.allowed_factor(ctx))

    def _cap(self, ctx: PolicyContext, factor: float) -> int:
        if ctx.limited_by == "steps" or math.isinf(factor) or self.annealing(ctx):
            return ctx.max_batch_size
        return self._following(ctx, factor)

    @staticmethod
    def _rule(ctx: PolicyContext) -> Callable[[int], float]:
        """The LR rule's factor as a function of the global batch (linear when not given)."""
        return ctx.lr_rule or (lambda b: b / ctx.base_batch_size)

    def _following(self, ctx: PolicyContext, factor: float) -> int:
        """The largest batch whose LR-rule factor is within ``factor``."""
        return largest_batch_within(self._rule(ctx), factor, ctx.base_batch_size, ctx.max_batch_size)

    def _in_use(self, ctx: PolicyContext) -> float:
        """The rule's factor at the current batch, capped at ``max_lr_factor``."""
        used = self._rule(ctx)(ctx.batch_size)
        return used if ctx.max_lr_factor is None else min(used, ctx.max_lr_factor)

    def annealing(self, ctx: PolicyContext) -> bool:
        """Whether the batch may outgrow the LR now: under a sample budget, past
        ``anneal_after`` of it, once the guard has found the LR's stability edge (a spike
        cut the factor) and while the loss is calm (no spike being recovered from). The batch
        then grows to ``anneal_factor`` x the batch the LR can follow, at the LR it has: an LR
        decay by batch for the rest of the run. Never with a user's LR scheduler
        (``ctx.lr_scheduled``): the run's decay is theirs, and a second one by batch would
        compound it."""
        return (self.anneal_after is not None and self.use_guard and ctx.limited_by == "samples"
                and not ctx.lr_scheduled and ctx.progress >= self.anneal_after
                and self.guard.spikes > 0 and self.guard.calm())

    def observe(self, ctx: PolicyContext) -> None:
        """Feed the guard the step's mean training loss (``ctx.train_loss``), with the LR factor
        the step used: ``BatchSizeController.observe(loss=...)`` calls this once per step."""
        self.observe_loss(ctx.step, ctx.train_loss, min(self._in_use(ctx), self.guard.allowed))

    def observe_loss(self, step: int, loss: float, lr_factor: float) -> None:
        """Feed the guard one step's mean training loss, once per step.

        :meth:`observe` does it for a loop that passes the loss to
        ``BatchSizeController.observe``; a loop whose controller never sees the loss can call
        this (e.g. from a callback's ``on_step_end``, with ``lr_factor = record.lr /
        base_lr``). A step already seen is ignored, so both ways may be used together.
        """
        if not self.use_guard or step <= self._seen_step or not math.isfinite(loss):
            return
        self._seen_step = step
        self.guard.update(loss, lr_factor)

    # -- the policy ----------------------------------------------------------------------
    def propose(self, ctx: PolicyContext) -> int:
        factor = self.allowed_factor(ctx)
        if self.annealing(ctx):
            # anneal_factor x the batch the LR can follow, approached by max_growth per decision
            # (a schedule, not the noise scale: see the module docstring)
            target = self.anneal_factor * self._following(ctx, factor)
            lo, hi = growth_window(ctx.batch_size, self.max_growth, ctx.min_batch_size, ctx.max_batch_size)
            return round_batch_size(min(max(target, lo), hi), self.round_to, lo, hi)
        cap = self._cap(ctx, factor)
        proposal = super().propose(ctx)
        if proposal <= cap:
            return proposal
        # Rounded down to an allowed size, so the LR factor at the new B stays within F.
        rounded = round_batch_size(cap, self.round_to, ctx.min_batch_size, ctx.max_batch_size)
        return rounded if rounded <= cap else max(ctx.min_batch_size, rounded - self.round_to)

    def lr_factor(self, ctx: PolicyContext) -> float:
        factor = self.allowed_factor(ctx)
        used = self._in_use(ctx)
        return 1.0 if used <= factor else factor / used

    def state_dict(self) -> dict[str, Any]:
        return {"guard": self.guard.state_dict(), "seen_step": self._seen_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.guard.load_state_dict(state["guard"])
        self._seen_step = int(state["seen_step"])
