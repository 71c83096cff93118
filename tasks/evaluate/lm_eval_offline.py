"""The seven TinyLlama benchmarks offline: lm-eval's own task configs, pointed at local files.

`eval.data_dir` holds the datasets in their *original* schemas (the layout of ../shared/assets/eval:
`<task>/<file>`), while lm-eval's configs read the Hugging Face schemas. Each adapter below converts
rows, nothing more; the generated YAML `include`s the packaged lm-eval config, so its prompts,
`process_docs`, choices and metrics are used unchanged and only `dataset_path`/`data_files`/splits
differ. TinyLlama's EVAL.md scored the same splits: ARC and OBQA test; the others validation.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.errors import UserError


@dataclass(frozen=True)
class OfflineTask:
    name: str
    packaged_yaml: str          # relative to lm_eval/tasks/
    split: str                  # "test" or "validation": the split lm-eval scores for this task
    keywords: tuple[str, ...]   # a data file's name contains one of these (case-insensitive)
    adapters: dict[str, Callable[[Path], list[dict]]]  # file suffix -> rows in the HF schema


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{number}: not valid JSON") from None
    return rows


def _field(path: Path, number: int, row: dict, *keys: str):
    value = row
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise UserError(f"{path}:{number}: missing field {'.'.join(keys)!r}")
        value = value[key]
    return value


def _ai2_choices(path: Path, number: int, row: dict) -> dict:
    choices = _field(path, number, row, "question", "choices")
    return {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}


def arc_rows(path: Path) -> list[dict]:
    """AI2 original {"question": {"stem", "choices": [{text, label}]}} -> HF `question` (str) + `choices`."""
    return [{"id": row.get("id", str(n)), "question": _field(path, n, row, "question", "stem"),
             "choices": _ai2_choices(path, n, row), "answerKey": _field(path, n, row, "answerKey")}
            for n, row in enumerate(_jsonl(path), 1)]


def openbookqa_rows(path: Path) -> list[dict]:
    """OpenBookQA original (same nesting as ARC) -> HF `question_stem` + `choices`."""
    return [{"id": row.get("id", str(n)), "question_stem": _field(path, n, row, "question", "stem"),
             "choices": _ai2_choices(path, n, row), "answerKey": _field(path, n, row, "answerKey")}
            for n, row in enumerate(_jsonl(path), 1)]


def piqa_rows(path: Path) -> list[dict]:
    """PIQA keeps labels in a line-aligned `<name with valid-labels>.lst` beside `valid.jsonl`."""
    labels_path = path.with_name(path.name.replace("valid", "valid-labels", 1)).with_suffix(".lst")
    if not labels_path.is_file():
        raise UserError(f"eval.data_dir: PIQA labels file {labels_path} is missing (it pairs with {path.name})")
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    rows = _jsonl(path)
    if len(labels) != len(rows):
        raise UserError(f"{labels_path}: {len(labels)} labels for {len(rows)} rows in {path.name}")
    out = []
    for n, (row, label) in enumerate(zip(rows, labels), 1):
        if label not in ("0", "1"):
            raise UserError(f"{labels_path}:{n}: label {label!r} is not 0 or 1")
        out.append({"goal": _field(path, n, row, "goal"), "sol1": _field(path, n, row, "sol1"),
                    "sol2": _field(path, n, row, "sol2"), "label": int(label)})
    return out


def boolq_rows(path: Path) -> list[dict]:
    """SuperGLUE packaging (label "true"/"false") or Google's original (title + answer: bool) -> label 0/1
    and the SuperGLUE passage "Title -- text" that lm-eval's prompt shows."""
    out = []
    for n, row in enumerate(_jsonl(path), 1):
        answer = row["label"] if "label" in row else _field(path, n, row, "answer")
        truth = {"true": 1, "false": 0, True: 1, False: 0}.get(  # 1 and 0 match True and False
            answer.lower() if isinstance(answer, str) else answer)
        if truth is None:
            raise UserError(f"{path}:{n}: BoolQ answer {answer!r} is not true/false")
        passage = _field(path, n, row, "passage")
        if "title" in row and "label" not in row:
            passage = f"{row['title']} -- {passage}"
        out.append({"question": _field(path, n, row, "question"), "passage": passage,
                    "idx": row.get("idx", n - 1), "label": truth})
    return out


_SENTENCE_TAIL = re.compile(r"^(.*[.!?]) (\S.*)$", re.DOTALL)


def _split_ctx(ctx: str) -> tuple[str, str]:
    """Split the joined HellaSwag `ctx` back into (ctx_a, ctx_b). ctx_b is the lower-case sentence start
    the endings continue (ActivityNet rows); lm-eval capitalizes it, so the prompt depends on the split.
    A tail that starts upper-case stays in ctx_a (lm-eval would lower-case the rest of it: rare)."""
    match = _SENTENCE_TAIL.match(ctx)
    if match and match.group(2)[0].islower():
        return match.group(1), match.group(2)
    if ctx[:1].islower():
        return "", ctx
    return ctx, ""


