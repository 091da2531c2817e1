"""Outputs that appear complete or not at all: written under a temporary name beside the target, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)`, then rename the result to `path`; a failed write leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


@contextmanager
def staged_folder(target: Path, replace: bool) -> Iterator[Path]:
    """Yield an empty folder beside `target` to fill; on success it becomes `target`. An existing `target` is
    replaced when `replace`, otherwise kept (another writer finished the same content first)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if replace and target.exists():
            shutil.rmtree(target)
        if not target.exists():
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
