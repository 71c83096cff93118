"""Atomic writes of directories and large files: a crash never leaves a half-written checkpoint,
tokenizer or GGUF file that a later run would trust. Output goes to a sibling temp dir (or file), is
fsynced, and is renamed into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Rename `new` onto `target`; an old `target` is moved aside first and deleted only after the new
    one is in place (restored if that rename fails), so `target` is never a mix of old and new files."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yields an empty temp dir beside `out_dir`; on a clean exit its files are fsynced and it replaces
    `out_dir`, on an error it is removed and `out_dir` is untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.iterdir():
            fsync_path(path)
        fsync_path(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temp path beside `path` for a writer that wants a file name (GGUFWriter); on a clean
    exit the file is fsynced and renamed onto `path`, on an error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
