"""Adaptive batch size in PyTorch Lightning: add ``AdaptiveBatchSize`` to the Trainer's callbacks.

The LightningModule below is an ordinary one (MNIST-1D's small CNN, SGD, a step LR schedule,
a validation step), and so is the DataLoader. The callback takes the DataLoader's batch size
as the micro-batch, grows the global batch through the number of accumulated micro-batches as
the gradient noise scale grows, multiplies the scheduled LR by the batch-size factor, and logs
``batch_size`` and ``noise_scale`` to the Trainer's loggers.

Run: ``python examples/lightning_example.py`` (CPU, about 15 s; MNIST-1D is generated locally).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from autobatch.integrations.lightning import AdaptiveBatchSize
from autobatch.registry import get_problem


class MNIST1DClassifier(pl.LightningModule):
    """MNIST-1D's CNN, trained with plain SGD; nothing here knows about autobatch."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.example = get_problem("mnist1d", seed=0)
        self.net = self.example.model_fn()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.example.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.example.loss_fn(logits, y))
        self.log("val_accuracy", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


def main(epochs: int = 4) -> AdaptiveBatchSize:
    warnings.filterwarnings("ignore", module="lightning")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MNIST1DClassifier()
    (x, y), (x_val, y_val) = model.example.train_data, model.example.val_data
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=500)
    adaptive = AdaptiveBatchSize(max_batch_size=1024)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[adaptive], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train, val)
    history = adaptive.history
    changes = [(r.step, r.batch_size) for i, r in enumerate(history) if i == 0 or history[i - 1].batch_size != r.batch_size]
    print(f"{len(history)} steps; B (step, size): {changes}")
    print(f"noise scale at the end {history[-1].noise_scale:.0f}; "
          f"val_accuracy {float(trainer.callback_metrics['val_accuracy']):.3f}")
    return adaptive


if __name__ == "__main__":
    main()
