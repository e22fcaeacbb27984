"""Files the way a user expects them: created with the user's umask (``tempfile`` makes 0600 files
and 0700 folders), replaced by one atomic rename, an advisory lock between processes, and JSON
read with bounds.

    write_atomic(path, write)   ``write(tmp)`` into a temporary sibling, then one ``os.replace``; the
                                siblings a killed writer left (its process gone) are removed first
    user_mode(path)             chmod a file (0o666) or folder (0o777) to what the umask allows
    file_lock(path)             an exclusive ``fcntl.flock`` on ``path`` (created if absent)
    read_json(path)             ``json.loads`` of a file of at most ``MAX_JSON_BYTES``, nested at most
                                ``MAX_JSON_DEPTH`` deep (deeper: a one-line ``ValueError``, never a
                                ``RecursionError`` here or in whatever walks the value later)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

_UMASK_LOCK = threading.Lock()
MAX_JSON_BYTES = 64 * 2**20  # a manifest is tens of KB; a config.json a few KB
MAX_JSON_DEPTH = 64  # a manifest nests 7 deep
# a JSON string (skipped whole: brackets inside it do not count) or a bracket
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth_ok(text: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """A ``ValueError`` (one line) where ``text`` nests arrays and objects deeper than ``max_depth``:
    one linear scan, before any recursive parser or walker sees it."""
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"expected JSON nested at most {max_depth} levels deep, got deeper")
        elif c in "]}":
            depth -= 1


def loads_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)`` with its nesting bounded (``json_depth_ok``)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    json_depth_ok(text, max_depth)
    try:
        return json.loads(text)
    except RecursionError:  # not reached after the scan above; kept so that none can escape
        raise ValueError(f"expected JSON nested at most {max_depth} levels deep, got deeper") from None


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """The JSON value in the file ``path``: at most ``max_bytes`` read, nesting bounded. Raises
    ``OSError`` (unreadable) or ``ValueError`` (too large, not UTF-8, not JSON, too deep), one line."""
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"expected at most {max_bytes} bytes of JSON, got more")
    return loads_json(raw, max_depth)


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


def temp_prefix(path: Path) -> str:
    """The name our temporary siblings of ``path`` start with: ``.<name>.<host>-<pid>.`` (the writer
    that made them, so that a later writer knows whether it is still alive)."""
    return f".{Path(path).name}.{_host()}-{os.getpid()}."


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` that writers on this machine left when they were
    killed (their process is gone): what ``write_atomic`` or ``check_output`` made and a ``kill -9``
    kept from being renamed or removed. Files of live writers and of other machines are left alone."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.{_host()}-") + r"([0-9]+)\.")
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
            except OSError:
                pass
    return removed


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the content to a temporary file beside ``path``, which then replaces
    ``path`` in one rename: a reader sees the old file or the new one, never a part. Temporary
    siblings of ``path`` that killed writers left are removed first (``remove_stale_temps``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    # the temporary name keeps the suffix: writers (imageio, PIL) pick their format by it
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=path.suffix, dir=path.parent)
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
