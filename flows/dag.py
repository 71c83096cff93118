"""The pipeline's stages, read from dvc.yaml through DVC itself.

dvc.yaml is the one definition of the DAG; the flow never keeps its own list, so adding a stage
there (sft, quantize) adds a task here with no other edit. DVC resolves the templating
(`${paths.models}`) and the dependency graph, so the order is exactly the one `dvc repro` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    outs: tuple[str, ...]      # every output path, metrics included, relative to the repo root
    metrics: tuple[str, ...]   # the outputs marked as DVC metrics
    upstream: tuple[str, ...]  # stages whose outputs this one depends on


def load_stages(root: str | Path = ".") -> list[Stage]:
    """dvc.yaml's stages, each after everything it depends on; ties keep dvc.yaml's order."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage) and s.path_in_repo == "dvc.yaml"]
        position = {s.name: i for i, s in enumerate(stages)}
        graph = repo.index.graph  # edge (a, b): stage a depends on an output of stage b
        needs = {s.name: tuple(sorted(b.name for _, b in graph.out_edges(s))) for s in stages}
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: position.get(s.name, -1))
        return [
            Stage(
                name=s.name,
                cmd=s.cmd,
                outs=tuple(out.def_path for out in s.outs),
                metrics=tuple(out.def_path for out in s.outs if out.metric),
                upstream=needs[s.name],
            )
            for s in order
            if s.name in position
        ]
