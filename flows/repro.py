"""`python -m flows.repro STAGE`: one dvc.yaml stage reproduced through DVC's own Python API.

What `dvc repro --single-item STAGE` does (same dvc.lock, same cache, same "is it up to date?"),
minus what the CLI adds around it for a person at a terminal: "Running stage", "Updating lock
file" and the git/autostage/push hints, eight lines per stage in every Prefect log. Its output is
the stage command's own, then one status line the flow reads; its exit code is the stage
command's (2 = bad input), so the flow knows what not to retry.
"""

from __future__ import annotations

import sys

RAN, UP_TO_DATE = "dvc-stage: ran", "dvc-stage: up to date"


def _command_status(error: BaseException) -> int | None:
    """The stage command's exit code, from the cause chain of DVC's reproduction error."""
    from dvc.stage.exceptions import StageCmdFailedError

    while error is not None:
        if isinstance(error, StageCmdFailedError):
            status = str(error).rsplit("exited with ", 1)
            return int(status[1]) if len(status) == 2 and status[1].lstrip("-").isdigit() else None
        error = error.__cause__ or error.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    import logging

    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    (stage,) = sys.argv[1:] if argv is None else argv
    logging.getLogger("dvc").setLevel(logging.WARNING)  # DVC's own progress and hints; warnings still show
    try:
        with Repo() as repo:
            ran = repo.reproduce(stage, single_item=True)
    except DvcException as exc:
        status = _command_status(exc)
        print(f"stage {stage!r} failed: {exc}" + (f" (its command exited {status})" if status else ""),
              file=sys.stderr, flush=True)
        return status if status else 1
    print(RAN if ran else UP_TO_DATE, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
