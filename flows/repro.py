"""`python -m flows.repro STAGE [--sync-remote]`: one dvc.yaml stage reproduced through DVC's own Python API.

What `dvc repro --single-item STAGE` does (same dvc.lock, same cache, same "is it up to date?"),
minus what the CLI adds around it for a person at a terminal: "Running stage", "Updating lock
file" and the git/autostage/push hints, eight lines per stage in every Prefect log. Its output is
the stage command's own, then one status line the flow reads; its exit code is the stage
command's (2 = bad input), so the flow knows what not to retry.

`--sync-remote` (a cluster run with a DVC remote: the flow decides) is `dvc repro --pull` followed by
`dvc push --run-cache STAGE`: a stage whose run cache entry is on the remote is restored from it
instead of run, and every stage's outputs and run cache entry are pushed once it is up to date. So a
new head (a clone without dvc.lock, data/ or .dvc/cache) gets back what the lost one had made — the
tokenizer, the prepared manifest, the milestones — instead of tokenizing the corpus again. The push
comes after an up-to-date stage too, so a Prefect retry after a failed upload uploads it.
"""

from __future__ import annotations

import argparse
import logging
import sys

RAN, UP_TO_DATE, RESTORED = "dvc-stage: ran", "dvc-stage: up to date", "dvc-stage: restored from the run cache"


class _RunCacheRestores(logging.Filter):
    """Notes DVC's "Stage 'x' is cached - skipping run, checking out outputs" (the stage's outputs came from
    the run cache, not its command) and lets only the run cache's warnings through, like the rest of DVC's log."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        self.seen |= "is cached - skipping run" in record.getMessage()
        return record.levelno >= logging.WARNING


def _command_status(error: BaseException) -> int | None:
    """The stage command's exit code, from the cause chain of DVC's reproduction error."""
    from dvc.stage.exceptions import StageCmdFailedError

    while error is not None:
        if isinstance(error, StageCmdFailedError):
            status = str(error).rsplit("exited with ", 1)
            return int(status[1]) if len(status) == 2 and status[1].lstrip("-").isdigit() else None
        error = error.__cause__ or error.__context__
    return None


def _push(repo, stage_name: str) -> None:
    """`dvc push --run-cache STAGE`, and the stage's `cache: false` outputs (its metrics): the run cache keeps
    them in the cache and a restore pulls them from the remote with the rest, but `dvc push` leaves them out,
    and a restore that misses one runs the stage instead."""
    from dvc.exceptions import DvcException

    repo.push(targets=[stage_name], run_cache=True)
    (stage,) = repo.stage.collect(stage_name)
    uncached = {out.hash_info for out in stage.outs if not out.use_cache and out.hash_info}
    failed = repo.cloud.push(uncached).failed if uncached else set()
    if failed:
        raise DvcException(f"failed to push {len(failed)} of stage {stage_name!r}'s uncached outputs")


def main(argv: list[str] | None = None) -> int:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    parser = argparse.ArgumentParser(prog="python -m flows.repro")
    parser.add_argument("stage")
    parser.add_argument("--sync-remote", action="store_true",
                        help="restore from / push to DVC's default remote (outputs and run cache)")
    args = parser.parse_args(argv)
    logging.getLogger("dvc").setLevel(logging.WARNING)  # DVC's own progress and hints; warnings still show
    restores = _RunCacheRestores()
    logging.getLogger("dvc.stage.cache").setLevel(logging.INFO)
    logging.getLogger("dvc.stage.cache").addFilter(restores)
    try:
        with Repo() as repo:
            ran = repo.reproduce(args.stage, single_item=True, pull=args.sync_remote)
            if args.sync_remote:
                _push(repo, args.stage)
    except DvcException as exc:
        status = _command_status(exc)
        print(f"stage {args.stage!r} failed: {exc}" + (f" (its command exited {status})" if status else ""),
              file=sys.stderr, flush=True)
        return status if status else 1
    print(RESTORED if restores.seen else RAN if ran else UP_TO_DATE, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
