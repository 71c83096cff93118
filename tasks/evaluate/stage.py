"""`tinyllama evaluate`: every milestone scored, reported, and in the pretrain run.

Milestones the Ray evals already scored during training come from the cache (same weights hash,
same settings), so this stage only fills gaps: a milestone whose eval failed or never ran, or all
of them when eval settings changed. Everything the user can get wrong (tasks, data files,
checkpoints, the MLflow run) is checked before the first model is loaded, and nothing is written
when it is wrong.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.errors import UserError
from tasks.evaluate.checkpoints import find_milestones
from tasks.evaluate.mlflow_log import client_for, is_logged, log_report_files, log_result, mark_failed
from tasks.evaluate.perplexity import read_manifest
from tasks.evaluate.report import write_reports
from tasks.evaluate.scoring import collect_inputs, score_checkpoint
from tasks.evaluate.tasksets import TaskSet
from tasks.files import read_json
from tasks.layout import Layout
from tasks.params import Params, add_params_argument, load_params
from tasks.tracking import tracking_uri


def pretrain_run_id(params: Params) -> str:
    path = Layout.from_params(params).metrics_file("pretrain")
    run_id = read_json(path, "run `tinyllama pretrain` first; its MLflow run receives the scores").get("mlflow_run_id")
    if not run_id:
        raise UserError(f"{path}: no mlflow_run_id")
    return run_id


def _existing_run(client, run_id: str, uri: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"metrics/pretrain.json: mlflow_run_id {run_id} is not a run in {uri}") from None


def settings_note(params: Params, taskset: TaskSet) -> str:
    """How the table was scored, including which local subsets stood in for a benchmark, so nobody
    compares a 500-row subset with TinyLlama's full-set EVAL.md by mistake."""
    import lm_eval

    limit = f", first {params.eval.limit} items per task" if params.eval.limit else ""
    note = f"{params.eval.num_fewshot}-shot, lm-eval {lm_eval.__version__}{limit}"
    if taskset.data_notes:
        subsets = "; ".join(f"{task}: {where}" for task, where in taskset.data_notes.items())
        note += (f". Local data: {subsets}. Subsets of a split are not comparable with full-split results "
                 f"such as TinyLlama's EVAL.md")
    return note


def average_chance(taskset: TaskSet) -> float | None:
    if any(name not in taskset.chance for name in taskset.names):
        return None
    return sum(taskset.chance[name] for name in taskset.names) / len(taskset.names)


def evaluate(params: Params) -> list[dict]:
    """Score every milestone (cache first), log new scores and the reports to the pretrain run."""
    layout = Layout.from_params(params)
    milestones = find_milestones(layout)
    read_manifest(layout.prepared_dir)
    run_id, uri = pretrain_run_id(params), tracking_uri(params)
    client = client_for(uri)
    _existing_run(client, run_id, uri)
    inputs = collect_inputs(params)
    with tempfile.TemporaryDirectory(prefix="tinyllama-eval-") as include_dir:
        taskset = inputs.tasks.write(Path(include_dir))
        results = []
        for milestone in milestones:
            try:
                results.append(score_checkpoint(params, inputs, taskset, milestone))
            except Exception as exc:
                mark_failed(client, run_id, milestone.name, f"{type(exc).__name__}: {exc}")
                raise
    for result in results:
        if not is_logged(client, run_id, result):
            log_result(client, run_id, result)
    files = write_reports(layout, results, taskset.names, settings_note(params, taskset),
                          average_chance(taskset))
    log_report_files(client, run_id, files)
    return results


def add_arguments(parser) -> None:
    add_params_argument(parser)


def main(args) -> int:
    from tasks.evaluate.report import result_line
    from tasks.logs import stage_log

    params = load_params(args.params)
    with stage_log("evaluate", params):
        results = evaluate(params)
        for result in results:
            print(result_line(result))
        print(f"wrote {Layout.from_params(params).metrics_file('eval')}, eval_table.md, eval_table.csv, eval_plot.png")
    return 0
