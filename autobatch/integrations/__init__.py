"""Adaptive batch size inside the trainers people already use.

- :mod:`autobatch.integrations.lightning`: :class:`~autobatch.integrations.lightning.AdaptiveBatchSize`,
  a PyTorch Lightning ``Callback`` (``pip install "torch-autobatch[lightning]"``).
- :mod:`autobatch.integrations.transformers`:
  :class:`~autobatch.integrations.transformers.AdaptiveBatchTrainer`, a drop-in subclass of
  ``transformers.Trainer`` (``pip install "torch-autobatch[transformers]"``).

Both are built from the custom-loop kit (:class:`~autobatch.train.controller.BatchSizeController`,
:class:`~autobatch.train.sampler.SampleStream`, :class:`~autobatch.noise.micro_batch.MicroBatchNormCollector`)
and take the same settings as :func:`autobatch.fit` (a :class:`~autobatch.config.FitConfig` or flat
keywords). Nothing here is imported by ``import autobatch``; each submodule imports its trainer.
"""

from __future__ import annotations
