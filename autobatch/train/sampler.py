"""Sample order for a changing batch size: every example once per epoch, in a seeded order.

A fixed-size sampler cannot follow a batch size that changes mid-epoch without skipping or
repeating examples. :class:`SampleStream` instead hands out the next ``n`` indices of the
epoch's permutation for whatever ``n`` the current step needs, so the order of examples is a
function of ``(seed, epoch)`` only, never of the batch sizes chosen; its position is two
integers, which makes checkpoints exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["SampleStream", "split_sizes"]


class SampleStream:
    """Seeded, resumable stream of example indices, epoch after epoch.

    Args:
        num_examples: size of the data set (> 0).
        shuffle: draw a new permutation each epoch (``torch.randperm`` with a generator seeded
            by ``seed + epoch``); False keeps ``0..n-1`` order.
        seed: base seed of the permutations. Under data parallelism every rank uses the same
            stream and takes its own share of each step's indices.
        order: ``order(epoch)`` -> the epoch's indices (int64), replacing the seeded
            permutation, e.g. a DataLoader sampler's (:meth:`autobatch.data.BatchSource.sampler_order`);
            ``num_examples`` is then the epoch's length, which every epoch's order must have.
            It must be a function of the epoch alone, which keeps resuming exact.

    Attributes:
        epoch: the epoch the next index comes from (0-based).
        position: how many indices of that epoch were already handed out.
    """

    def __init__(self, num_examples: int, *, shuffle: bool = True, seed: int = 0,
                 order: Callable[[int], torch.Tensor] | None = None) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1 (got num_examples={num_examples})")
        self.num_examples = num_examples
        self.shuffle = shuffle
        self.seed = seed
        self.order = order
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            if self.order is not None:
                self._order = self.order(self.epoch)
                if len(self._order) != self.num_examples:
                    raise ValueError(
                        f"the sample order of epoch {self.epoch} has {len(self._order)} indices, "
                        f"the first had {self.num_examples}; a sampler must draw the same number "
                        "of examples every epoch"
                    )
            elif self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(self.num_examples, generator=gen)
            else:
                self._order = torch.arange(self.num_examples)
        return self._order

    @property
    def remaining_in_epoch(self) -> int:
        """Indices left before the current epoch ends."""
        return self.num_examples - self.position

    @property
    def epochs_done(self) -> float:
        """Fractional epochs consumed, e.g. 2.5 halfway through the third epoch."""
        return self.epoch + self.position / self.num_examples

    def take(self, n: int) -> torch.Tensor:
        """The next ``min(n, remaining_in_epoch)`` indices (int64, CPU); a step never spans
        two epochs, so the last step of an epoch may be smaller than ``n``."""
        if n < 1:
            raise ValueError(f"take needs n >= 1 (got n={n})")
        order = self._epoch_order()
        end = min(self.position + n, self.num_examples)
        out = order[self.position : end]
        self.position = end
        if self.position >= self.num_examples:
            self.epoch += 1
            self.position = 0
            self._order = None
        return out

    def state_dict(self) -> dict[str, Any]:
        """Position and settings; the permutation itself is re-derived from the seed."""
        return {
            "num_examples": self.num_examples,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; the data set size must match.

        Raises:
            ValueError: for another data set size, or a position outside an epoch
                (``0 <= position < num_examples``, ``epoch >= 0``); nothing is changed.
        """
        if int(state["num_examples"]) != self.num_examples:
            raise ValueError(
                "checkpoint was written for a data set of "
                f"{state['num_examples']} examples, this one has {self.num_examples}; resume "
                "with the same training data"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_examples:
            raise ValueError(
                f"a sample stream state at epoch {epoch}, position {position} is outside the data: the position "
                f"must be in [0, {self.num_examples}) and the epoch >= 0; the state was edited or damaged"
            )
        self.shuffle = bool(state["shuffle"])
        self.seed = int(state["seed"])
        self.epoch, self.position = epoch, position
        self._order = None


def split_sizes(total: int, parts: int) -> list[int]:
    """Split ``total`` examples into ``parts`` nearly equal sizes (the first ones larger by one
    where it does not divide), dropping empty parts: ``split_sizes(10, 4) == [3, 3, 2, 2]``."""
    if parts == 1:
        return [total] if total > 0 else []
    if parts < 1:
        raise ValueError(f"parts must be >= 1 (got parts={parts})")
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts) if base + (i < extra) > 0]
