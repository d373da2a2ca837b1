"""Where the MODEL_DIR lease lives: a file under flock, or a gs:// object under generations.

Each store reads the lease as (Holder, exact text) and writes it only atomically: `create` if
absent, `take_over` if it still reads `stale_text`, `refresh` if it still carries our token,
`release` likewise. `fenced` says whether these writes are atomic with one another across hosts;
the protocol on top (lease.py) decides what to trust where they are not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator

from absl import logging

MARGIN = 0.25  # of the TTL: time for a check() that passed to start its save
_WARNED: set[str] = set()  # lock files already warned about


class LeaseError(RuntimeError):
    """MODEL_DIR is held by another live trainer (or this one lost its lease)."""


def clock() -> float:
    """Seconds on this host's monotonic clock, counting suspended time where it can."""
    # BOOTTIME also advances while the machine is suspended; MONOTONIC would hide the stall.
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    refreshed: float  # wall clock, for people only: the protocol never compares it across hosts
    token: str
    beat: int = 0

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.started))
        return (
            f"host {self.host}, pid {self.pid}, started {started} UTC, refreshed "
            f"{max(0.0, now - self.refreshed):.0f}s ago"
        )


class LocalStore:
    """The lease file on a local (or mounted) file system; every write under the flock."""

    def __init__(self, path: str, lock_timeout_s: float):
        self.path = path
        self.lock_timeout_s = lock_timeout_s
        self.fenced = True  # flock excludes every host: a refresh and a takeover never overlap
        fstype = _fstype(os.path.dirname(path))
        if fstype == "fuse" or fstype.startswith("fuse."):  # gcsfuse, sshfs: flock is per host
            self._unfenced(f"is on a {fstype} mount, where flock only excludes this host")

    def _unfenced(self, why: str) -> None:
        self.fenced = False
        if self.path not in _WARNED:
            _WARNED.add(self.path)
            logging.warning(
                "%s %s: a holder still stops before saving once it sees a takeover or goes %.0f%% "
                "of the TTL without a refresh (even if nobody took over), but two starters on "
                "different hosts may both take the lease, and a refresh stalled for over %.0f%% "
                "of the TTL may overwrite a takeover (for a GCS bucket use a gs:// MODEL_DIR)",
                self.path,
                why,
                100 * (1 - MARGIN),
                100 * MARGIN,
            )

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        try:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only or odd mount
            self._unfenced(f"has no lock file ({e.strerror})")
            yield
            return
        try:
            self._lock(fd)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _lock(self, fd: int) -> None:
        # Polled rather than blocking: a holder stopped inside its turn must not hang the others.
        deadline = clock() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if clock() > deadline:
                    raise LeaseError(
                        f"{self.path}.lock is held for over {self.lock_timeout_s:.0f}s by a "
                        f"stalled process; stop it or remove that file"
                    ) from None
                time.sleep(0.01)
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                self._unfenced(f"is on a file system without flock ({e.strerror})")
                return

    def read(self) -> tuple[Holder, str] | None:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return _parse(text), text

    def create(self, holder: Holder) -> bool:
        with self._turn():
            return self._create(holder)

    def _create(self, holder: Holder) -> bool:
        # Written aside and linked into place: a reader never sees a half-written lease.
        tmp = self._aside("new", holder)
        try:
            os.link(tmp, self.path)  # atomic, fails if a lease exists
        except FileExistsError:
            return False
        except OSError:  # no hard links (some FUSE mounts): exclusive create instead
            return self._create_exclusive(holder)
        finally:
            os.unlink(tmp)
        return True

    def _create_exclusive(self, holder: Holder) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(_dump(holder))
        return True

    def take_over(self, stale_text: str, holder: Holder) -> bool:
        """Replace the lease whose content is `stale_text`; False if it changed meanwhile."""
        with self._turn():
            # Renamed aside first so that, even without flock, of two takers one gets
            # FileNotFoundError (where rename is atomic: not on gcsfuse).
            aside = f"{self.path}.stale-{holder.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            with open(aside) as f:
                moved = f.read()
            if moved != stale_text:  # refreshed or taken over since the starter's last look
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                os.unlink(aside)
                return False
            os.unlink(aside)
            return self._create(holder)

    def refresh(self, holder: Holder) -> bool:
        """Rewrite our lease as `holder`; False if it is no longer ours."""
        with self._turn():
            current = self.read()
            if current is None or current[0].token != holder.token:
                return False
            tmp = self._aside("tmp", holder)
            try:
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return True

    def release(self, holder: Holder) -> None:
        with self._turn():
            current = self.read()
            if current is not None and current[0].token == holder.token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def _aside(self, kind: str, holder: Holder) -> str:
        tmp = f"{self.path}.{kind}-{holder.token}"
        with open(tmp, "w") as f:
            f.write(_dump(holder))
        return tmp


