"""Built-in example problems: a model, its data, its loss, and sensible defaults.

Each example generates or ships its data (nothing is downloaded) and is cheap to build, so
the CLI (``autobatch fit --problem mnist1d``), the tests and the benchmarks can share them::

    from autobatch.registry import get_problem
    ex = get_problem("mnist1d", seed=0)
    model = ex.model_fn()
    opt = ex.optimizer(model.parameters(), ex.default_lr)   # lr is meant for ex.default_batch_size
    ...
    ex.evaluate(model, ex.val_data)        # {"val_loss": ..., "val_accuracy": ...}

Conventions shared by every example:

- ``seed`` seeds the model initialisation only; the data is fixed by the example's own
  ``data_seed`` option, so runs with different seeds see the same data set.
- ``loss_fn`` is mean-reduced over the batch (and over sequence positions for ``charlm``).
- ``metric_name`` is a key of the dict returned by :meth:`Problem.evaluate`, and
  ``target`` is the value of that metric a time-to-target benchmark waits for
  (``higher_is_better`` tells which side of it counts as reached).
- ``default_lr`` is tuned for ``default_batch_size`` (B0) with ``optimizer``.

Data sets are generated once per process and per option set (``functools.lru_cache`` in
each module); every :func:`autobatch.registry.get_problem` call returns fresh copies of the tensors. The names
live in :data:`autobatch.registry.PROBLEMS`; each module is imported on first use (mnist1d
pulls in matplotlib, which costs a second or more).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autobatch.evaluate import evaluate

__all__ = ["Problem"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], float], torch.optim.Optimizer]


@dataclass(frozen=True, eq=False)
class Problem:
    """One ready-to-train problem.

    Attributes:
        name: the registry name (``"mnist1d"``, ...).
        model_fn: builds a fresh model each call, initialised from the example's seed (the
            same seed gives the same initial weights; the global torch RNG is left alone).
        train_data: ``(X, y)`` tensors, examples along dimension 0.
        val_data: ``(X, y)`` tensors held out for :meth:`evaluate`.
        loss_fn: ``loss_fn(output, target)`` -> scalar tensor, mean-reduced over the batch.
        metric_name: key of :meth:`evaluate`'s dict that ``target`` refers to.
        higher_is_better: True for accuracies, False for losses.
        target: the metric value a time-to-target run waits for.
        default_lr: base learning rate at ``default_batch_size`` with ``optimizer``.
        default_batch_size: B0, the batch size ``default_lr`` was chosen for.
        default_epochs: a training length that comfortably reaches ``target`` at B0.
        optimizer: ``optimizer(params, lr)`` -> a torch optimizer.
        classification: True when outputs are logits over the last dimension and
            :meth:`evaluate` also reports ``val_accuracy``.
        description: one line for the CLI and the README.
    """

    name: str
    model_fn: Callable[[], nn.Module]
    train_data: tuple[torch.Tensor, torch.Tensor]
    val_data: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric_name: str
    higher_is_better: bool
    target: float
    default_lr: float
    default_batch_size: int
    default_epochs: int
    optimizer: OptimizerFactory
    classification: bool
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, model: nn.Module, data: Any, batch_size: int = 1024) -> dict[str, float]:
        """Mean loss (and accuracy for classification) of ``model`` over all of ``data``.

        :func:`autobatch.evaluate.evaluate` with this example's loss: eval mode under
        ``torch.no_grad()``, the model's modes restored, batches on the device of the model's
        first parameter.

        Args:
            model: the model to score.
            data: any form :func:`autobatch.data.as_batch_source` accepts, usually
                ``self.val_data``.
            batch_size: examples per forward pass (memory only; the result does not depend on it).

        Returns:
            ``{"val_loss": mean per-example loss}`` plus, for classification,
            ``"val_accuracy"``: the fraction of predictions (per example, or per sequence
            position for ``charlm``) whose argmax over the last dimension equals the target.
        """
        metrics = evaluate(model, data, self.loss_fn, batch_size=batch_size)
        if not self.classification:
            metrics.pop("val_accuracy", None)
        elif "val_accuracy" not in metrics:
            raise ValueError(
                f"example {self.name!r} is a classification example but its outputs are not "
                "class logits over the last dimension of integer targets"
            )
        return metrics

    def reached(self, metrics: dict[str, float]) -> bool:
        """Whether ``metrics`` (from :meth:`evaluate`) meets :attr:`target`; NaN never does."""
        value = metrics[self.metric_name]
        if math.isnan(value):
            return False
        return value >= self.target if self.higher_is_better else value <= self.target


def _seeded_model(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Call ``build`` with the torch RNG seeded by ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _plain_sgd(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """SGD without momentum or weight decay (a module-level function, so examples pickle)."""
    return torch.optim.SGD(params, lr=lr)
