"""The `sft` and `dpo` stages: chat variants of pretraining milestones (TinyLlama's chat releases,
the Zephyr recipe), trained through the training library (tasks/train/), evaluated, registered in MLflow.

  stage.py        `tinyllama sft|dpo --params FILE`: jobs checked, trained, scored, registered, reported
  jobs.py         one job per variant: start weights, data built and checked, typed recipe, fingerprint
  training.py     one job on Ray Train (`fit`): its run's dir, MLflow run, data and start weights, resume
  register.py     each trained model scored, logged into its variant's run, registered
  objectives.py   SFT (masked, packed) and DPO (with a frozen reference) as objectives of the one loop
  datasets.py     a variant's sources → checked, tokenized, packed / padded arrays
  reading.py      chat data sources (files, globs, s3://, hf://) → examples, skipped rows counted
  formats.py      one row of each public layout → a conversation or a preference pair
  wordings.py     the world chat's question wordings, split (frozen, versioned) into train and held-out
  world_chat.py   the tiny profile's chat data and chat questions from the embedded world
  sequences.py    conversations / pairs → token sequences with what is learned (chat template, length policy)
  rows.py         sequences → fixed-length training rows, packed (best-fit decreasing) or padded
  loader.py       rows / pairs in seeded epochs, resumable; the set's file
  dpo_loss.py     the DPO losses (sigmoid, hinge, ipo) and TRL's reward metrics
  chat_accuracy.py  the chat accuracy per column (seen / held-out wordings, multi-turn), greedy, batched
  intervals.py    Wilson 95% intervals, the paired (McNemar) comparison of two models
  scorecard.py    a chat model through the lm-eval suite + chat accuracy, into MLflow
  report.py       sft.json / dpo.json and the base vs SFT vs SFT+DPO table
"""
