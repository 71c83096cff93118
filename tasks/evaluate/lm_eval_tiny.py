"""lm-eval task YAMLs over the tiny profile's held-out items (`{paths.data}/eval/<task>.jsonl`).

Why YAML and not Python Task objects: lm-eval's own loader, request building and metrics then run
exactly as they do for HellaSwag or ARC; only the data is ours. An item is
`{"query", "choices", "gold"}`; lm-eval scores `query + " " + choice` (its default target
delimiter), which is how the corpus states a fact: "<query> <value>.".
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.errors import UserError

TASKS_FILE = "tasks.json"
_METRICS = [{"metric": name, "aggregation": "mean", "higher_is_better": True} for name in ("acc", "acc_norm")]


def read_tiny_tasks(eval_dir: Path) -> dict[str, dict]:
    """The registry `prepare` writes: {task: {"description", "n", "chance"}}; {} when absent."""
    path = Path(eval_dir) / TASKS_FILE
    if not path.is_file():
        return {}
    try:
        registry = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(registry, dict):
        raise UserError(f"{path}: expected an object of tasks, got {type(registry).__name__}")
    return registry


def check_items(path: Path) -> int:
    """Validate every item up front (lm-eval's errors for a bad row are far from readable)."""
    if not path.is_file():
        raise UserError(f"eval.tasks: items file {path} is missing (run `tinyllama prepare`)")
    count = 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not valid JSON") from None
        choices, gold = item.get("choices"), item.get("gold")
        if not isinstance(item.get("query"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{path}:{number}: expected {{'query': str, 'choices': [str, str, ...], 'gold': int}}")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise UserError(f"{path}:{number}: gold {gold!r} is not an index into {len(choices)} choices")
        count += 1
    if not count:
        raise UserError(f"{path}: no items")
    return count


def tiny_task_config(name: str, items: Path) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(Path(items).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": _METRICS,
        "metadata": {"version": 1.0},
    }


def write_tiny_task(name: str, items: bytes, include_dir: Path) -> Path:
    """The task's items (JSON lines) and its YAML, under `include_dir`."""
    items_file = Path(include_dir) / f"{name}.jsonl"
    items_file.parent.mkdir(parents=True, exist_ok=True)
    items_file.write_bytes(items)
    path = Path(include_dir) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_task_config(name, items_file), sort_keys=False))
    return path
