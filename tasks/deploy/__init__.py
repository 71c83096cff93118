"""`tinyllama deploy`: the DAG's last stage (filled in below)."""
