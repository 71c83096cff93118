"""Prefect flows: orchestration only, over the stages dvc.yaml defines."""
