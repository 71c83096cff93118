"""The Ray Serve application (OpenAI-compatible HTTP); depends on model/ only."""
