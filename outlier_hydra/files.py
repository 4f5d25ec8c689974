"""Writing files so that a file that exists is complete: atomic writes, JSON, and one line on a full disk.

Every file the project writes goes through atomic_write_bytes: a temporary file in the same folder,
fsync, rename. On any failure the temporary file is removed and the old file (if any) is untouched.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from outlier_hydra.errors import OutlierHydraError


class NoSpace(OutlierHydraError):
    """A write failed for lack of space (ENOSPC, EDQUOT); nothing partial was left behind."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename. On any failure the temporary
    file is removed and the old file (if any) is untouched; a full disk is one line naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"{path}: no space left on the device ({len(data)} bytes to write)") from None
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
