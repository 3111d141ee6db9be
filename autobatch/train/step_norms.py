"""The step's loss and gradient norms, read by the host once per optimizer step.

:class:`StepNormMeter` is what ``autobatch.fit`` asks for the numbers of a step: the summed loss
and, on the steps it measures, the squared norms the noise-scale estimator needs
(``|G_b|^2`` of small batches and ``|G_B|^2`` of the whole step, McCandlish et al. 2018,
App. A.1). It owns the parameter hooks (:class:`~autobatch.noise.micro_batch.MicroBatchNormCollector`),
the per-example hooks (:class:`~autobatch.noise.per_example.PerExampleNormCollector`) and the
choice of which steps to measure and how to split them. It reads; it never changes a
gradient. Under data parallelism the loop's gradient all-reduce
(:class:`~autobatch.train.distributed.FlatGradientBuffer`) carries the step's totals
(:meth:`StepNormMeter.local_totals`) to every rank, and the meter reads the sums
(:meth:`StepNormMeter.read`).

Which steps are measured (``gns_method="micro"``): a step whose small batches come for free
(the memory cap split it into micro-batches, or ranks of a data-parallel run each hold a share)
is always measured. A step of one micro-batch is measured on each of the first ``first`` steps
(the estimator's first decisions), then every ``every``-th, split in two for it (one more
forward/backward at half size). :class:`MeasureSchedule` chooses ``every``: given (``fit``'s
default is 8), or ``"auto"``, so that the splits add at most ``overhead`` (a fraction, default
5%) to the training time.
"auto" compares the first split steps with unsplit steps at the same batch once (the relative
cost of a split, referred to the base batch ``B0``: ``c0``), then measures every ``2^k``-th
step, the smallest power of two with ``c(B) / 2^k <= overhead``, where ``c(B) = c0 sqrt(B0 / B)``,
but never more often than every 8th step (the default): a split costs one more
call's fixed overhead, which weighs less in a bigger step (MNIST-1D CNN on one CPU thread:
0.98 at B=16, 0.78 at 64, 0.41 at 256; a 1.1M-parameter MLP 0.09 at 256). The calibration is
kept in checkpoints, so a resumed run measures the same steps; two fresh runs can calibrate to
different intervals, which is why "auto" is not the default. The
interval and the estimator's memory go together: with sparse measurements the EMA decay per
step is raised so that about as many measurements stay in memory as at every 8th step
(:meth:`MeasureSchedule.smoothing`). ``gns_method="per_example"`` measures the due steps. The
estimator weighs an update as the steps since the previous one, so its averages keep their
memory in steps (``GradientNoiseScale.update(step=)``). (Thinning the free steps too was tried:
a regression problem whose noise scale grows then kept B at B0 for its first epoch, against
three decisions with every free step measured.)

Every step, measured or not, gives the whole step's norm ``|G_B|^2``, which averages ``|G|^2``
over every step (``GradientNoiseScale.update_big``): the noisier of the two quantities when
``B_simple >> B`` is not thinned out. (Reading it only on the measured steps saved a small
CNN's step 6% on one CPU thread, but a policy then grew the batch more slowly: a regression
problem reached B=72 in 201 steps instead of B=80 in 145.) Hooks are attached for the
measured steps only: an idle Python tensor hook still costs every backward a call per
parameter. Everything stays on the device until :meth:`StepNormMeter.read`, whose single
``.tolist()`` is the step's host sync.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from autobatch.accumulate import MicroStep
from autobatch.noise.micro_batch import (
    MicroBatchNormCollector,
    StepGradNorms,
    grad_sq_norm_of,
    trainable_parameters,
)
from autobatch.noise.per_example import PerExampleNormCollector
from autobatch.noise.preconditioned import PreconditionedNormCollector, weighted_grad_sq_norm
from autobatch.noise.sharded import ReduceScatterNormCollector
from autobatch.train.sharded import ShardedLayout, shard_sq_norm

__all__ = ["LocalTotals", "MeasureSchedule", "StepNormMeter", "norms_from_totals"]

Method = Literal["micro", "per_example", "off"]


def norms_from_totals(
    small_sum: float, count: float, inv_size_sum: float, big_sq: float, big_batch: int,
    grad_scale: float = 1.0,
) -> StepGradNorms | None:
    """The estimator's inputs from a step's totals (summed over micro-batches and ranks).

    Args:
        small_sum: ``sum_i s^2 |G_{b_i}|^2`` over the step's small batches (micro-batches,
            ranks' shares or single examples), each of a mean-reduced loss.
        count: how many small batches.
        inv_size_sum: ``sum_i 1/b_i``.
        big_sq: ``s^2 |G_B|^2`` of the whole step's gradient (NaN if not read).
        big_batch: ``B``, examples in the step (global).
        grad_scale: ``s``, the AMP loss scale still in the norms (1 without one).

    Returns:
        One small norm, the mean ``|G_b|^2``, with the effective size ``b = 1/mean(1/b_i)``
        (exact for unequal sizes, see :mod:`autobatch.noise._effective_batch`), and the
        big one; None with fewer than two small batches (none is smaller than the step).
    """
    if count < 2:
        return None
    scale_sq = grad_scale * grad_scale
    return StepGradNorms(
        small_sq_norms=[small_sum / count / scale_sq],
        small_batch_size=count / inv_size_sum,
        big_sq_norm=big_sq / scale_sq,
        big_batch_size=big_batch,
        micro_batch_sizes=[],
    )


class MeasureSchedule:
    """Which unsplit steps are split in two to measure the noise scale (module docstring).

    Args:
        every: measure every ``every``-th step, or ``"auto"``: the interval that keeps the
            splits' cost within ``overhead`` of the training time, calibrated once from the
            times of split and unsplit steps at the same batch (:meth:`observe`).
        overhead: the fraction of training time the splits may add (``"auto"`` only).
        base_batch: ``B0``, the batch the calibration is referred to (global examples).
        smoothing: the estimator's EMA decay per step as configured (``gns_smoothing``).
    """

    #: Interval before the calibration, and the one whose memory :meth:`smoothing` keeps.
    DEFAULT_EVERY = 8
    #: Longest interval "auto" picks.
    MAX_EVERY = 64
    #: Steps ignored at the start (allocator and cache warm-up), then split steps needed for
    #: the calibration, each with at least :attr:`_PLAIN` unsplit steps at the same batch.
    _SKIP = 2
    _SPLITS = 3
    _PLAIN = 8
    #: Unsplit step times kept per batch (the latest), so an uncalibrated run stays bounded.
    _KEEP = 64

    def __init__(self, every: int | Literal["auto"], *, overhead: float = 0.05, base_batch: int = 1,
                 smoothing: float = 0.95) -> None:
        if every != "auto" and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be an int >= 1 or 'auto' (got every={every!r})")
        if not 0.0 < overhead < 1.0:
            raise ValueError(f"overhead must be in (0, 1) (got overhead={overhead})")
        self.every, self.overhead, self.base_batch, self.base_smoothing = every, overhead, base_batch, smoothing
        self.split_cost: float | None = None  # c0 (at base_batch), once calibrated
        self._seen = 0
        self._split_times: dict[int, list[float]] = {}  # batch -> seconds of split steps
        self._plain_times: dict[int, list[float]] = {}  # batch -> seconds of unsplit steps

    def interval(self, batch: int) -> int:
        """Steps between two measured (split) steps at global batch ``batch``."""
        if self.every != "auto":
            return self.every
        if self.split_cost is None:
            return self.DEFAULT_EVERY
        cost = self.split_cost * math.sqrt(self.base_batch / max(batch, 1))
        k = max(0, math.ceil(math.log2(max(cost / self.overhead, 1.0))))
        # Never more often than the default: a cheap split is hard to time (charlm on CPU: a
        # 7% split measured as 0), and measuring every step would then cost more, not less.
        return min(max(2**k, self.DEFAULT_EVERY), self.MAX_EVERY)

    def smoothing(self, batch: int) -> float:
        """The estimator's EMA decay per step at ``batch``: the configured one, raised when
        measurements are sparser than every :attr:`DEFAULT_EVERY`-th step so that the decay
        between two measurements stays ``smoothing ** DEFAULT_EVERY``."""
        every = self.interval(batch)
        if every <= self.DEFAULT_EVERY:
            return self.base_smoothing
        return max(self.base_smoothing, self.base_smoothing ** (self.DEFAULT_EVERY / every))

    def observe(self, batch: int, seconds: float, split_to_measure: bool) -> None:
        """Time one step for the calibration: ``split_to_measure`` if it was split only to be
        measured (not by the memory cap, not under data parallelism).

        A split step is compared with the unsplit steps at the same batch (the policy may move
        the batch meanwhile); each batch's relative cost is referred to ``base_batch`` by the
        ``sqrt`` model above, and the calibration is their median, fixed from then on. Only
        split steps taken among unsplit ones count: the first window's run of split steps
        comes with the start's warm-up, and the first unsplit steps after it with
        reallocations (MNIST-1D CNN at B=256: those gave 0.04 against 0.41 interleaved).
        """
        if self.every != "auto" or self.split_cost is not None:
            return
        self._seen += 1
        if self._seen <= self._SKIP:
            return
        if not split_to_measure:
            plain = self._plain_times.setdefault(batch, [])
            plain.append(seconds)
            del plain[:-self._KEEP]
            return
        if len(self._plain_times.get(batch, ())) < self._PLAIN:
            return
        # A new vote only comes with a split step: the calibration is tried then.
        self._split_times.setdefault(batch, []).append(seconds)
        costs = [
            (statistics.median(split) / statistics.median(self._plain_times[b]) - 1.0) * math.sqrt(b / self.base_batch)
            for b, split in self._split_times.items() if len(self._plain_times.get(b, ())) >= self._PLAIN
            for _ in split  # one vote per split step
        ]
        if len(costs) >= self._SPLITS:
            self.split_cost = max(statistics.median(costs), 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"split_cost": self.split_cost, "seen": self._seen,
                "split_times": {b: list(t) for b, t in self._split_times.items()},
                "plain_times": {b: list(t) for b, t in self._plain_times.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.split_cost = state["split_cost"]
        self._seen = int(state["seen"])
        self._split_times = {int(b): [float(x) for x in t] for b, t in state["split_times"].items()}
        self._plain_times = {int(b): [float(x) for x in t] for b, t in state["plain_times"].items()}


@dataclass
class LocalTotals:
    """This rank's numbers of a step, on the device, before they are summed over ranks.

    Attributes:
        tensors: 0-d tensors: the loss (this rank's part of the step's mean), then on a
            measured step ``sum_i s^2 |G_{b_i}|^2`` over its small batches, and under data
            parallelism their count and ``sum_i 1/b_i``; under FSDP then the squared norm of
            this rank's gradient shards.
        own_norm: ``(index, factor)`` when this rank's whole gradient is its small batch (a
            data-parallel rank whose share is one micro-batch, measured without hooks):
            ``tensors[index]`` is then to be replaced by the rank's squared gradient norm
            times ``factor``, read from the buffer the gradient all-reduce gathers (one dot
            product, no second pass); None otherwise.
    """

    tensors: list[torch.Tensor]
    own_norm: tuple[int, float] | None = None


class StepNormMeter:
    """Per-step loss and gradient norms for ``autobatch.fit``.

    Per optimizer step: :meth:`split` (how this rank's share is cut into micro-batches, and
    whether the step is measured), :meth:`begin_step`, one :meth:`after_backward` per
    micro-batch, then :meth:`local_totals` and, after the loop's gradient all-reduce under
    data parallelism, :meth:`read`: the step's one host sync. No method changes a gradient.

    Args:
        model: the (unwrapped) model; hooks go on it during measured steps, until :meth:`remove`.
        method: ``"micro"``, ``"per_example"`` or ``"off"`` (only the loss is read).
        data_parallel: whether the step's gradient is summed over ranks (each rank's share is
            then a small batch of its own, measured on every step).
        every: a step that gives no small batches for free is measured every ``every``
            steps, or as a :class:`MeasureSchedule` decides (see the module docstring)...
        first: ...and every one of the first ``first`` steps, so that the estimator's
            first decisions see as many measurements as when every step is measured.
        scaler: the AMP ``GradScaler`` whose scale is in the gradients, or None.
        min_micro: the smallest micro-batch the model trains on: a measured step is split in
            two only when both halves hold this many examples (BatchNorm in train mode fails
            on one example).
        sharded: the FSDP2 layout of a sharded model (:mod:`autobatch.train.sharded`), or
            None: small-batch norms then come from the reduce-scatter's input
            (:class:`~autobatch.noise.sharded.ReduceScatterNormCollector`, installed until
            :meth:`close`), ``|G_B|^2`` from the gradient shards.
        preconditioner: for the noise scale in a diagonal preconditioner's geometry
            (``gns_geometry="adam"``): called at each :meth:`begin_step`, returns parameter ->
            weight (:func:`~autobatch.noise.preconditioned.adam_preconditioner`); every norm is
            then ``|P g|^2``. A step at which it returns no weight (the optimizer has no state
            yet) gives no norms. One process and ``method="micro"`` only. None: the raw norms.
    """

    def __init__(self, model: nn.Module, method: Method, *, data_parallel: bool = False,
                 every: int | MeasureSchedule = 1, first: int = 0,
                 scaler: torch.amp.GradScaler | None = None, min_micro: int = 1,
                 sharded: ShardedLayout | None = None,
                 preconditioner: Callable[[], Mapping[torch.Tensor, torch.Tensor]] | None = None) -> None:
        if preconditioner is not None and (method != "micro" or data_parallel or sharded is not None):
            raise ValueError("a preconditioned noise scale is measured with method='micro' on one process only "
                             f"(got method={method!r}, data_parallel={data_parallel}, sharded={sharded is not None})")
        self._preconditioner = preconditioner
        self._weights: Mapping[torch.Tensor, torch.Tensor] = {}
        self.schedule = every if isinstance(every, MeasureSchedule) else MeasureSchedule(every)
        self.method, self.data_parallel, self.first, self.scaler = method, data_parallel, first, scaler
        self.min_micro = min_micro
        self._forced = False  # this step was split only to be measured
        self._model = model
        self.params = trainable_parameters(model)
        self._device = self.params[0].device
        self._big_norm = grad_sq_norm_of(self.params)
        # Hooks exist only during a measured step: a Python tensor hook costs every backward
        # a call per parameter (~10% of a small CNN's step) even when it records nothing.
        self._hooks: MicroBatchNormCollector | None = None
        self._per_example: PerExampleNormCollector | None = None
        self.measuring = False
        self._timed = False
        self._pe_sum: torch.Tensor | None = None
        self._pe_count = 0
        self._done: list[int] = []  # examples of the micro-batches run this step
        self._count, self._inv = 0.0, 0.0  # one process: the step's small batches, sum 1/b_i
        self.sharded = sharded
        self._rs = ReduceScatterNormCollector(model) if sharded is not None and method == "micro" else None
        self._share_weight = 0.0  # FSDP with reduce="step": the share's loss weight, summed

    def split(self, step: int, num_examples: int,
              micro_sizes: Callable[[int, int], list[int]], parts: int = 1) -> list[int]:
        """Cut this rank's ``num_examples`` into micro-batch sizes and decide whether step
        ``step`` is measured.

        Args:
            step: the step's number (from 1).
            num_examples: this rank's share of the step.
            micro_sizes: ``micro_sizes(n, min_parts)`` of the controller (memory cap).
            parts: at least this many micro-batches (fewer only with fewer examples): under
                FSDP every rank runs as many as the largest share needs.
        """
        # Every rank decides alike (a rank may hold no example at the very end of an epoch):
        # from the step alone, not from its share.
        done = step - 1
        due = done < self.first or done % self.schedule.interval(num_examples) == 0
        sizes = micro_sizes(num_examples, parts) if num_examples else []
        self._forced = False
        if self.method == "micro":
            # Small batches that come for free (the memory cap split the step, or ranks each
            # hold a share) are measured at every step; a step of one micro-batch only when due,
            # split in two for it (one more forward/backward at half size).
            free = self.data_parallel or len(sizes) > 1
            self.measuring = free or due
            if self.measuring and not free and num_examples >= 2 * self.min_micro:
                sizes = micro_sizes(num_examples, 2)
                self._forced = True
            self._timed = not free  # a step of one micro-batch, or one split only to be measured
        else:
            self.measuring = self.method == "per_example" and due
            self._timed = False
        return sizes

    def observe_time(self, batch: int, seconds: float) -> None:
        """The step just finished took ``seconds`` at global batch ``batch``: a sample for the
        schedule's calibration (``gns_every="auto"``) if it was a step it can use."""
        if self._timed:
            self.schedule.observe(batch, seconds, self._forced)

    def begin_step(self, sizes: list[int]) -> None:
        """Start a step (or its retry after an out-of-memory error) of micro-batches ``sizes``."""
        self.remove()  # what a failed attempt left
        self._pe_sum, self._pe_count, self._done, self._share_weight = None, 0, [], 0.0
        if self._preconditioner is not None:
            self._weights = self._preconditioner()
            if not self._weights:  # no optimizer state yet: no geometry to measure in
                self.measuring = False
        if not self.measuring:
            return
        if self._rs is not None:
            self._rs.begin_step()
        elif self.method == "per_example":
            self._per_example = PerExampleNormCollector(self._model)
        # A rank's whole share in one micro-batch is a small batch of the data-parallel step
        # already: its norm is read from the gradient before the all-reduce, no hooks needed.
        elif self._preconditioner is not None:
            weights = self._weights
            self._hooks = PreconditionedNormCollector(self._model, lambda: weights)
            self._hooks.begin_step()
        elif not self.data_parallel or len(sizes) > 1:
            self._hooks = MicroBatchNormCollector(self._model)
            self._hooks.begin_step()

    def after_backward(self, batch_size: int, loss_weight: float, items: int | None = None) -> None:
        """Close one micro-batch of ``batch_size`` examples whose mean loss was multiplied by
        ``loss_weight`` (``items / total items``, over all ranks) before its backward.

        ``items`` are its loss items (:mod:`autobatch.accumulate`; default: its examples). The
        hooks get them (their weights must be proportional to their sizes); the estimator's
        sizes stay in examples, as in :func:`autobatch.noise.measure.measure_noise_scale`.
        """
        self._done.append(batch_size)
        if self._rs is not None and self._rs.active:
            if self.sharded.reduce == "micro_batch":  # each micro-batch's own reduce-scatter
                self._rs.after_backward(batch_size, loss_weight)
            else:  # one reduce-scatter, of the whole share, after the last micro-batch
                self._share_weight += loss_weight
        elif self._hooks is not None:
            self._hooks.after_backward(batch_size if items is None else items, loss_weight)
        elif self._per_example is not None:
            sq = self._per_example.sq_norms(loss_weight=loss_weight).sum()
            self._pe_sum = sq if self._pe_sum is None else self._pe_sum + sq
            self._pe_count += batch_size

    def after_micro_batch(self, micro: MicroStep) -> None:
        """:meth:`after_backward` for a :class:`~autobatch.accumulate.MicroStep`, as
        :func:`~autobatch.accumulate.accumulate_gradients` reports each micro-batch."""
        self.after_backward(micro.examples, micro.weight, micro.items)

    def discard_pass(self) -> None:
        """A forward/backward that only kept the ranks' collectives in step (a zero-weight
        pass under FSDP): what its reduce-scatters showed is not a small batch."""
        if self._rs is not None and self.sharded.reduce == "micro_batch":
            self._rs.discard()

    def local_totals(self, loss: torch.Tensor | None, sizes: list[int], global_batch: int) -> LocalTotals:
        """This rank's numbers of the step, on the device (no host sync): what a data-parallel
        step's gradient all-reduce sums over ranks, or what :meth:`read` reads directly.

        Args:
            loss: this rank's part of the step's mean loss
                (:attr:`autobatch.accumulate.Accumulated.loss`), None without a loss item.
            sizes: this rank's micro-batch sizes (examples).
            global_batch: ``B``, examples in the step over all ranks.
        """
        if loss is None:
            loss = torch.zeros((), device=self._device)
        if self.sharded is not None:
            small, count, inv = self._sharded_small_batches()
            f64 = {"device": self._device, "dtype": torch.float64}  # summed in float64 (sum_over_ranks)
            return LocalTotals([loss, small, torch.full((), count, **f64), torch.full((), inv, **f64),
                                shard_sq_norm(self.params)])
        if not self.data_parallel:
            if not self.measuring:
                return LocalTotals([loss])
            small, self._count, self._inv = self._small_batches()
            return LocalTotals([loss, small])
        device = self._device
        if self.measuring and self._hooks is None and self._pe_sum is None and sizes:
            # the rank's whole share is one small batch: its norm is read from the gathered
            # gradient, whose mean-loss weight is b / B
            share = sizes[0] / global_batch
            small, count, inv = torch.zeros((), device=device), 1.0, 1.0 / sizes[0]
            own = (1, 1.0 / (share * share))
        else:
            small, count, inv = self._small_batches()
            own = None
        return LocalTotals([loss, small.float(), torch.full((), count, device=device),
                            torch.full((), inv, device=device)], own)

    def read(self, totals: torch.Tensor | list[torch.Tensor], global_batch: int,
             flat_gradient: torch.Tensor | None = None) -> tuple[float, StepGradNorms | None, list[float]]:
        """Read the step's loss and norms: the step's one host sync.

        Args:
            totals: :meth:`local_totals`' tensors on one process, or under data parallelism
                their sums over ranks as one tensor (the all-reduce's result), followed by
                whatever else it carried.
            global_batch: ``B``, examples in the step over all ranks.
            flat_gradient: under data parallelism the summed gradient as one flat tensor (the
                all-reduce's buffer), for ``|G_B|^2`` without another pass; on one process
                it is read from ``.grad``.

        Returns:
            ``(loss, norms, extra)``: the step's mean loss over its loss items (all ranks);
            the estimator's inputs, on an unmeasured step (or one with fewer than two small
            batches) only ``big_sq_norm`` with ``small_sq_norms`` empty, None with
            ``method="off"``; and the further numbers the all-reduce carried (data
            parallelism), summed over ranks. Norms are of unscaled gradients of mean-reduced
            losses.
        """
        big_norm = self.method != "off"  # |G_B|^2 feeds the estimator on every step
        if self._preconditioner is not None and not self._weights:
            big_norm = False  # the step before the optimizer's first: no geometry, no norms
        if self.sharded is not None:
            parts = [totals]  # the shards' squared norms rode in the all-reduce
        elif self.data_parallel:
            parts = [totals]
            if big_norm:
                parts.append(torch.linalg.vector_norm(flat_gradient, dtype=torch.float32).square())
        else:
            parts = list(totals)
            if big_norm:
                parts.append(self._big_norm() if self._preconditioner is None
                             else weighted_grad_sq_norm(self.params, self._weights))
        self.remove()
        if self.scaler is not None:
            parts.append(self.scaler.scale(torch.ones((), device=parts[0].device)))
        # The step's one host sync: the loss, the norms and the AMP scale in one transfer.
        if len(parts) == 1 and parts[0].ndim == 0:
            values = [parts[0].item()]
        elif not self.data_parallel and self.sharded is None:  # 0-d float32 tensors
            values = torch.stack(parts).tolist()
        else:
            values = torch.cat([t.reshape(-1).float() for t in parts]).tolist()
        scale = values.pop() if self.scaler is not None else 1.0
        if self.sharded is not None:  # each shard is held by `replicate` ranks of the sum
            loss, small_sum, count, inv, shards_sq, *extra = values
            big = shards_sq / self.sharded.replicate
        elif self.data_parallel:
            big = values.pop() if big_norm else math.nan
            loss, small_sum, count, inv, *extra = values
        else:
            big = values.pop() if big_norm else math.nan
            loss, extra = values[0], []
            small_sum = values[1] if self.measuring else math.nan
            count, inv = self._count, self._inv
        if not big_norm:
            return loss, None, extra
        norms = norms_from_totals(small_sum, count, inv, big, global_batch, scale) if self.measuring else None
        if norms is None:  # no two small batches this step: the whole-step norm alone
            norms = StepGradNorms(small_sq_norms=[], small_batch_size=math.nan, big_sq_norm=big / (scale * scale),
                                  big_batch_size=global_batch, micro_batch_sizes=[])
        return loss, norms, extra

    def _sharded_small_batches(self) -> tuple[torch.Tensor, float, float]:
        """Under FSDP: this rank's small batches from the reduce-scatters' inputs (its
        micro-batches, or with ``reduce="step"`` its whole share), as :meth:`_small_batches`."""
        if self._rs is None or not self._rs.active:
            return torch.zeros((), device=self._device), 0.0, 0.0
        if self.sharded.reduce == "step" and self._done:
            self._rs.after_backward(sum(self._done), self._share_weight)
            sizes = [sum(self._done)]
        else:
            sizes = self._done
        raw = self._rs.finish_step()
        small = sum((r * (1.0 / (w * w)) for r, w in zip(raw.unbind(), self._rs.loss_weights)),
                    torch.zeros((), device=self._device))
        return small, float(len(sizes)), sum(1.0 / b for b in sizes)

    def _small_batches(self) -> tuple[torch.Tensor, float, float]:
        """This rank's small batches: ``sum_i s^2 |G_{b_i}|^2`` (0-d tensor on the device),
        their count and ``sum_i 1/b_i``."""
        if self._hooks is not None:
            raw = self._hooks.finish_step()
            # |w_i s G_i|^2 / w_i^2 = s^2 |G_i|^2 (s, the AMP scale, is divided out on the host)
            small = sum((r * (1.0 / (w * w)) for r, w in zip(raw.unbind(), self._hooks.loss_weights)),
                        torch.zeros((), device=self._device))
            # micro-batches with no loss item ran no backward: only those that did count
            return small, float(len(self._done)), sum(1.0 / b for b in self._done)
        if self._pe_sum is not None:
            return self._pe_sum, float(self._pe_count), float(self._pe_count)
        return torch.zeros((), device=self._device), 0.0, 0.0

    def fall_back_to_micro(self) -> None:
        """Measure with micro-batch norms from now on (per-example norms proved unsupported)."""
        self.remove()
        self.method = "micro"

    def remove(self) -> None:
        """Remove the hooks of the current step, if any, from the model."""
        for hooks in (self._hooks, self._per_example):
            if hooks is not None:
                hooks.remove()
        self._hooks = self._per_example = None
        if self._rs is not None:
            self._rs.active = False

    def close(self) -> None:
        """Remove every hook, the FSDP reduce-scatter measurement included (end of the run)."""
        self.remove()
        if self._rs is not None:
            self._rs.remove()
            self._rs = None
