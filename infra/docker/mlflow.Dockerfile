# The MLflow tracking server of infra/docker-compose.yaml: Postgres for runs, MinIO (S3) for artifacts, the
# basic-auth app (mlflow[auth]: Flask-WTF) in front of both.
FROM python:3.11-slim-bookworm
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" flask-wtf==1.3.0 "psycopg[binary]==3.3.9" boto3==1.43.117
EXPOSE 5000
