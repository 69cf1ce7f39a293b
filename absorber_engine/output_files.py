"""Files the engine writes: paths checked before the work, and writes that leave the file whole or
as it was, whatever moment the process or the machine stops.

A file is written under a temporary name in its directory, flushed to the disk (`written`), and
only then renamed over the target, after which the directory itself is synced (`sync_directory`).
Without the two syncs a power cut after the rename could leave the target's name on a file whose
data never reached the disk, the file it replaced already gone; the server's state directory, which
removes a session's older memory file once the new one is named, relies on them.
"""

from __future__ import annotations

import errno
import json
import os
import secrets

from . import interrupts
from .errors import InputError


def output_path(path, what: str) -> str:
    """`path` as a string, or InputError when it cannot name a file (None, a number, a NUL byte)."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise InputError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path or "\0" in path:
        raise InputError(f"{what} {path!r} is not a usable path")
    return path


def check_writable(path, what: str) -> str:
    """InputError now, not after the work, when a file cannot be written at `path`: a directory is
    there, or the nearest existing folder above it is a file or takes no new file. That is tried,
    with a file made and removed: os.access() says yes to root where the filesystem says no (/sys)."""
    path = output_path(path, what)
    if os.path.isdir(path):
        raise InputError(f"{what} {path!r} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise InputError(f"{what} {path!r} cannot be written: {folder!r} is not a directory")
    probe = temp_name(folder, ".absorber-probe-")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{what} {path!r} cannot be written: {folder!r} takes no new file ({exc.strerror})") from None
    return path


def new_temp_file(directory: str, prefix: str) -> tuple[int, str]:
    """(fd, path) of a new file in `directory`, as tempfile.mkstemp but with the mode a plain open()
    gives (0666 less the umask): mkstemp's 0600, kept through the rename, made memory files and
    exported adapters unreadable to a server running as another user."""
    while True:
        path = temp_name(directory, prefix)
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), path
        except FileExistsError:
            continue


def temp_name(directory: str, prefix: str) -> str:
    """A name for a temporary file in `directory` that no file has yet (random: taken, it is a 1 in 2^64 chance)."""
    while True:
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}.tmp")
        if not os.path.exists(path):
            return path


def written(f) -> None:
    """Everything written to the open file `f` is on the disk (before its rename)."""
    f.flush()
    os.fsync(f.fileno())


def sync_directory(directory: str) -> None:
    """The names the directory holds (a rename just made) are on the disk. A no-op where a directory
    cannot be opened for it (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:             # a filesystem that cannot sync a directory: nothing to do
            raise
    finally:
        os.close(fd)


def write_whole(path, data: bytes, prefix: str | None = None) -> None:
    """`data` at `path`, all of it or none: written beside it under a temporary name (`prefix`, else
    the target's), synced, renamed. The temporary is named before it is made and made inside the
    block that removes it, under held signals: a Ctrl-C as it was made left it behind, full-size,
    with its descriptor. A failed sync of the directory after the rename says the file is written."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp, f = temp_name(directory, prefix or f".{os.path.basename(path)}-"), None
    try:
        with interrupts.deferred():
            f = os.fdopen(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), "wb")
        with f:
            f.write(data)
            written(f)
        os.replace(tmp, path)
    except BaseException:
        if f is not None:
            f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        sync_directory(directory)
    except OSError as exc:            # the file is in place; only its name may not be on the disk yet
        raise WrittenUnsynced(exc.errno, f"{path} was written, but syncing its directory failed ({exc.strerror}): "
                                         "after a power cut it may read as the file it replaced") from exc


class WrittenUnsynced(OSError):
    """write_whole() put the file in place, but the directory's sync failed."""


def sorted_header(blob: bytes) -> bytes:
    """The safetensors file `blob` with its JSON header's keys sorted: safetensors writes the metadata
    in hash-map order, so two saves of one memory differed in their bytes (no file hash or
    deduplication could find them equal). The tensors' offsets count from the header's end: unchanged."""
    size = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)              # the tensors start 8-byte aligned, as safetensors keeps them
    return len(header).to_bytes(8, "little") + header + blob[8 + size:]
