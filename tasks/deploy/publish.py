"""The deploy stage's Serve config made servable by a cluster: its local paths moved to shared storage.

The stage's config (models/deploy/serve_config.yaml) names dirs of the machine that ran it: the head, on
a VM cluster, while the replicas run on GPU workers that have none of them. Before `serve deploy` to a
cluster, `cluster_serve_config` publishes the model dir (and a draft model dir) under
`{paths.shared}/serving/<sha256 of its seal>/<dir name>`: the files, then `SERVING_SEAL` with each file's
sha256, written last, so a replica never fetches a half-published dir (serving/fetch.py), and a redeploy of
the same weights uploads nothing. The lineage file goes beside them, named by its hash. The stage's own
config is left as it is (a DVC output); the cluster's copy is written where the caller says:
`tinyllama publish --out FILE`, which the flow runs before its `serve deploy` to a cluster.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from serving.loader import PROMPT_LOOKUP
from tasks.errors import UserError
from tasks.files import exists, seal_record, sha256_file, sha256_json, upload, write_atomic, write_json_atomic
from tasks.layout import SERVING_SEAL, Layout, join
from tasks.params import Params, add_params_argument, load_params


def publish_model_dir(directory: Path, store: str) -> str:
    """The URI of `directory` published under `store` (uploaded unless that exact content is already there)."""
    record = seal_record(directory)
    record["files"].pop(SERVING_SEAL, None)  # a node's copy of a published dir, published again
    uri = join(store, sha256_json(record)[:16], directory.name)
    if not exists(join(uri, SERVING_SEAL)):
        upload(directory, uri, list(record["files"]))
        write_json_atomic(join(uri, SERVING_SEAL), record)
    return uri


def publish_file(path: Path, store: str) -> str:
    """The URI of a small file published under `store`, named by its content (one PUT)."""
    uri = join(store, f"{path.stem}-{sha256_file(path)[:16]}{path.suffix}")
    if not exists(uri):
        write_atomic(uri, path.read_bytes())
    return uri


def cluster_serve_config(params: Params, root: Path, out: Path) -> Path:
    """Write to `out` the stage's Serve config with its model, draft and lineage published to shared storage."""
    layout = Layout.from_params(params, root)
    if layout.serving_store is None:
        raise UserError("paths.shared: serving on a cluster needs storage every node reads (the replicas fetch "
                        "the model from it); set it, e.g. s3://<bucket>/shared")
    if not layout.serve_config.is_file():
        raise UserError(f"{layout.serve_config}: no Serve config to publish: run the deploy stage first "
                        "(dvc repro deploy)")
    config = yaml.safe_load(layout.serve_config.read_text())
    args = config["applications"][0]["args"]
    args["model"] = publish_model_dir(Path(args["model"]), layout.serving_store)
    if args.get("draft") and args["draft"] != PROMPT_LOOKUP:
        args["draft"] = publish_model_dir(Path(args["draft"]), layout.serving_store)
    if args.get("lineage_file"):
        args["lineage_file"] = publish_file(Path(args["lineage_file"]), layout.serving_store)
    write_atomic(out, yaml.safe_dump(config, sort_keys=False).encode())
    return out


def add_arguments(parser) -> None:
    add_params_argument(parser)
    parser.add_argument("--out", required=True, type=Path, metavar="FILE",
                        help="where to write the cluster's Serve config (for `serve deploy FILE --address ...`)")


def main(args) -> int:
    out = cluster_serve_config(load_params(args.params), Path.cwd(), args.out)
    model = yaml.safe_load(out.read_text())["applications"][0]["args"]["model"]
    print(f"published {model}; serve it with: serve deploy {out} --address http://<head>:8265")
    return 0
