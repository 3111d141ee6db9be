"""Adaptive batch size in a Hugging Face Trainer: swap ``Trainer`` for ``AdaptiveBatchTrainer``.

A tiny GPT-2 (2 layers, width 32, built from a config: nothing is downloaded) learns
character-level text taken from Python's own standard library sources. The data set is a list
of dicts of variable-length token ids; the collator pads each micro-batch. Everything else
is a plain Trainer setup: ``per_device_train_batch_size`` is where B starts, the linear LR
schedule and logging are the Trainer's, and ``trainer.state.log_history`` gains
``batch_size`` and ``noise_scale``.

Run: ``python examples/hf_trainer_example.py`` (CPU, about 10 s).
"""

from __future__ import annotations

import inspect
import random
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.utils import logging

from autobatch.integrations.transformers import AdaptiveBatchTrainer


def stdlib_text() -> str:
    """Source code of a few standard-library modules: a few hundred kB of real text."""
    import argparse
    import textwrap

    return "".join(inspect.getsource(module) for module in (random, textwrap, argparse))


def make_dataset(num_sequences: int = 512, min_len: int = 12, max_len: int = 32, seed: int = 0):
    """``(train, eval, vocab_size)``: lists of ``{"input_ids": [...]}`` with random lengths in
    ``[min_len, max_len]``, cut from the text at random places (id 0 is padding)."""
    text = stdlib_text()
    vocab = {c: i + 1 for i, c in enumerate(sorted(set(text)))}
    ids = [vocab[c] for c in text]
    rng = random.Random(seed)

    def sample(n: int) -> list[dict[str, list[int]]]:
        out = []
        for _ in range(n):
            length = rng.randint(min_len, max_len)
            start = rng.randrange(len(ids) - length)
            out.append({"input_ids": ids[start : start + length]})
        return out

    return sample(num_sequences), sample(num_sequences // 8), len(vocab) + 1


def collate(items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the (micro-)batch; padded labels are -100 (no loss)."""
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.zeros(len(items), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, item in enumerate(items):
        ids = torch.tensor(item["input_ids"])
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = ids
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 of width 32, no dropout (so runs are deterministic)."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def main(epochs: float = 3.0, output_dir: str | None = None) -> AdaptiveBatchTrainer:
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    train, evaluation, vocab_size = make_dataset()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp, per_device_train_batch_size=8, num_train_epochs=epochs,
            learning_rate=3e-3, lr_scheduler_type="linear", logging_steps=10, save_strategy="no",
            report_to=[], use_cpu=True, disable_tqdm=True,
        )
        trainer = AdaptiveBatchTrainer(
            model=tiny_gpt2(vocab_size), args=args, train_dataset=train, eval_dataset=evaluation,
            data_collator=collate, autobatch_config={"decide_every": 5, "max_batch_size": 256},
        )
        trainer.train()
        metrics = trainer.evaluate()
    history = trainer.history
    changes = [(r.step, r.batch_size) for i, r in enumerate(history) if i == 0 or history[i - 1].batch_size != r.batch_size]
    print(f"{len(history)} steps; B (step, size): {changes}")
    print(f"train loss {history[0].train_loss:.3f} -> {history[-1].train_loss:.3f}; "
          f"eval loss {metrics['eval_loss']:.3f}; noise scale at the end {history[-1].noise_scale:.1f}")
    return trainer


if __name__ == "__main__":
    main()
