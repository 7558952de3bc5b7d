"""Run folders of ``train_svm``: how they are named, who owns them, how one is written and replaced.

* **Ownership.** Every run folder holds a marker, ``.cnncodes-run.json`` (``"format":
  "cnncodes.run/1"``). Only a folder with that marker is ever replaced (``overwrite=True``);
  a non-empty folder without it (``--out ~/thesis``) is refused, whatever the flags. The
  file system root, the home folder, the current folder and every folder above it, and the
  cache's own folder and every folder above it are refused as run folders outright.
* **Names.** The default name is ``<cache stem>__<layers>__<UTC time to the ms>__<settings
  hash>``; the folder is created with an exclusive ``mkdir``, so a name is never reused: a run
  that finds its name taken takes ``<name>-2``, ``-3`` ...
* **One writer.** A lock file beside the folder (``.<name>.lock``, pid and host, as the
  cache's :class:`~cnncodes.store.CacheLock`) is held while the run is written; a second writer
  to the same folder is refused at once (:class:`~cnncodes.errors.RunFolderLockedError`).
* **Atomic.** The run is written into a hidden staging folder beside the target and renamed
  onto it at the end (onto an absent or empty folder: one atomic rename; over an earlier run:
  the old folder is renamed aside first and put back if the second rename fails). A failed
  run removes its staging folder and leaves any earlier run untouched.

This module never imports torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .errors import RunFolderLockedError, UsageError
from .fileio import atomic_write_text

__all__ = ["MARKER", "RUN_FORMAT", "PREDICTIONS_HEADER", "settings_hash", "run_stamp", "default_run_name", "is_run_folder",
           "check_target", "staged_run"]

MARKER = ".cnncodes-run.json"
RUN_FORMAT = "cnncodes.run/1"
MAX_NAME_TRIES = 1000
#: The columns of a run's predictions/*.csv (train_svm in memory and streamed, fine-tuning).
PREDICTIONS_HEADER = ["path", "split", "true", "pred", "score"]


def settings_hash(settings: Mapping) -> str:
    """8 hex digits of the sha256 of the settings (canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_stamp() -> str:
    """UTC time to the millisecond, e.g. ``20240603-141502-123``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]


def default_run_name(cache: str | os.PathLike, layers: Sequence[str], concat: bool = False,
                     settings: Mapping | None = None) -> str:
    """``<cache stem>__<layers>__<UTC time, ms>__<settings hash>`` (unique once created by :func:`staged_run`)."""
    lay = "+".join(layers) if concat else "-".join(layers)
    return f"{Path(cache).stem}__{lay}__{run_stamp()}__{settings_hash(settings or {})}"


def is_run_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder that cnncodes wrote as a run folder (it holds the marker)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == RUN_FORMAT


def _protected(target: Path, cache: Path | None) -> str | None:
    """Why ``target`` can never be a run folder, or None."""
    t = target.resolve()
    if t == Path(t.anchor):
        return "the root of the file system"
    if t == Path.home().resolve():
        return "your home folder"
    cwd = Path.cwd().resolve()
    if t == cwd or t in cwd.parents:
        return "the current folder or a folder above it"
    if cache is not None:
        c = cache.resolve()
        if t == c:
            return "the cache file itself"
        if t in c.parents:
            return "the folder of the cache or a folder above it"
    return None


def check_target(target: Path, cache: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse a run folder that may not be written (or replaced), with what to do instead.

    Raises
    ------
    UsageError
        A protected folder, a symbolic link, a file, a non-empty folder that is not a run folder,
        or an existing run folder without ``overwrite``.
    """
    why = _protected(target, Path(cache) if cache is not None else None)
    if why:
        raise UsageError(f"The run folder {target} is {why}; a run folder is replaced as a whole, so it must be a "
                         f"folder of its own. Choose a new folder, e.g. out='{Path(target) / 'run1'}'.")
    if target.is_symlink():
        raise UsageError(f"The run folder {target} is a symbolic link; give the folder itself or a new one.")
    if not target.exists():
        return
    if not target.is_dir():
        raise UsageError(f"The run folder {target} is a file, not a folder: choose another folder for the 'out' parameter.")
    if not any(target.iterdir()):
        return
    if not is_run_folder(target):
        raise UsageError(
            f"{target} exists and is not a cnncodes run folder (it has no {MARKER}): cnncodes never deletes it, "
            f"even with overwrite=True. Choose a new folder for the 'out' parameter (a run folder written by an older cnncodes, "
            f"without the marker, must be deleted by hand)."
        )
    if not overwrite:
        raise UsageError(f"The run folder {target} exists and is not empty: choose another folder for the 'out' parameter or pass overwrite=True.")


def _lock(target: Path):
    from .store import CacheLock

    return CacheLock(target, lock_path=target.with_name(f".{target.name}.lock"), error=RunFolderLockedError)


def _reserve(base: Path) -> tuple[Path, object]:
    """Create ``base`` (or ``base-2``, ...) with an exclusive mkdir, under its lock: a name is never reused."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, MAX_NAME_TRIES + 1):
        target = base if k == 1 else base.with_name(f"{base.name}-{k}")
        lock = _lock(target)
        try:
            lock.acquire()
        except RunFolderLockedError:
            continue
        try:
            target.mkdir()
        except FileExistsError:
            lock.release()
            continue
        return target, lock
    raise RunFolderLockedError(f"No free run folder name next to {base} after {MAX_NAME_TRIES} tries; choose a folder with the 'out' parameter.")


@contextlib.contextmanager
def staged_run(target: Path, *, overwrite: bool, cache: str | os.PathLike | None, reserve: bool,
               marker: Mapping) -> Iterator[tuple[Path, Path]]:
    """Yield ``(staging folder, final target)``; on success write the marker and swap the staging folder in.

    ``reserve=True`` (a default name): ``target`` is created exclusively, renamed ``-2``... if taken.
    Otherwise ``target`` is locked and checked with :func:`check_target` (again before the swap, since
    the run takes time). The lock is held until the swap is done.

    Raises
    ------
    RunFolderLockedError
        Another process writes the same run folder.
    UsageError
        See :func:`check_target`.
    """
    target = Path(os.path.abspath(target))
    if reserve:
        target, lock = _reserve(target)
    else:
        check_target(target, cache, overwrite)  # before the lock: a protected path gets no lock file beside it
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(target).acquire()
    try:
        if not reserve:
            check_target(target, cache, overwrite)  # under the lock: no cnncodes writer changes it from now on
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            yield tmp, target
            atomic_write_text(tmp / MARKER, json.dumps(dict(marker, format=RUN_FORMAT), indent=2) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if reserve:
                with contextlib.suppress(OSError):
                    target.rmdir()  # the reserved, still empty folder
            raise
        _swap_in(tmp, target, cache, overwrite)
    finally:
        lock.release()


def _swap_in(tmp: Path, target: Path, cache, overwrite: bool) -> None:
    try:
        check_target(target, cache, overwrite)
    except UsageError as e:  # something else was put there during the run: keep the new run
        raise UsageError(f"{e} The new run was kept in {tmp}.") from None
    try:
        os.replace(tmp, target)  # absent or empty target: one atomic rename
        return
    except OSError:
        if not (target.is_dir() and any(target.iterdir())):
            raise
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