class GcsStore:
    """The lease object on gs://, every write conditioned on a generation.

    Unmeasured against a real bucket here; needs `pip install switch_jax[gcs]`.
    """

    def __init__(self, path: str, lock_timeout_s: float = 0.0):
        try:
            from google.cloud import storage  # noqa: PLC0415
        except ImportError:
            raise LeaseError(
                f"the lease {path} needs google-cloud-storage: pip install 'switch_jax[gcs]'"
            ) from None

        bucket, _, name = path[len("gs://") :].partition("/")
        self.blob = storage.Client().bucket(bucket).blob(name)
        self.seen: int | None = None  # generation of the last read: what a takeover replaces
        self.mine: int | None = None  # generation of our last write: what a refresh replaces
        self.fenced = True
        self._lock = threading.Lock()  # the refresh thread and check() share `blob`

    def read(self) -> tuple[Holder, str] | None:
        from google.api_core import exceptions  # noqa: PLC0415

        with self._lock:
            try:
                self.blob.reload()
                text = self.blob.download_as_text(if_generation_match=self.blob.generation)
            except (exceptions.NotFound, exceptions.PreconditionFailed):
                return None
            self.seen = self.blob.generation
        return _parse(text), text

    def _write(self, holder: Holder, if_generation_match: int | None) -> bool:
        from google.api_core import exceptions  # noqa: PLC0415

        if if_generation_match is None:
            return False
        with self._lock:
            try:
                self.blob.upload_from_string(_dump(holder), if_generation_match=if_generation_match)
            except exceptions.PreconditionFailed:
                return False
            self.mine = self.blob.generation
        return True

    def create(self, holder: Holder) -> bool:
        return self._write(holder, 0)  # 0: only if no object exists

    def take_over(self, stale_text: str, holder: Holder) -> bool:
        return self._write(holder, self.seen)  # the starter's last read saw `stale_text`

    def refresh(self, holder: Holder) -> bool:
        return self._write(holder, self.mine)

    def release(self, holder: Holder) -> None:
        from google.api_core import exceptions  # noqa: PLC0415

        if self.mine is None:  # never written: whatever is there is not ours
            return
        with self._lock, contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
            self.blob.delete(if_generation_match=self.mine)


def _fstype(directory: str) -> str:
    """The file system type of the mount holding `directory` ('' if unknown)."""
    best, fstype = "", ""
    target = os.path.realpath(directory)
    with contextlib.suppress(OSError):
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                point = fields.split()[4].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, rest.split()[0]
    return fstype


def _dump(holder: Holder) -> str:
    return json.dumps(dataclasses.asdict(holder), sort_keys=True) + "\n"


def _parse(text: str) -> Holder:
    try:
        fields = json.loads(text)
        known = {f.name for f in dataclasses.fields(Holder)}
        return Holder(**{k: v for k, v in fields.items() if k in known})
    except (json.JSONDecodeError, TypeError, AttributeError):  # torn: nobody can be holding it
        return Holder("?", -1, 0.0, 0.0, "")
