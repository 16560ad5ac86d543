"""Small, crash-safe file helpers shared by the run-folder writers.

Every file that a later run trusts is written to a temporary name in the same folder and renamed into place,
so a crash leaves either the old file or the new one, never half of one. JSON-lines files are appended a line
at a time and read back skipping a torn last line.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from harness.errors import HarnessError

log = logging.getLogger(__name__)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def _writable_error(path: Path, err: OSError) -> HarnessError:
    # (prepare writes its DST through here too, so the hint names no option of one command)
    return HarnessError(f"cannot write {path}: {err.strerror or err} (is its folder writable, and is there disk "
                        "space left? write elsewhere, e.g. another --results-dir)")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give results the usual permissions
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise _writable_error(path, err) from err


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON object as one line (a single write, so concurrent appenders do not interleave).

    After a torn last line (a crash or a full disk mid-write) the row starts on a new line: glued to the torn
    one, it would be skipped with it by read_jsonl.
    """
    path = Path(path)
    line = (json.dumps(row, sort_keys=True, default=_json_default) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _ends_torn(fd):
                line = b"\n" + line  # at worst (a racing appender) an empty line, which read_jsonl skips
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as err:
        raise _writable_error(path, err) from err


def _ends_torn(fd: int) -> bool:
    """Whether the open file is non-empty and its last byte is not a newline."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a JSON-lines file; a torn or corrupt line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def rewrite_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in rows)
    atomic_write_text(path, text)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive lock on the file `path` for the `with` block, waiting for any other holder.

    flock locks belong to the open file and vanish with the process, so a killed run never leaves a stale
    lock behind (a requeued SLURM job just takes it). `waiting` is logged when another process holds it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _writable_error(path, err) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s", waiting or f"waiting for another process to release {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
