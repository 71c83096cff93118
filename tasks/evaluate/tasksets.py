"""Which lm-eval tasks a profile runs, and where their data comes from.

One resolver for every caller (the `evaluate` stage and the per-milestone Ray task), so a name is
judged the same way everywhere, and every problem is reported before any model is loaded:
1. a tiny-profile task listed in `<eval dir>/tasks.json` (prepare's held-out items);
2. with `eval.data_dir` set, one of the seven benchmarks read from local original-schema files;
3. without it, lm-eval's own task of that name (downloads its dataset from the Hub).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import UserError
from tasks.evaluate.lm_eval_offline import OFFLINE_TASKS, load_offline_rows, offline_task_config, write_offline_task
from tasks.evaluate.lm_eval_tiny import check_items, read_tiny_tasks, tiny_task_config, write_tiny_task
from tasks.files import sha256_bytes, sha256_json
from tasks.layout import EVAL_TASKS_FILE, Layout
from tasks.params import Params


@dataclass(frozen=True)
class TaskSet:
    names: list[str]
    include_dir: Path | None       # generated YAMLs (None: lm-eval's packaged tasks only)
    include_defaults: bool         # whether lm-eval's packaged tasks are indexed too
    chance: dict[str, float] = field(default_factory=dict)
    fingerprint: str = ""          # changes when any task's data, generated config or eval setting changes
    data_notes: dict[str, str] = field(default_factory=dict)  # which file and how many rows scored each offline task

    def task_manager(self):
        return _task_manager(str(self.include_dir) if self.include_dir else None, self.include_defaults)


@functools.lru_cache(maxsize=4)
def _task_manager(include_dir: str | None, include_defaults: bool):
    """Indexing lm-eval's ~15k packaged YAMLs takes a minute on 2 busy cores: do it once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_dir, include_defaults=include_defaults)


def tiny_eval_dir(params: Params) -> Path:
    return eval_data_dir(params) or Layout.from_params(params).eval_items_dir


def eval_data_dir(params: Params) -> Path | None:
    """`eval.data_dir` on this machine: a local dir as it is, a URI (s3://…) copied once from shared storage."""
    from tasks.remote_inputs import local_input_dir

    return local_input_dir(params.eval.data_dir, "eval.data_dir") if params.eval.data_dir else None


def _unknown_to_lm_eval(names: list[str]) -> list[str]:
    """Names lm-eval does not register. A name that occurs nowhere in the packaged YAML text cannot be
    registered, which rejects typos in seconds; only the rest pay for lm-eval's own (slow) index."""
    import lm_eval.tasks

    root, pending = Path(lm_eval.tasks.__file__).parent, set(names)
    mentioned = set()
    for path in root.rglob("*.yaml"):
        text = path.read_text(errors="ignore")
        mentioned |= {name for name in pending if name in text}
    if mentioned != pending:
        return [name for name in names if name not in mentioned]
    known = set(_task_manager(None, True).all_tasks)
    return [name for name in names if name not in known]


@dataclass(frozen=True)
class TaskBundle:
    """A profile's tasks, read and checked, their rows in memory: what a milestone eval needs, shippable to
    a Ray task on another node (it reads no file of the driver's). `write` turns it into a TaskSet there."""

    names: list[str]
    rows: dict[str, bytes]        # JSON lines per generated task (tiny items, adapted offline rows)
    offline: tuple[str, ...]      # which of them are the seven benchmarks (lm-eval's own configs)
    include_defaults: bool
    chance: dict[str, float]
    fingerprint: str
    data_notes: dict[str, str]

    def write(self, include_dir: Path) -> TaskSet:
        """The YAMLs (and rows) lm-eval reads, under `include_dir`."""
        for name, rows in self.rows.items():
            if name in self.offline:
                write_offline_task(OFFLINE_TASKS[name], rows, include_dir)
            else:
                write_tiny_task(name, rows, include_dir)
        return TaskSet(names=self.names, include_dir=Path(include_dir) if self.rows else None,
                       include_defaults=self.include_defaults, chance=self.chance, fingerprint=self.fingerprint,
                       data_notes=self.data_notes)


