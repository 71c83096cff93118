"""The `pretrain` stage: pretraining on Ray Train with milestone exports, exact resume and MLflow logging.

  stage.py      `tinyllama pretrain`: input checks, run placement (fingerprint, --resume), MLflow run, `fit`
  loader.py     prepared shards → mixed, deterministic, O(1)-resumable batches
  plan.py       `tinyllama plan`: the dry run of a profile (steps, memory per GPU, days)

The training itself (the loop, checkpoints, parallel wrapper, schedule) is the library in tasks/train/.
"""
