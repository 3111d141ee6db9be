"""autobatch: pick the batch size of a PyTorch training run automatically, and keep re-picking it.

The public surface is small; everything else lives in private or submodule-level names.
"""

from __future__ import annotations

from autobatch._version import __version__
from autobatch.gns import GradientNoiseScale, two_batch_estimates

__all__ = [
    "GradientNoiseScale",
    "__version__",
    "two_batch_estimates",
]