def build_taskset(params: Params, include_dir: Path) -> TaskSet:
    """Validate `eval.tasks` and write the YAMLs (and adapted rows) they need into `include_dir`."""
    return collect_tasks(params).write(include_dir)


def collect_tasks(params: Params) -> TaskBundle:
    """Validate `eval.tasks` and read every task's rows; every problem is reported before any model loads."""
    names = list(params.eval.tasks)
    if not names:
        raise UserError("eval.tasks: empty list (name at least one task)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"eval.tasks: {dupes[0]!r} is listed twice")
    eval_dir = tiny_eval_dir(params)
    tiny = read_tiny_tasks(eval_dir)
    data_dir = eval_data_dir(params)
    online = [n for n in names if n not in tiny and (data_dir is None or n not in OFFLINE_TASKS)]
    if online:
        if data_dir is not None:
            raise UserError(f"eval.tasks: {online[0]!r} has no offline copy: with eval.data_dir set, tasks must be "
                            f"listed in {eval_dir / EVAL_TASKS_FILE} or be one of {', '.join(OFFLINE_TASKS)}")
        unknown = _unknown_to_lm_eval(online)
        if unknown:
            raise UserError(f"eval.tasks: unknown task {unknown[0]!r} (not in {eval_dir / EVAL_TASKS_FILE} "
                            f"and not an lm-eval task)")

    rows, offline, chance, data_hashes, configs, notes = {}, [], {}, {}, {}, {}
    for name in names:
        if name in tiny:
            items = eval_dir / f"{name}.jsonl"
            check_items(items)
            rows[name] = items.read_bytes()
            chance[name] = float(tiny[name].get("chance", 0.0))
            configs[name] = _portable(tiny_task_config(name, items))
        elif name in OFFLINE_TASKS and data_dir is not None:
            path, adapted = load_offline_rows(OFFLINE_TASKS[name], data_dir)
            notes[name] = f"{path.name}, {len(adapted)} rows of the {OFFLINE_TASKS[name].split} split"
            rows[name] = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in adapted).encode()
            offline.append(name)
            chance[name] = _offline_chance(name, adapted)
            configs[name] = _portable(offline_task_config(OFFLINE_TASKS[name], data_dir))
        data_hashes[name] = sha256_bytes(rows[name]) if name in rows else "lm-eval packaged"
    import lm_eval

    fingerprint = sha256_json({"tasks": names, "data": data_hashes, "configs": configs,
                               "num_fewshot": params.eval.num_fewshot, "limit": params.eval.limit,
                               "lm_eval": lm_eval.__version__})
    return TaskBundle(names=names, rows=rows, offline=tuple(offline), include_defaults=bool(online),
                      chance=chance, fingerprint=fingerprint, data_notes=notes)


def _portable(config: dict) -> dict:
    """A generated task config as it enters the fingerprint: without the data file's location (the data
    is hashed on its own; its temp path differs per run) and with lm-eval's packaged YAML by name (its
    content is lm-eval's version)."""
    import lm_eval.tasks

    portable = {key: value for key, value in config.items() if key != "dataset_kwargs"}
    if "include" in portable:
        portable["include"] = Path(portable["include"]).relative_to(Path(lm_eval.tasks.__file__).parent).as_posix()
    return portable


def _offline_chance(name: str, rows: list[dict]) -> float:
    """Expected accuracy of a uniform guess, from the rows' own choice counts."""
    counts = {"hellaswag": lambda r: len(r["endings"]), "boolq": lambda r: 2, "piqa": lambda r: 2,
              "winogrande": lambda r: 2}.get(name, lambda r: len(r["choices"]["text"]))
    return sum(1.0 / counts(row) for row in rows) / len(rows)
