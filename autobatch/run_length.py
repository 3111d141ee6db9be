"""How long a run is: its stopping rules, which of them binds, and how far through it a run is.

A run stops at ``epochs`` (fractional allowed), ``max_steps`` (optimizer steps),
``max_samples`` (examples processed) or ``max_tokens`` (loss items processed: tokens for a
language model), whichever comes first. Two kinds of limit follow:

- ``"samples"``: epochs, example and token counts limit the data seen, the usual case;
- ``"steps"``: ``max_steps`` given alone.

The kind matters to the policies (:attr:`autobatch.policies.PolicyContext.limited_by`): with
examples limited, a larger batch means fewer steps, so it must pay for itself; with steps
limited, it does not. ``fit``, the studies, ``lr="auto"`` and the trainer integrations all read
a run's length here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["LimitKind", "RunLength"]

LimitKind = Literal["samples", "steps"]


@dataclass(frozen=True)
class RunLength:
    """The stopping rules of one run (None: no limit of that kind).

    Attributes:
        epochs: passes over the training set (may be fractional).
        max_steps: optimizer steps.
        max_samples: examples processed (global, all ranks).
        max_tokens: loss items processed (global; tokens for a language model), counted after
            each step.
    """

    epochs: float | None = None
    max_steps: int | None = None
    max_samples: int | None = None
    max_tokens: int | None = None

    @property
    def given(self) -> bool:
        """Whether any limit is set."""
        return any(x is not None for x in (self.epochs, self.max_steps, self.max_samples, self.max_tokens))

    @property
    def limited_by(self) -> LimitKind:
        """``"steps"`` when ``max_steps`` is the only limit, else ``"samples"`` (a token budget
        is one of data too)."""
        if self.max_steps is not None and self.epochs is None and self.max_samples is None and self.max_tokens is None:
            return "steps"
        return "samples"

    def examples(self, num_examples: int) -> int | None:
        """The examples the run may process: the smaller of ``epochs x num_examples`` and
        ``max_samples`` (None when neither is given); ``num_examples`` is the training set's
        size (one epoch)."""
        limits = [x for x in (self.epochs * num_examples if self.epochs is not None else None,
                              self.max_samples) if x is not None]
        return int(min(limits)) if limits else None

    def length(self, num_examples: int) -> float | None:
        """The size of the limit that binds, in its own unit: optimizer steps when
        :attr:`limited_by` is ``"steps"``, else examples (:meth:`examples`); None without a
        limit."""
        if self.limited_by == "steps":
            return float(self.max_steps)  # type: ignore[arg-type]
        total = self.examples(num_examples)
        return None if total is None else float(total)

    def reached(self, steps: int, samples: int, epochs_done: float, tokens: int = 0) -> str | None:
        """Which rule ``steps`` optimizer steps, ``samples`` examples, ``epochs_done``
        (fractional) epochs and ``tokens`` loss items reached: ``"max_steps"``,
        ``"max_samples"``, ``"max_tokens"``, ``"epochs"``, or None."""
        if self.max_steps is not None and steps >= self.max_steps:
            return "max_steps"
        if self.max_samples is not None and samples >= self.max_samples:
            return "max_samples"
        if self.max_tokens is not None and tokens >= self.max_tokens:
            return "max_tokens"
        if self.epochs is not None and epochs_done >= self.epochs:
            return "epochs"
        return None
