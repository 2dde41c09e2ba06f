"""What every run shares: its record (``environment``) and its outputs, written safely (checked,
locked and staged before the work starts).

Every verb that writes (``--output``, ``--report``, ``--json``, the bundled model's cache) goes
through ``staged_output``:

* the path is resolved (``.``, ``..``, ``~``, symlinks) and refused when it is, contains or lies
  inside an input of the run, or is the current folder, a parent of it, the home folder or ``/``;
  an existing target needs ``overwrite``, and a file never stands in for a folder or the reverse;
* a lock beside the target (``.NAME.lock``, ``flock``) stops a second run on the same target at once;
* temporary files left by runs that were killed (``.NAME.partial-PID``, ``.NAME.old-PID``) are
  removed, and the log says so: a live writer would hold the lock;
* the temporary folder (or file) is created beside the target at once, so an unwritable place fails
  in the first second, not after the work; it is renamed over the target only when the work ends
  without an exception, and removed otherwise (folders the guard created on the way too).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import platform
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmlite.errors import LlmliteError

log = logging.getLogger("llmlite")

Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]  # (option, path) pairs; non-paths are skipped


@contextmanager
def staged_output(
    path: str | os.PathLike | None,
    *,
    overwrite: bool = False,
    inputs: Inputs = (),
    option: str = "--output",
    kind: str = "folder",
    wait: bool = False,
) -> Iterator[Path | None]:
    """Check, lock and stage the output ``path`` (a ``"folder"`` or a ``"file"``); yield the
    temporary path to write into, moved to ``path`` when the ``with`` block ends without an
    exception. ``path=None`` yields ``None`` (no output). ``wait``: block on the lock rather than
    refuse (the bundled model's cache, where the other run produces the same thing)."""
    if path is None:
        yield None
        return
    target = _checked_target(path, overwrite, inputs, option, kind)
    created = _make_parents(target, path, option)
    committed = False
    try:
        with _locked(target, path, option, wait):
            _remove_stale(target)
            tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
            _create(tmp, kind, path, option)
            try:
                yield tmp
                _commit(tmp, target)
                committed = True
            finally:
                _remove(tmp)
    finally:
        if not committed:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only while empty


def check_output(
    path: str | os.PathLike,
    overwrite: bool = False,
    inputs: Inputs = (),
    option: str = "--output",
    kind: str = "folder",
) -> Path:
    """The resolved target of ``path`` after the checks of ``staged_output`` that need no writing."""
    return _checked_target(path, overwrite, inputs, option, kind)


def _checked_target(path, overwrite: bool, inputs: Inputs, option: str, kind: str) -> Path:
    shown = str(path)
    if not shown.strip():
        raise LlmliteError(f"{option} is empty; give a path")
    target = Path(os.path.abspath(Path(path).expanduser())).resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == Path(target.anchor):
        raise LlmliteError(f"{option} {shown} is the root folder; choose a new folder for the output")
    if target == home:
        raise LlmliteError(f"{option} {shown} is the home folder; choose a new folder for the output")
    if cwd.is_relative_to(target):
        where = "the current folder" if cwd == target else "a parent of the current folder"
        raise LlmliteError(f"{option} {shown} is {where}; choose a new folder for the output")
    for name, value in inputs:
        source = _existing(value)
        if source is None:
            continue
        if source == target:
            raise LlmliteError(
                f"{option} {shown} is {name} {value}, an input of this run; choose another {option}"
            )
        if source.is_relative_to(target):
            raise LlmliteError(
                f"{option} {shown} contains {name} {value}, an input of this run; choose another {option}"
            )
        if target.is_relative_to(source):
            raise LlmliteError(
                f"{option} {shown} lies inside {name} {value}, an input of this run; "
                f"choose an {option} outside it"
            )
    if target.exists() or target.is_symlink():
        if kind == "folder" and not target.is_dir():
            raise LlmliteError(f"{option} {shown} is an existing file, not a folder; choose another {option}")
        if kind == "file" and target.is_dir():
            raise LlmliteError(f"{option} {shown} is an existing folder; give the path of a file")
        if not overwrite:
            raise LlmliteError(
                f"{option} {shown} already exists; pass --overwrite to replace it, or choose another {option}"
            )
    return target


def _existing(value) -> Path | None:
    if value is None or not str(value).strip():
        return None
    path = Path(value).expanduser()
    return path.resolve() if path.exists() else None


def _make_parents(target: Path, shown, option: str) -> list[Path]:
    """Create the target's missing parent folders; the ones created, outermost first."""
    missing = [p for p in reversed(target.parents) if not p.exists()]
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise LlmliteError(
            f"{option} {shown} lies under {blocking}, which is a file; choose a path in a folder"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmliteError(f"cannot create {option} {shown}: {_reason(e)}; choose a writable place") from None
    return missing


def _create(tmp: Path, kind: str, shown, option: str) -> None:
    try:
        if kind == "folder":
            tmp.mkdir()
        else:
            tmp.touch()
    except OSError as e:
        raise LlmliteError(f"cannot write {option} {shown}: {_reason(e)}; choose a writable place") from None


def _commit(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing target is first renamed aside, then removed."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        _remove(old)
    else:
        os.replace(tmp, target)


@contextmanager
def _locked(target: Path, shown, option: str, wait: bool) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``target`` (``flock``); the file is removed on release."""
    lock = target.with_name(f".{target.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LlmliteError(
                f"cannot write {option} {shown}: {_reason(e)}; choose a writable place"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LlmliteError(
                f"another llmlite run (process {owner}) is writing {option} {shown}; wait for it to "
                f"finish or choose another {option}"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file as we opened it: lock the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _remove_stale(target: Path) -> None:
    """Remove what killed runs left beside ``target``: with the lock held, no live run owns it."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(partial|old)-(\d+)")
    mine = str(os.getpid())
    for path in target.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and m.group(2) != mine:
            _remove(path)
            log.warning("removed %s, left by an interrupted run (process %s)", path, m.group(2))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _reason(e: OSError) -> str:
    return e.strerror or errno.errorcode.get(e.errno or 0, type(e).__name__)


def environment() -> dict:
    """What a result was measured with: versions, CPU, threads, the MKL shim's state, the GPU."""
    import torch
    import transformers

    from llmlite import __version__, blas

    return {
        "llmlite": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "mkl_avx2_shim": blas.state,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
