-- One Postgres for both services: MLflow's database is POSTGRES_DB, Prefect gets its own.
CREATE DATABASE prefect;
