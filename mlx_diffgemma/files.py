"""Writing files so that nothing is lost: whole or not at all, links kept.

A file is written to a temporary name beside its destination and renamed
over it at the end, so an interrupted write leaves the old file as it was.
What a plain rename would get wrong is handled here, once:

- a new file gets the mode the umask gives (0666 less the umask), not the
  0600 of a temporary file;
- a replaced file keeps its mode;
- a symbolic link is followed: its target is rewritten and the link stays;
- a file with several hard links is rewritten in place (after the new text
  is complete on disk), so every link sees it; a rename would leave the
  other names holding the old text;
- a read-only file is not written over.
"""

import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Union


def umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere (macOS) the only way to read it is to set it
    os.umask(mask)
    return mask


def check_writable(path: Union[str, Path]) -> Path:
    """The file a write to ``path`` would change (a link's target), or ValueError
    naming the problem: a read-only file, a directory, a missing or read-only folder."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise ValueError(f"{path}: is a directory")
    if target.exists():
        if not target.stat().st_mode & 0o222:
            raise ValueError(f"{path}: is read-only; not writing over it (make it writable first)")
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"{path}: no such directory {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write in {folder} (permission denied)")
    return target


def atomic_write(path: Union[str, Path], write: Callable[[str], None], overwrite: bool = True) -> Path:
    """``write(temporary_path)``, then put the result at ``path``; returns the file written.

    With ``overwrite`` False the file is linked in as a new name, which raises
    FileExistsError rather than replace a file that appeared meanwhile.
    """
    path = Path(path)
    target = check_writable(path) if overwrite else path
    # The temporary keeps the file's extension: mx.save_safetensors appends
    # ".safetensors" to a name that does not end with it.
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f".partial{target.suffix}")
    os.close(fd)
    try:
        write(temporary)
        old = target.stat() if overwrite and target.exists() else None
        os.chmod(temporary, stat.S_IMODE(old.st_mode) if old else 0o666 & ~umask())
        if old is not None and old.st_nlink > 1:
            _rewrite_in_place(temporary, target)
            os.unlink(temporary)
        elif overwrite:
            os.replace(temporary, target)
        else:
            os.link(temporary, target)
            os.unlink(temporary)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return target


def _rewrite_in_place(source: str, target: Path):
    """Copy ``source`` over ``target``'s own contents (its inode, so every hard
    link sees them). Should this fail midway, ``source`` still holds the whole
    text: it is kept and named."""
    try:
        with open(source, "rb") as new, open(target, "r+b") as old:
            data = new.read()
            old.write(data)
            old.truncate(len(data))
            old.flush()
            os.fsync(old.fileno())
    except OSError as e:
        kept = Path(source).with_suffix(".saved")
        os.replace(source, kept)
        raise OSError(e.errno, f"{e.strerror}; the new text is in {kept}", str(target)) from None


def write_text(path: Union[str, Path], text: str, overwrite: bool = True) -> Path:
    """``atomic_write`` of ``text`` as UTF-8, line endings as given."""

    def write(temporary: str):
        with open(temporary, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write, overwrite)
