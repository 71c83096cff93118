"""The `pretrain` stage: pretraining on Ray Train with milestone exports, exact resume and MLflow logging.

  run.py        the driver (and `tinyllama pretrain`): input checks, run placement (fingerprint, --resume), MLflow run, TorchTrainer
  loop.py       the per-worker training loop
  loader.py     prepared shards → mixed, deterministic, O(1)-resumable batches
  schedule.py   steps, milestones, warmup + cosine learning rate
  checkpoint.py resume checkpoints (safetensors via Ray Train) and HF milestone exports
  parallel.py   DDP / FSDP2 behind one interface, AdamW groups
  telemetry.py  MFU, the console progress line, buffered MLflow metrics
  plan.py       `tinyllama plan`: the dry run of a profile (steps, memory per GPU, days)
"""
