"""The `evaluate` stage: lm-eval on every pretraining milestone, reported and logged to MLflow.

  stage.py            the stage (and `tinyllama evaluate`): score every milestone (cache first), EVAL-style table,
                      MLflow
  during_training.py  one milestone's eval as a Ray task the moment pretraining exports it
  checkpoints.py      which dirs are scored and what identifies them (weights sha256)
  scoring.py          one checkpoint: lm-eval tasks + val perplexity, through the score cache
  harness.py          lm-eval's `simple_evaluate` on our HF dirs
  tasksets.py         which lm-eval tasks a profile runs and where their data comes from
  lm_eval_tiny.py     lm-eval task configs over the tiny profile's held-out items
  lm_eval_offline.py  the seven commonsense tasks from local original-schema files
  perplexity.py       perplexity on the prepared val split
  report.py           eval.json, the EVAL.md-style table, CSV and plot
  mlflow_log.py       scores into the pretrain run with step = tokens seen
"""
