"""Resume from a sharded checkpoint on shared storage reading only what this rank needs.

Before, every rank downloaded the whole checkpoint (1.1B: ~13 GB of weights and AdamW moments, ×16 ranks
≈ 211 GB from S3 per restart) because torch.distributed.checkpoint's safetensors reader reads local files.
Here a rank fetches every shard file's header only (a few KB: the tensor names, shapes and DCP slice offsets
the reader plans with) into a sparse local stand-in of the file's size, and, once DCP has planned which
slices this rank loads, downloads just the files holding them, each checked against the checkpoint's seal.
At the same world size a rank reads its own file; on another world size or mesh, the files its slices
overlap. The checkpoint's layout is unchanged.
"""

from __future__ import annotations

from pathlib import Path

from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

from tasks.files import BrokenSeal, sha256_file
from tasks.layout import join


class RemoteShardReader(HuggingFaceStorageReader):
    """DCP's safetensors reader over the shard dir `remote_dir` (a local path or a URI); `files` is the
    seal's name -> sha256 map (names relative to the checkpoint dir, e.g. `shards/…safetensors`)."""

    def __init__(self, remote_dir: str, local_dir: Path, files: dict[str, str], prefix: str):
        import fsspec

        self.remote_fs, root = fsspec.core.url_to_fs(str(remote_dir))
        self.root, self.files, self.prefix = root.rstrip("/"), files, prefix
        self.bytes_fetched = 0
        self._remote: dict[str, str] = {}
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(n for n in files if n.startswith(prefix + "/")):
            remote, local = f"{self.root}/{name[len(prefix) + 1:]}", local_dir / name[len(prefix) + 1:]
            self._remote[str(local)] = remote
            size = self.remote_fs.info(remote)["size"]
            with self.remote_fs.open(remote, "rb") as handle:  # safetensors: 8-byte little-endian length, JSON header
                head = handle.read(8)
                head += handle.read(int.from_bytes(head, "little"))
            with open(local, "wb") as stand_in:
                stand_in.write(head)
                stand_in.truncate(size)  # sparse: the reader checks the header against the file's size
            self.bytes_fetched += len(head)
        super().__init__(str(local_dir))

    def read_data(self, plan, planner):
        for local in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
            self.remote_fs.get_file(self._remote[local], local)
            name = f"{self.prefix}/{Path(local).name}"
            if sha256_file(Path(local)) != self.files[name]:
                raise BrokenSeal(f"{name} does not match the checkpoint's seal")
            self.bytes_fetched += Path(local).stat().st_size
        return super().read_data(plan, planner)


def shard_reader(checkpoint_uri: str, scratch: Path, files: dict[str, str], shard_dir: str) -> RemoteShardReader:
    return RemoteShardReader(join(checkpoint_uri, shard_dir), scratch / shard_dir, files, shard_dir)
