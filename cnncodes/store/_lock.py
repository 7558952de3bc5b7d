"""One writer per cache file: a lock file holding the writer's pid and host, stale locks taken over."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import CacheLockedError

log = logging.getLogger("cnncodes.store")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheLock:
    """One writer per cache: an ``O_EXCL`` lock file holding the writer's pid and host.

    A lock left by a killed process on this host is detected (its pid is gone) and
    broken with a warning; a live holder makes :meth:`acquire` raise at once.
    """

    def __init__(self, path: str | os.PathLike, *, lock_path: str | os.PathLike | None = None,
                 error: type[Exception] = CacheLockedError):
        self.target = Path(path)
        self.path = Path(lock_path) if lock_path is not None else self.target.with_name(self.target.name + ".lock")
        self.error = error  # what a refusal raises (run folders use their own class)
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def acquire(self) -> "CacheLock":
        """Take the lock.

        Raises
        ------
        CacheLockedError
            If a live process holds it.
        """
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self.holder()
                if h is None:
                    continue  # released between our open and read
                if h == {} and self._age() > 10:
                    # created but never filled in: its writer died between O_EXCL and the write (microseconds)
                    log.warning("Breaking an empty lock on %s (left by a process killed while taking it)", self.target)
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                same_host = h.get("host") == me["host"]
                if h and same_host and not _pid_alive(int(h.get("pid", -1))):
                    log.warning("Breaking a stale lock on %s left by pid %s (no longer running)", self.target, h.get("pid"))
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                raise self.error(
                    f"{self.target} is being written by pid {h.get('pid', '?')} on host {h.get('host', '?')} "
                    f"since {h.get('started', '?')}. Wait for it to finish. If that process is gone (another host, "
                    f"or a crashed machine), delete {self.path} and run again."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise self.error(f"Could not take the lock {self.path}; try again")

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "CacheLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
