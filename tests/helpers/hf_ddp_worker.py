"""One process of an AdaptiveBatchTrainer run: ``torchrun --nproc-per-node=2 hf_ddp_worker.py OUT``
(the Trainer's DDP on gloo), or plain ``python hf_ddp_worker.py OUT`` for one process. Trains the
tiny GPT-2 of examples/hf_trainer_example.py on its padded character data (token-mean losses)
and writes the batch sizes, losses, noise scale and weights to ``OUT/rank<r>.json``."""

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from transformers import TrainingArguments  # noqa: E402
from transformers.utils import logging  # noqa: E402

from autobatch.integrations.transformers import AdaptiveBatchTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("hf_trainer_example", ROOT / "examples" / "hf_trainer_example.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def main() -> None:
    out = Path(sys.argv[1])
    max_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    torch.set_num_threads(1)
    logging.set_verbosity_error()
    train, _, vocab = example.make_dataset(num_sequences=256)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=4, max_steps=max_steps,
                             optim="sgd", learning_rate=0.3, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0,
                             **({"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}))
    trainer = AdaptiveBatchTrainer(model=example.tiny_gpt2(vocab), args=args, train_dataset=train,
                                   data_collator=example.collate,
                                   autobatch_config={"decide_every": 5, "policy": "gns", "initial_batch_size": 4,
                                                     "noise_multiplier": 8, "max_micro_batch_size": 4})
    trainer.train()
    history = trainer.history
    model = trainer.accelerator.unwrap_model(trainer.model)
    result = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "batch_sizes": [r.batch_size for r in history],
        "examples": [r.examples for r in history],
        "losses": [r.train_loss for r in history],
        "noise_scale": [r.noise_scale for r in history],
        "samples": history[-1].samples,
        "weights": {k: v.tolist() for k, v in model.state_dict().items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{args.process_index}.json").write_text(json.dumps(result))
    if args.world_size > 1:
        sys.path.insert(0, str(Path(__file__).parent))
        from ddp_exit import finish

        finish()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
