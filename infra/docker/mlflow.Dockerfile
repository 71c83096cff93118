# The MLflow tracking server of infra/docker-compose.yaml: Postgres for runs, MinIO (S3) for artifacts.
FROM python:3.11-slim-bookworm
RUN pip install --no-cache-dir mlflow==3.17.2 "psycopg[binary]==3.3.9" boto3==1.43.117
EXPOSE 5000