def hellaswag_text_rows(path: Path) -> list[dict]:
    """llama.cpp's hellaswag text (6 lines per item: "<activity>: <ctx>", gold, 4 endings) -> HF rows."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"{path}: {len(lines)} lines is not a multiple of 6 (llama.cpp hellaswag format)")
    out = []
    for start in range(0, len(lines), 6):
        header, label, *endings = lines[start:start + 6]
        activity, sep, ctx = header.partition(": ")
        if not sep or label.strip() not in ("0", "1", "2", "3"):
            raise UserError(f"{path}:{start + 1}: expected '<activity>: <context>' then a gold label 0-3")
        ctx_a, ctx_b = _split_ctx(ctx)
        out.append({"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                    "label": label.strip(), "endings": endings})
    return out


def hellaswag_jsonl_rows(path: Path) -> list[dict]:
    """The original schema is already what lm-eval reads (label as a string, like the HF copy)."""
    keys = ("activity_label", "ctx_a", "ctx_b", "ctx", "endings")
    return [{**{k: _field(path, n, row, k) for k in keys}, "label": str(_field(path, n, row, "label"))}
            for n, row in enumerate(_jsonl(path), 1)]


def _winogrande_from_options(path: Path, n: int, row: dict) -> dict:
    """llm-foundry's {"context_options": [prefix+option1, prefix+option2], "continuation", "gold"}:
    the shared prefix (cut back to a word boundary) is the sentence up to "_"."""
    first, second = _field(path, n, row, "context_options")
    prefix = os.path.commonprefix([first, second])
    prefix = prefix[:prefix.rfind(" ") + 1] if " " in prefix else ""
    gold = _field(path, n, row, "gold")
    if "_" in prefix or gold not in (0, 1):
        raise UserError(f"{path}:{n}: not a WinoGrande row (gold must be 0/1, no '_' before the blank)")
    return {"sentence": f"{prefix}_ {_field(path, n, row, 'continuation')}",
            "option1": first[len(prefix):], "option2": second[len(prefix):], "answer": str(gold + 1)}


def winogrande_rows(path: Path) -> list[dict]:
    out = []
    for n, row in enumerate(_jsonl(path), 1):
        if "sentence" in row:
            out.append({k: str(_field(path, n, row, k)) for k in ("sentence", "option1", "option2", "answer")})
        else:
            out.append(_winogrande_from_options(path, n, row))
    return out


_TEST, _VALIDATION = ("test",), ("val", "dev")
OFFLINE_TASKS = {task.name: task for task in (
    OfflineTask("hellaswag", "hellaswag/hellaswag.yaml", "validation", _VALIDATION,
                {".jsonl": hellaswag_jsonl_rows, ".txt": hellaswag_text_rows}),
    OfflineTask("openbookqa", "openbookqa/openbookqa.yaml", "test", _TEST, {".jsonl": openbookqa_rows}),
    OfflineTask("winogrande", "winogrande/default.yaml", "validation", _VALIDATION, {".jsonl": winogrande_rows}),
    OfflineTask("arc_easy", "arc/arc_easy.yaml", "test", _TEST, {".jsonl": arc_rows}),
    OfflineTask("arc_challenge", "arc/arc_challenge.yaml", "test", _TEST, {".jsonl": arc_rows}),
    OfflineTask("boolq", "super_glue/boolq/default.yaml", "validation", _VALIDATION, {".jsonl": boolq_rows}),
    OfflineTask("piqa", "piqa/piqa.yaml", "validation", _VALIDATION, {".jsonl": piqa_rows}),
)}


def _candidates(task: OfflineTask, task_dir: Path) -> list[Path]:
    if not task_dir.is_dir():
        return []
    return sorted(p for p in task_dir.iterdir()
                  if p.is_file() and p.suffix in task.adapters and any(k in p.name.lower() for k in task.keywords))


def load_offline_rows(task: OfflineTask, data_dir: Path) -> tuple[Path, list[dict]]:
    """The task's rows in the HF schema, from the largest matching file under `data_dir/<task>/`."""
    task_dir = Path(data_dir) / task.name
    candidates = _candidates(task, task_dir)
    if not candidates:
        wanted = " or ".join(f"*{k}*{s}" for k in task.keywords for s in task.adapters)
        raise UserError(f"eval.data_dir: no {task.split} file for task {task.name!r} in {task_dir} (expected {wanted})")
    loaded = [(path, task.adapters[path.suffix](path)) for path in candidates]
    path, rows = max(loaded, key=lambda pair: (len(pair[1]), pair[0].suffix == ".jsonl"))
    if not rows:
        raise UserError(f"{path}: no rows for task {task.name!r}")
    return path, rows


def packaged_yaml(task: OfflineTask) -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / task.packaged_yaml


def offline_task_config(task: OfflineTask, rows_file: Path) -> dict:
    """Only the data location changes; everything else comes from lm-eval's own config."""
    return {
        "include": str(packaged_yaml(task)),
        "task": task.name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(Path(rows_file).resolve())}},
        "training_split": None,
        "validation_split": task.split if task.split == "validation" else None,
        "test_split": task.split if task.split == "test" else None,
    }


def write_offline_task(task: OfflineTask, rows: bytes, include_dir: Path) -> Path:
    """The task's adapted rows (JSON lines, in the HF schema) and its YAML, under `include_dir/<task>/`."""
    folder = Path(include_dir) / task.name
    folder.mkdir(parents=True, exist_ok=True)
    rows_file = folder / f"{task.name}.{task.split}.jsonl"
    rows_file.write_bytes(rows)
    path = folder / f"{task.name}.yaml"
    path.write_text(yaml.safe_dump(offline_task_config(task, rows_file), sort_keys=False))
    return path
