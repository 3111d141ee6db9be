"""A small character-level transformer on Python standard-library source text.

The text ships with every Python: a fixed list of standard-library modules (present in
3.10 to 3.13), read in that order from ``sysconfig.get_paths()["stdlib"]``, joined and cut
at ``max_chars``. It is the same on every run with the same interpreter; another Python
version ships slightly different source, hence slightly different text and numbers.
Characters outside printable ASCII (and newline) become ``?`` so the vocabulary stays
small; the vocabulary is the sorted set of characters of the text.

The text is cut into windows of ``context + 1`` characters that overlap by one (each
character is a target exactly once); every ``val_every``-th window is held out. One example
is ``(window[:-1], window[1:])``: two int64 tensors of shape ``(context,)``.
"""

from __future__ import annotations

import functools
import os
import sysconfig

import torch
from torch import nn

from autobatch.problems import Problem, _seeded_model

__all__ = ["STDLIB_MODULES", "CharTransformer", "build", "load_text"]

# Fixed order; all are pure-Python modules in 3.10-3.13 with (nearly) ASCII source.
STDLIB_MODULES: tuple[str, ...] = (
    "argparse.py",
    "difflib.py",
    "dataclasses.py",
    "textwrap.py",
    "calendar.py",
    "string.py",
    "queue.py",
    "sched.py",
)


@functools.lru_cache(maxsize=2)
def load_text(max_chars: int = 300_000) -> str:
    """The training text: :data:`STDLIB_MODULES` joined, non-ASCII mapped to ``?``, cut at
    ``max_chars`` characters.

    Raises:
        FileNotFoundError: if a module's source is missing (a stripped-down Python install).
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in STDLIB_MODULES:
        path = os.path.join(stdlib, name)
        try:
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"the charlm example reads Python's standard-library source, but {path} is "
                "missing (an install without .py sources?); use another example or install "
                "the full standard library"
            ) from err
    text = "\n".join(parts)[:max_chars]
    return "".join(c if c == "\n" or " " <= c <= "~" else "?" for c in text)


@functools.lru_cache(maxsize=2)
def _windows(
    max_chars: int, context: int, val_every: int
) -> tuple[str, torch.Tensor, torch.Tensor]:
    text = load_text(max_chars)
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    count = (ids.numel() - 1) // context
    # Window k covers characters [k*context, (k+1)*context]: inputs its first T, targets its last T.
    windows = ids[: count * context + 1].unfold(0, context + 1, context)
    is_val = torch.arange(count) % val_every == val_every - 1
    return vocab, windows[~is_val], windows[is_val]


class CharTransformer(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, pre-norm causal
    self-attention blocks (no dropout), a final LayerNorm and a linear head.

    Takes ``(N, T)`` int64 character ids with ``T <= context`` and returns ``(N, T, vocab)``
    logits, position ``t`` predicting character ``t + 1``.
    """

    def __init__(
        self, vocab_size: int, context: int = 64, d_model: int = 64, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(context, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        mask = nn.Transformer.generate_square_subsequent_mask(context)  # -inf above the diagonal
        self.register_buffer("causal_mask", mask, persistent=False)
        # GPT-2 style small init: the logits start near zero, so the initial loss is ~log(vocab).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(
                f"sequence length must be <= context={self.context} (got {t}); crop the input"
            )
        h = self.tokens(ids) + self.positions(torch.arange(t, device=ids.device))
        h = self.blocks(h, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _sequence_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Mean over every position of every sequence: a sequence counts as `T` predictions.
    return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def _adamw(params, lr: float) -> torch.optim.Optimizer:  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def build(
    seed: int = 0,
    *,
    max_chars: int = 300_000,
    context: int = 64,
    d_model: int = 64,
    heads: int = 4,
    layers: int = 2,
    val_every: int = 10,
) -> Problem:
    """The character-level language model example: AdamW, metric ``val_loss`` in nats per
    character (lower is better).

    Args:
        seed: seeds the model initialisation.
        max_chars: characters of text used (train + validation).
        context: sequence length ``T`` of each example.
        d_model: embedding width; ``heads`` must divide it.
        heads: attention heads.
        layers: transformer blocks.
        val_every: every ``val_every``-th window is held out (10 -> 10% validation).
    """
    errors = []
    if context < 1 or max_chars < 2 * context + 2:
        errors.append(
            "need context >= 1 and max_chars >= 2*context+2 "
            f"(got context={context}, max_chars={max_chars})"
        )
    if d_model % heads:
        errors.append(f"heads must divide d_model (got d_model={d_model}, heads={heads})")
    if val_every < 2:
        errors.append(f"val_every must be >= 2 (got val_every={val_every}); 10 holds out 10%")
    if errors:
        raise ValueError("; ".join(errors))
    vocab, train, val = _windows(max_chars, context, val_every)
    make_model = functools.partial(CharTransformer, len(vocab), context, d_model, heads, layers)
    return Problem(
        name="charlm",
        model_fn=functools.partial(_seeded_model, make_model, seed),
        train_data=(train[:, :-1].clone(), train[:, 1:].clone()),
        val_data=(val[:, :-1].clone(), val[:, 1:].clone()),
        loss_fn=_sequence_cross_entropy,
        metric_name="val_loss",
        higher_is_better=False,
        target=1.6,
        default_lr=3e-3,
        default_batch_size=32,
        default_epochs=10,
        optimizer=_adamw,
        classification=True,
        description=(
            f"character transformer ({layers} layers, d_model {d_model}) on Python stdlib source, "
            "AdamW; target val_loss 1.6 nats/char"
        ),
        options={
            "max_chars": max_chars, "context": context, "d_model": d_model, "heads": heads,
            "layers": layers, "val_every": val_every, "vocab": vocab,
        },
    )
