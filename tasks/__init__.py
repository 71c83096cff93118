"""The pipeline's stages as plain functions with typed inputs (no Prefect, no DAG logic)."""
