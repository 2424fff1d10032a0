"""Files: atomic writes, hashes, and readers whose errors name the file, the line and the field.

A write that fails for want of room (a full disk, a quota, a file size limit) is a `DiskFull` error naming the file,
the bytes needed and the bytes free (`disk_full`); the temporary it was writing is removed first.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatloop.errors import DiskFull, UserError

_UMASK = os.umask(0)
os.umask(_UMASK)

# What a write meets when there is no room: a full file system, a quota, a file size limit (RLIMIT_FSIZE).
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# The same errors as libraries report them in text (safetensors' Rust I/O error, SQLite's SQLITE_FULL).
_NO_ROOM_TEXT = ("No space left on device", "Disk quota exceeded", "File too large", "database or disk is full")


def no_room(e: BaseException) -> bool:
    """Whether `e` (an OSError, or a library's error that carries one in its text) is a write that found no room."""
    if isinstance(e, OSError) and e.errno in NO_ROOM:
        return True
    return any(t in str(e) for t in _NO_ROOM_TEXT)


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to an unprivileged writer on the file system of `path` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(path: str | Path, needed: int | None, error: BaseException | None = None) -> DiskFull:
    """The one-line error of a write to `path` that found no room (or would not: see `check_room`)."""
    reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno in NO_ROOM else "no space left"
    free = free_bytes(path)
    sizes = ", ".join(([f"needs about {human_bytes(needed)}"] if needed else [])
                      + ([f"{human_bytes(free)} free there"] if free is not None else []))
    return DiskFull(f"{path}: cannot write it: {reason} ({sizes}); what was saved before is untouched: make room "
                    "and run the same command again")


def check_room(path: str | Path, needed: int) -> None:
    """Refuse a write of about `needed` bytes to `path` before it starts when the file system has less free."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise disk_full(path, needed)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if no_room(e):
            raise disk_full(path, len(data), e) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def temp_dir_beside(final_dir: Path) -> Path:
    """An empty `.NAME.tmp` directory beside `final_dir` to fill and then `replace_dir` into place (one left over
    from a run that was killed is removed first)."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished temporary directory into place, replacing an older one."""
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def utc_time(t: float | None = None) -> str:
    """UTC time (now, or the Unix time t) as fixed-width ISO 8601 with a Z: sorts as text."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def check_input_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if not path.is_file():
        raise UserError(f"{path}: expected a file, found a directory or special file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    return path


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, plain or gzip; a decoding error names file and line."""
    path = check_input_file(path)
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007
                yield lineno, line
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"{path}: not a valid gzip file ({e})") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; a line that is not a JSON object names file and line."""
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def iter_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a corpus file: .jsonl(.gz) gives each line's `text_field`; other files one text each."""
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl"):
        for lineno, obj in read_jsonl(path):
            text = obj.get(text_field)
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field {text_field!r}: expected a string")
            yield text
    else:
        text = "".join(line for _, line in read_lines(path))
        if not text.strip():
            raise UserError(f"{path}: contains only whitespace")
        yield text
