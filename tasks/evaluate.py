"""`tinyllama evaluate`: the CLI entry the stage table points at; the work is in tasks/evaluation/."""

from tasks.evaluation import add_arguments, evaluate, main, submit_milestone_eval

__all__ = ["add_arguments", "evaluate", "main", "submit_milestone_eval"]
