"""Device memory: the probe for the largest micro-batch that fits, and OOM handling.

- :mod:`~autobatch.memory.probe`: :func:`probe_memory` and its result.
- :mod:`~autobatch.memory._step` / :mod:`~autobatch.memory._count`: the fake-tensor training
  step and its live-storage byte count.
- :mod:`~autobatch.memory.oom`: recognising OOM errors, freeing after one, and
  :class:`MemoryBudget`, a CPU budget that raises a real ``torch.OutOfMemoryError``.
"""

from __future__ import annotations

from autobatch.memory.oom import MemoryBudget, is_oom_error, release_after_oom
from autobatch.memory.probe import MemoryProbeResult, probe_memory

__all__ = ["MemoryBudget", "MemoryProbeResult", "is_oom_error", "probe_memory", "release_after_oom"]
