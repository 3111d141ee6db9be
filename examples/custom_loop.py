"""Adaptive batch size in your own training loop, with autobatch's lower-level pieces.

``autobatch.fit`` does all of this for you; use these pieces when your loop must stay yours.
Three objects carry the state:

- ``SampleStream``: the epoch's seeded order, handing out the next B indices for any B;
- ``MicroBatchNormCollector``: records each micro-batch's squared gradient norm during backward;
- ``BatchSizeController``: estimator + policy + LR rule; splits a step into micro-batches,
  returns the LR factor for the current B and re-decides B.

``accumulate_gradients`` runs the step's micro-batches with each mean loss weighted by its loss
items over the step's (examples here; tokens for a padded LM), so ``.grad`` is the gradient of
the step's mean loss, as ``fit`` computes it.

Run: ``python examples/custom_loop.py`` (MNIST-1D CNN, a few epochs, on the CPU).
"""

from __future__ import annotations

import torch

from autobatch.accumulate import accumulate_gradients
from autobatch.noise import GradientNoiseScale, MicroBatchNormCollector
from autobatch.policies import GNSPolicy
from autobatch.registry import get_problem
from autobatch.scaling import AdaScaleScaling
from autobatch.train import BatchSizeController, SampleStream


def main(epochs: float = 4.0) -> None:
    ex = get_problem("mnist1d", seed=0)
    model = ex.model_fn()
    base_lr, b0 = ex.default_lr, ex.default_batch_size
    opt = torch.optim.SGD(model.parameters(), lr=base_lr)
    inputs, targets = ex.train_data
    stream = SampleStream(len(targets), seed=0)
    controller = BatchSizeController(
        policy=GNSPolicy(max_growth=2.0, hysteresis=0.05),
        scaling=AdaScaleScaling(),
        estimator=GradientNoiseScale(smoothing=0.95),
        base_batch_size=b0, min_batch_size=b0, max_batch_size=1024, decide_every=10,
        max_lr_factor=2.0,  # fit's default: the LR never exceeds 2x the base LR
    )
    step = samples = 0
    with MicroBatchNormCollector(model) as norms:
        while stream.epochs_done < epochs:
            step += 1                                              # this step's number, from 1
            indices = stream.take(controller.batch_size)          # the step's examples
            for group in opt.param_groups:                         # LR for this B
                group["lr"] = base_lr * controller.lr_factor(step)
            opt.zero_grad(set_to_none=True)
            norms.begin_step()
            micro_batches = [(inputs[c], targets[c]) for c in indices.split(controller.micro_sizes(len(indices)))]
            done = accumulate_gradients(                           # each loss x its items / the step's
                model, micro_batches, loss_fn=ex.loss_fn,
                after_backward=lambda m: norms.after_backward(batch_size=m.items, loss_weight=m.weight))
            step_norms = norms.end_step()                          # before any clipping
            opt.step()
            samples += len(indices)
            controller.observe(step=step, epoch=stream.epochs_done, samples=samples, batch_size=len(indices),
                               norms=step_norms, loss=float(done.loss))  # the loss feeds the policy's guard
            if (new_b := controller.maybe_decide()) is not None:
                print(f"step {step}: B -> {new_b} (noise scale {controller.estimator.noise_scale:.1f})")
    print(f"{step} steps, {samples} samples:", ex.evaluate(model, ex.val_data))


if __name__ == "__main__":
    main()
