"""Atomic file output: a reader never sees a half-written file, and a write that fails (a full
disk, a size limit, a read-only folder), whichever library was writing, ends as one clear
:class:`OutputError` with nothing partial left behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from finetune.errors import ConfigError, OutputError

_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file size limit, e.g. ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file is in the way of a folder on the path",
    errno.EEXIST: "a file is in the way of a folder on the path",
}
# What the writers that do not raise OSError say (safetensors' Rust I/O, torch's zip writer).
_WRITE_TEXTS = {"No space left": _WRITE_ERRNOS[errno.ENOSPC],
                "StorageFull": _WRITE_ERRNOS[errno.ENOSPC],
                "File too large": _WRITE_ERRNOS[errno.EFBIG],
                "FileTooLarge": _WRITE_ERRNOS[errno.EFBIG],
                "PytorchStreamWriter failed": "the write failed (a full disk or a size limit)",
                # safetensors' Rust I/O: "I/O error: Permission denied (os error 13)"
                "(os error 13)": _WRITE_ERRNOS[errno.EACCES],
                "(os error 1)": _WRITE_ERRNOS[errno.EPERM],
                "(os error 30)": _WRITE_ERRNOS[errno.EROFS]}


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, in words, when ``e`` says it did (None: some other error)."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return _WRITE_ERRNOS[e.errno]
    return next((reason for text, reason in _WRITE_TEXTS.items() if text in str(e)), None)


def output_error(path: Path, e: BaseException) -> OutputError | None:
    """The one-line error for a failed write of ``path``, or None if ``e`` is something else."""
    reason = write_failure(e)
    if reason is None:
        return None
    return OutputError(f"could not write {path}: {reason}. Free space or write elsewhere "
                       f"(output_dir=PATH); nothing partially written was kept.")


def make_folder(folder: Path, name: str, fix: str) -> Path:
    """``folder`` made (and the folders above it) and checked writable before anything is
    written into it; else one :class:`ConfigError`: ``name`` (the key that set it), why, ``fix``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{name}: {write_failure(e) or e.strerror or e}; {fix}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: the folder cannot be written (permissions or a read-only "
                          f"file system); {fix}")
    return folder


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX, so ``path`` holds either its old content or the complete new
    one; on any error the temporary file is removed and the error propagates (a failed write as
    an :class:`OutputError`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        # Some writers (safetensors) create 0600 files; give the file the mode open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # (below a file, even the unlink fails)
            tmp.unlink(missing_ok=True)
        error = output_error(path, e)
        if error is not None:
            raise error from None
        raise


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
