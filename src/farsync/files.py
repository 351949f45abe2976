"""Files a crash cannot leave half-written (no torch: the data cache and the checkpoints
both use it)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Write a file via ``write(binary_file)`` to a temporary name in the same folder,
    flush it to disk (fsync), then rename it into place (atomic on POSIX).

    Readers see the old file or the whole new one, never a torn one — after a crash too,
    and when several processes (one per worker) write the same path at once. The
    temporary file is removed if ``write`` fails.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
