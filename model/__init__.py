"""The Llama architecture in plain torch; knows nothing of Ray, Prefect or MLflow."""
