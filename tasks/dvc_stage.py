"""What DVC knows about the stage that is running: the one place a stage talks to DVC's Python API."""

from __future__ import annotations

import json
import os

from tasks.files import sha256_json


def dvc_stage_hash() -> str:
    """A hash of the running stage's definition (its command, the hashes of its deps and its params), taken
    through DVC's API when the stage runs under `dvc repro`; 'none' otherwise. A registered model's tag:
    which code and data made it."""
    stage_name, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not stage_name or not root:
        return "none"
    from dvc.repo import Repo

    with Repo(root) as repo:
        stage = repo.stage.collect(f"{root}/dvc.yaml:{stage_name}")[0]
        stage.save_deps()  # content hashes of code and data deps, values of params deps, as dvc.lock records them
        deps = sorted((str(dep.def_path), json.dumps(dep.hash_info.value, sort_keys=True, default=str))
                      for dep in stage.deps)
    return sha256_json({"cmd": stage.cmd, "deps": deps})
