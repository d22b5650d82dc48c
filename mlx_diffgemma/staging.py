"""Writing a model directory safely: built in a hidden directory beside the
target and renamed into place only once complete, never replacing what is not
a model, and cleaning up after conversions that were killed. The converter and
fuse write through it.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why, in one line."""


def contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


# Written into every staging directory: a later run recognises the directory
# as a conversion's own, and whether the process that made it is gone.
STAGING_MARKER = ".mlx_diffgemma-conversion"


def is_model_directory(path: Path) -> bool:
    """Whether ``path`` looks like a model: a config.json and safetensors weights."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def check_replaceable(target: Path, force: bool, flag: str = "--mlx-path"):
    """Refuse to replace ``target`` unless asked to and it is recognisably a model.

    ``flag`` is the option that named ``target`` (fuse's is --save-path)."""
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise ConvertError(f"{target} already exists (pass --force to replace it)")
    if target.is_symlink() or not is_model_directory(target):
        raise ConvertError(
            f"{target} exists and is not a model directory (no config.json and weights); "
            f"not replacing it, even with --force: choose another {flag}"
        )


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_stagings(target: Path) -> List[Path]:
    """Delete what killed conversions to ``target`` left behind; returns what was deleted.

    Only directories holding our marker, whose process is gone, are touched.
    """
    removed = []
    for path in target.parent.glob(f".{target.name}.*.partial"):
        try:
            pid = int((path / STAGING_MARKER).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            print(f"[WARN] {path}: not left by mlx_diffgemma.convert; leaving it alone")
            continue
        if process_alive(pid):
            continue  # another conversion to the same target, still running
        shutil.rmtree(path, ignore_errors=True)
        print(f"[INFO] Removed {path}, left by an interrupted conversion")
        removed.append(path)
    return removed


@contextmanager
def staged_directory(target: Path, force: bool, flag: str = "--mlx-path") -> Iterator[Path]:
    """A new directory that becomes ``target`` only if the block completes.

    It is made beside ``target`` (same filesystem, so the final rename is
    atomic). On any exception, KeyboardInterrupt included, it is deleted and
    ``target`` is left as it was. Only a model directory is ever replaced.
    A conversion killed outright leaves the staging directory behind; the
    next conversion to the same target removes it.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stagings(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as e:
        raise ConvertError(f"{target}: cannot write there ({e.strerror or e})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private
    try:
        (staging / STAGING_MARKER).write_text(f"{os.getpid()}\n")
        yield staging
        (staging / STAGING_MARKER).unlink()
        if target.exists() or target.is_symlink():
            check_replaceable(target, force, flag)
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()
            target.rename(old)
            try:
                staging.rename(target)
            except BaseException:
                old.rename(target)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
