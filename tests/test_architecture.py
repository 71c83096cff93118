"""Who may import whom: the layout shows the architecture, and these rules keep it that way.

- model/ is the Llama in plain torch: none of the infrastructure (Ray, Prefect, MLflow, DVC, lm-eval)
  and none of the project's other packages, so it can be read, tested and served on its own.
- tasks/ are the stages: they never import flows/ (the orchestration sits on top of them).
- serving/ is the Ray Serve application: model/ plus its server libraries, nothing of the pipeline.
- flows/ only orchestrates: it reaches the stages through dvc.yaml, never the model or the stages' internals.
- tasks/train/ is the training library the stages share: it knows no stage (objectives come in as values).
- every stage is entered the same way: `tasks/<package>/stage.py` with `add_arguments(parser)` and `main(args)`.
"""

from __future__ import annotations

import ast
import sys

import pytest
from imports import imported_names, module_file, project_modules

from tasks.cli import COMMANDS

NEVER_IN_MODEL = ("ray", "prefect", "mlflow", "dvc", "lm_eval", "tasks", "flows", "serving")
SERVING_MAY_IMPORT = ("model", "serving", "ray", "fastapi", "starlette", "uvicorn", "pydantic", "torch", "numpy",
                      "safetensors", "jinja2", "anyio", "prometheus_client",
                      "fsspec")  # a replica copies a model dir published on shared storage (serving/fetch.py)
# The shared top of tasks/ (schema, errors, paths, files, MLflow store, the CLI dispatcher): what a flow
# needs to validate a profile, find outputs and link runs.
FLOWS_MAY_IMPORT_FROM_TASKS = ("tasks.cli", "tasks.errors", "tasks.params", "tasks.layout", "tasks.files",
                               "tasks.tracking")
NEVER_IN_FLOWS = ("model", "serving", "torch", "lm_eval", "ray.train")
# What the training library may use of tasks/: the shared top, nothing of a stage package.
TRAIN_MAY_IMPORT_FROM_TASKS = ("tasks.train", "tasks.errors", "tasks.params", "tasks.layout", "tasks.files",
                               "tasks.tracking", "tasks.ray_cluster", "tasks.logs")
STAGES = ("tokenizer", "prepare", "pretrain", "evaluate", "sft", "dpo", "quantize", "deploy")


def _top(name: str) -> str:
    return name.split(".")[0]


def _imports(package: str) -> list[tuple[str, str]]:
    """(module, name it imports) for every module of a package."""
    return [(module, name) for module, file in project_modules(package).items()
            for name in imported_names(file, module) if name]


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_model_knows_nothing_of_the_infrastructure():
    bad = [(m, n) for m, n in _imports("model") if _top(n) in NEVER_IN_MODEL]
    assert not bad, f"model/ imports {bad}"


def test_tasks_never_import_flows():
    bad = [(m, n) for m, n in _imports("tasks") if _top(n) == "flows"]
    assert not bad, f"tasks/ imports {bad}"


def test_serving_imports_model_and_server_libraries_only():
    modules = _imports("serving")
    if not modules:
        pytest.skip("serving/ has no modules yet")
    bad = [(m, n) for m, n in modules if _top(n) not in SERVING_MAY_IMPORT and _top(n) not in sys.stdlib_module_names]
    assert not bad, f"serving/ imports {bad}"


def test_flows_only_orchestrate():
    modules = _imports("flows")
    wrong_layer = [(m, n) for m, n in modules if any(_is(n, p) for p in NEVER_IN_FLOWS)]
    assert not wrong_layer, f"flows/ imports {wrong_layer}"
    stage_internals = [(m, n) for m, n in modules if _top(n) == "tasks" and n != "tasks"
                       and not any(_is(n, p) for p in FLOWS_MAY_IMPORT_FROM_TASKS)]
    assert not stage_internals, f"flows/ reaches into the stages: {stage_internals} (run them through dvc.yaml)"


def test_training_library_knows_no_stage():
    bad = [(m, n) for m, n in _imports("tasks/train") if _top(n) == "tasks" and n != "tasks"
           and not any(_is(n, p) for p in TRAIN_MAY_IMPORT_FROM_TASKS)]
    assert not bad, f"tasks/train/ imports a stage's code: {bad}"


def test_cli_reads_as_the_dag_then_the_tools():
    assert list(COMMANDS)[:len(STAGES)] == list(STAGES)


@pytest.mark.parametrize("command", STAGES)
def test_every_stage_has_the_same_entry(command):
    module = COMMANDS[command][0]
    assert module.startswith("tasks.") and module.endswith(".stage"), f"{command}: {module} is not tasks.<pkg>.stage"
    tree = ast.parse(module_file(module).read_text())
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    names |= {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
              for alias in node.names}
    assert {"add_arguments", "main"} <= names, f"{module} lacks add_arguments/main"


@pytest.mark.parametrize("rule", [test_model_knows_nothing_of_the_infrastructure, test_tasks_never_import_flows])
def test_a_violation_is_caught(rule, tmp_path, monkeypatch):
    """The checks above can fail: a planted import trips them."""
    import imports

    package = "model" if rule is test_model_knows_nothing_of_the_infrastructure else "tasks"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "planted.py").write_text("def f():\n    import flows.pipeline\n")
    monkeypatch.setattr(imports, "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="planted"):
        rule()
