"""The training library the pretrain, sft and dpo stages share: one loop on Ray Train.

  loop.py        the per-worker training loop (`Trainer`)
  objective.py   what an objective supplies to the loop (pretraining, SFT, DPO)
  schedule.py    steps, milestones, warmup + cosine learning rate
  checkpoint.py  resume checkpoints (safetensors via Ray Train) and HF milestone exports
  parallel.py    DDP / FSDP2 behind one interface, AdamW groups
  telemetry.py   MFU, the console progress line, buffered MLflow metrics
"""
