"""The `deploy` stage and `tinyllama serve`: the champion on Ray Serve (the app itself is serving/).

  stage.py      the stage (`tinyllama deploy`): lineage, Serve config, `serve deploy`, check, gate, metrics/serve.json
  serve.py      `tinyllama serve`: the server on a local Ray until stopped
  config.py     the Serve config (Ray's schema) and the lineage file
  champion.py   which weights: a model dir, or a registry reference resolved to one
  check.py      the openai-client smoke check and measurements
  gate.py       lm-eval through the API must score as in-process scoring of the same weights
  mlflow_log.py the deploy MLflow run
  ray_serve.py  a local Ray + Serve's proxy for the block, and waiting for /health
"""
