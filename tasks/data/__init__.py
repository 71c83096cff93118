"""The `prepare` stage: raw corpora → packed token shards + manifest (the `prepare` stage).

  stage.py     the stage (and `tinyllama prepare`): staging dir, per-source shards, manifest, atomic publish
  sources.py   readers for every corpus format (local, glob, s3://, builtin)
  encoding.py  the tokenizer process pool
  packing.py   rows of seq_len + 1 ids, the train/val split by document
  shards.py    Parquet shard writing
  corpus/      the embedded, deterministic corpus of the tiny profile and its held-out eval items
"""
