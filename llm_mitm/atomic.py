"""Files replaced whole or not at all.

The new content goes to a temporary file next to the target and is renamed over it
(os.replace, atomic on one file system), so a full disk, a crash or an exception part
way leaves the old file as it was and no half file behind.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_output(path: str | os.PathLike[str], mode: int | None = None, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file whose content becomes `path` when the block ends without an error.

    An existing file keeps its permissions; a new one gets `mode`, else what `open()`
    would give it. A symlink is followed, so its target is what changes. `durable`
    fsyncs before the rename (off only where losing the newest file to a power cut is
    fine and the cost per file matters).
    """
    if not _replaceable(path):  # /dev/stdout, a pipe: nothing to replace, write to it
        with open(path, "wb") as stream:
            yield stream
        return
    target = Path(os.path.realpath(path))
    permissions = _permissions(target, mode)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(temporary, permissions)
        _keep_owner(temporary, target)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int | None = None, durable: bool = True) -> None:
    """`data` as the whole content of `path` (see atomic_output)."""
    with atomic_output(path, mode, durable) as handle:
        handle.write(data)


def _replaceable(path: str | os.PathLike[str]) -> bool:
    """A regular file, or nothing yet (a pipe or a device is written to, not replaced)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


def _keep_owner(temporary: str, target: Path) -> None:
    """Run as root (sudo) on a file someone else owns, the new file is theirs too."""
    try:
        owner = target.stat()
    except FileNotFoundError:
        return
    if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.chown(temporary, owner.st_uid, owner.st_gid)
        except PermissionError:  # not root: the file could not have been theirs to keep
            pass


def _permissions(target: Path, mode: int | None) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        pass
    if mode is not None:
        return mode
    umask = os.umask(0)  # read it: the only portable way is to set it and put it back
    os.umask(umask)
    return 0o666 & ~umask
