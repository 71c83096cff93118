"""`tinyllama pretrain`: pretraining on Ray Train with milestone exports, exact resume and MLflow logging.

  run.py        the driver: input checks, run placement (fingerprint, --resume), MLflow run, TorchTrainer
  loop.py       the per-worker training loop
  data.py       prepared shards → mixed, deterministic, O(1)-resumable batches
  schedule.py   steps, milestones, warmup + cosine learning rate
  checkpoint.py resume checkpoints (safetensors via Ray Train) and HF milestone exports
  parallel.py   DDP / FSDP2 behind one interface, AdamW groups
  telemetry.py  MFU, the console progress line, buffered MLflow metrics
"""

from __future__ import annotations

from tasks.params import add_params_argument, load_params


def add_arguments(parser) -> None:
    add_params_argument(parser)
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto (default): continue this recipe's last run from its newest valid checkpoint "
                             "if it did not finish; never: discard it and start over")


def main(args) -> int:
    from tasks.pretrain.run import pretrain

    pretrain(load_params(args.params), resume=args.resume)
    return 0
