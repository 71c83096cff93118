"""The `evaluate` stage and per-milestone evaluation: lm-eval on every pretraining milestone.

`submit_milestone_eval` is what pretraining calls as each milestone lands; `add_arguments` / `main`
are the CLI stage (`tinyllama evaluate`). Heavy imports (lm-eval, torch, Ray, MLflow) happen
inside the functions, so importing this package is cheap.
"""

from tasks.evaluation.milestone import submit_milestone_eval
from tasks.evaluation.stage import add_arguments, evaluate, main

__all__ = ["add_arguments", "evaluate", "main", "submit_milestone_eval"]
