"""Durable, atomic file operations shared by the bundle writer, `materialize` and `convert`.

A change is durable once the data of each new file and the directory entry that names it are
on disk: files are written under a unique temporary name, flushed with fsync, renamed into
place, and the directory is synced. Renames within one file system are atomic (POSIX), so a
reader sees the old or the new file, never a part of one.

Temporary names say who made them, `.tmp-<host>-<pid>-<random>-<what>`, so that a later writer
can delete what a crashed one left behind without touching the files of one still running.
Assumption: one host writes a directory at a time with these names (a shared network file system
written from two hosts is not supported: another host's pids cannot be checked).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from pathlib import Path

TMP_PREFIX = ".tmp-"
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_TMP_RE = re.compile(r"^\.tmp-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[0-9a-f]{12}-")


def temp_path(directory: Path, what: str) -> Path:
    """A fresh temporary name in `directory` (same file system as the final name)."""
    return Path(directory) / f"{TMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}-{what}"


def is_temp_name(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def temp_is_abandoned(name: str) -> bool:
    """True for a temporary name made by a process of this host that no longer runs."""
    m = _TMP_RE.match(name)
    if m is None or m["host"] != _HOST:
        return False
    pid = int(m["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then each directory (deepest first)."""
    path = Path(path)
    if path.is_file():
        fsync_path(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            fsync_path(Path(root) / f)
        fsync_path(Path(root))


def durable_replace(src: Path, dst: Path) -> None:
    """Rename src to dst (atomic; replaces a file of that name) and sync the directory."""
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: a reader sees the old or the new content, never a mix."""
    path = Path(path)
    tmp = temp_path(path.parent, path.name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_path(path: Path) -> None:
    """Delete a file, a symlink (not what it points to) or a directory tree."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def check_output_dir(out: Path, overwrite: bool, protect: tuple[Path, ...] = ()) -> None:
    """Refuse to write a checkpoint into an existing non-empty directory unless `overwrite`, and
    never over, inside or around a path in `protect` (the inputs being read)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    real = Path(os.path.realpath(out))
    for p in protect:
        rp = Path(os.path.realpath(p))
        if real == rp or real in rp.parents or rp in real.parents:
            raise FileExistsError(f"refusing to write into {out}: it holds an input of this command ({p})")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite to replace it")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`, replacing what is there (after
    check_output_dir): the old directory is renamed aside, the new one renamed in, then the old
    one deleted, so `out` is never half written."""
    out = Path(out)
    fsync_tree(tmp)
    old = None
    if out.exists():
        old = temp_path(out.parent, out.name + ".old")
        os.replace(out, old)
    durable_replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
