"""File output shared by the package: writes that never leave a half-written file behind."""
from __future__ import annotations

import os


def atomic_write(path: str, write) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``
    (so a failure never leaves a half-written file)."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", prefix=".diffkern-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; package data must be readable by all
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
