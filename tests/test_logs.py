"""Logs a person can read, on the real tiny pipeline (the shared `pipeline_repo` run, made by the same
flow `make run` calls): no traceback, no repeated warning, at most ~150 lines, and the full detail of
each stage in its own log file whose path the run printed."""

import pytest
from console import problems


@pytest.mark.slow
def test_make_run_output_is_short_and_clean(pipeline_repo):
    output = pipeline_repo.output
    found = problems(output, max_lines=150)
    assert not found, "\n\n".join(found) + f"\n\n--- output\n{output}"
    for stage in pipeline_repo.stage_seconds:
        log = pipeline_repo.root / "logs" / f"{stage}.log"
        assert f"{stage}: full log in {log}" in output, f"{stage} did not print where its log is"
        assert log.stat().st_size > 0


@pytest.mark.slow
def test_the_stage_logs_hold_the_detail_the_console_leaves_out(pipeline_repo):
    logs = pipeline_repo.root / "logs"
    pretrain = (logs / "pretrain.log").read_text()
    assert "step " in pretrain and "milestone " in pretrain            # its console lines are in the file too
    worker_logs = list((logs / "pretrain-ray").glob("worker-*"))
    assert worker_logs, "Ray workers' own output must be kept"
    assert any("Reporting training result" in p.read_text(errors="replace") for p in worker_logs), \
        "Ray Train's per-report detail belongs in the worker logs"
