"""Files the way a user expects them: created with the user's umask (``tempfile`` makes 0600 files
and 0700 folders), replaced by one atomic rename, and an advisory lock between processes.

    write_atomic(path, write)   ``write(tmp)`` into a temporary sibling, then one ``os.replace``
    user_mode(path)             chmod a file (0o666) or folder (0o777) to what the umask allows
    file_lock(path)             an exclusive ``fcntl.flock`` on ``path`` (created if absent)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # the portable way sets it for a moment
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def user_mode(path: Path) -> None:
    """``path`` (made by ``tempfile``, 0600 / 0700) gets the mode a plain ``open`` / ``mkdir`` gives."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the content to a temporary file beside ``path``, which then replaces
    ``path`` in one rename: a reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps the suffix: writers (imageio, PIL) pick their format by it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        user_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (its folder and the file are created if absent).

    A lock file that was removed and made again while we waited is not the one others lock, so
    the lock is taken again until the file we hold is the one at ``path``."""
    import fcntl

    path = Path(path)
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
