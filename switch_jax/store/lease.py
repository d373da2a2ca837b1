"""One trainer per MODEL_DIR: a lease file naming the holder, refreshed while the run lives.

    with lease.hold(model_dir):   # LeaseError (one line naming the holder) if a live run has it
        ... train ...

MODEL_DIR/trainer.lease is JSON {host, pid, started, refreshed, token}. A thread rewrites
`refreshed` every `refresh_s`; a lease not refreshed for `ttl_s` is stale and the next trainer
takes it over with a message (a lease of a process that is no longer running on this host is
stale at once, so a local restart after kill -9 does not wait). Taking over is atomic: locally
starters take turns under an flock on trainer.lease.lock, and the stale file is renamed away (one
renamer wins) before an exclusive create, which alone keeps one winner where flock is missing;
on gs:// every write carries a generation precondition (google-cloud-storage, the `gcs` extra).

Only the trainer (process 0 of a job) takes the lease; eval, info and infer only read MODEL_DIR.
A holder that finds its lease taken over (it stalled past the TTL) sets `lost`, and the trainer
stops before its next save instead of writing beside the new holder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from absl import logging

LEASE_FILE = "trainer.lease"
TTL_S = 120.0
REFRESH_S = 20.0
_HELD_HERE: set[str] = set()  # tokens this process holds (a restarted container may reuse a pid)


class LeaseError(RuntimeError):
    """MODEL_DIR is held by another live trainer (or this one lost its lease)."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    refreshed: float
    token: str

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.started))
        return (
            f"host {self.host}, pid {self.pid}, started {started} UTC, refreshed "
            f"{max(0.0, now - self.refreshed):.0f}s ago"
        )


class LocalStore:
    """The lease file on a local (or mounted) file system."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Exclusive among starters on this file system while it lasts."""
        try:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only or odd mount: the rename protocol alone
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no flock on this mount (some NFS/FUSE)
                pass
            yield
        finally:
            os.close(fd)  # releases the flock

    def read(self) -> tuple[Holder, str] | None:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return _parse(text), text

    def create(self, holder: Holder) -> bool:
        # Written aside and linked into place: a reader never sees a half-written lease.
        tmp = f"{self.path}.new-{holder.token}"
        with open(tmp, "w") as f:
            f.write(_dump(holder))
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
        aside = f"{self.path}.stale-{holder.token}"
        try:
            os.rename(self.path, aside)  # atomic: of two takers, one gets FileNotFoundError
        except FileNotFoundError:
            return False
        with open(aside) as f:
            moved = f.read()
        if moved != stale_text:  # refreshed or taken over between our read and the rename
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self.create(holder)

    def refresh(self, holder: Holder) -> bool:
        """Rewrite our lease; False if it is no longer ours."""
        current = self.read()
        if current is None or current[0].token != holder.token:
            return False
        tmp = f"{self.path}.tmp-{holder.token}"
        with open(tmp, "w") as f:
            f.write(_dump(holder))
        os.replace(tmp, self.path)
        return True

    def release(self, holder: Holder) -> None:
        current = self.read()
        if current is not None and current[0].token == holder.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class GcsStore:
    """The lease object on gs://, every write conditioned on the generation we last saw.

    Unmeasured here (no GCS in this environment); needs `pip install switch_jax[gcs]`.
    """

    def __init__(self, path: str):
        try:
            from google.cloud import storage  # noqa: PLC0415
        except ImportError:
            raise LeaseError(
                f"the lease {path} needs google-cloud-storage: pip install 'switch_jax[gcs]'"
            ) from None

        bucket, _, name = path[len("gs://") :].partition("/")
        self.blob = storage.Client().bucket(bucket).blob(name)
        self.generation: int | None = None

    def read(self) -> tuple[Holder, str] | None:
        from google.api_core import exceptions  # noqa: PLC0415

        try:
            self.blob.reload()
            text = self.blob.download_as_text(if_generation_match=self.blob.generation)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            return None
        self.generation = self.blob.generation
        return _parse(text), text

    def _write(self, holder: Holder, if_generation_match: int) -> bool:
        from google.api_core import exceptions  # noqa: PLC0415

        try:
            self.blob.upload_from_string(_dump(holder), if_generation_match=if_generation_match)
        except exceptions.PreconditionFailed:
            return False
        self.generation = self.blob.generation
        return True

    def turn(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the generation preconditions decide

    def create(self, holder: Holder) -> bool:
        return self._write(holder, 0)  # 0: only if no object exists

    def take_over(self, stale_text: str, holder: Holder) -> bool:
        return self.generation is not None and self._write(holder, self.generation)

    def refresh(self, holder: Holder) -> bool:
        return self.generation is not None and self._write(holder, self.generation)

    def release(self, holder: Holder) -> None:
        from google.api_core import exceptions  # noqa: PLC0415

        with contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
            self.blob.delete(if_generation_match=self.generation)


class Lease:
    """An acquired lease on `model_dir`; `lost` turns True if another trainer took it over."""

    def __init__(self, model_dir: str, *, ttl_s: float = TTL_S, refresh_s: float = REFRESH_S):
        path = os.path.join(os.fspath(model_dir), LEASE_FILE)
        self.model_dir = os.fspath(model_dir)
        self.store = GcsStore(path) if path.startswith("gs://") else LocalStore(path)
        self.ttl_s, self.refresh_s = ttl_s, refresh_s
        now = time.time()
        self.holder = Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lease; returns a take-over message, or None. Raises LeaseError if held."""
        for _ in range(5):  # a race with another starter: look again
            with self.store.turn():
                if self.store.create(self.holder):
                    self._start_refreshing()
                    return None
                current = self.store.read()
                if current is None:
                    continue
                other, text = current
                why = self._stale(other)
                if why is None:
                    raise LeaseError(
                        f"MODEL_DIR={self.model_dir} is in use by another trainer "
                        f"({other.describe(time.time())}); stop it or choose another MODEL_DIR "
                        f"(a lease not refreshed for {self.ttl_s:.0f}s is taken over)"
                    )
                if self.store.take_over(text, self.holder):
                    self._start_refreshing()
                    return f"took over the lease of MODEL_DIR={self.model_dir} from {why}"
        raise LeaseError(f"MODEL_DIR={self.model_dir}: could not take the lease (contended)")

    def _stale(self, other: Holder) -> str | None:
        """Why the lease `other` may be taken over, or None if its holder may be alive."""
        now = time.time()
        if now - other.refreshed > self.ttl_s:
            return f"an expired run ({other.describe(now)})"
        if other.host == self.holder.host and not _running(other.pid):
            return f"a run that is no longer running ({other.describe(now)})"
        if other.host == self.holder.host and other.pid == os.getpid():
            if other.token in _HELD_HERE:
                return None
            return f"an earlier process with this pid ({other.describe(now)})"
        return None

    def _start_refreshing(self) -> None:
        _HELD_HERE.add(self.holder.token)
        self._thread = threading.Thread(target=self._refresh_loop, name="lease", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.holder = dataclasses.replace(self.holder, refreshed=time.time())
            try:
                ok = self.store.refresh(self.holder)
            except OSError as e:  # a flaky mount: keep trying until the TTL says otherwise
                logging.warning("lease refresh of %s failed: %s", self.model_dir, e)
                continue
            if not ok:
                self.lost = True
                logging.error("the lease of MODEL_DIR=%s was taken over", self.model_dir)
                return

    def check(self) -> None:
        """Raise LeaseError if another trainer took the lease (call before writing)."""
        if self.lost:
            raise LeaseError(
                f"MODEL_DIR={self.model_dir} was taken over by another trainer while this one "
                f"stalled for over {self.ttl_s:.0f}s; stopping without saving"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            self.store.release(self.holder)
        _HELD_HERE.discard(self.holder.token)


@contextlib.contextmanager
def hold(model_dir: str, **kwargs) -> Iterator[Lease]:
    """Hold the lease of `model_dir` for the block; prints a take-over message if there is one."""
    lease = Lease(model_dir, **kwargs)
    message = lease.acquire()
    if message:
        print(message, flush=True)
    try:
        yield lease
    finally:
        lease.release()


def acquire_for_job(model_dir: str, **kwargs) -> Lease | None:
    """The trainer's lease: process 0 takes it and prints any take-over; every process of a
    multi-host job raises LeaseError if process 0 could not. Returns process 0's Lease."""
    import jax
    import numpy as np

    lease, error = None, None
    if jax.process_index() == 0:
        lease = Lease(model_dir, **kwargs)
        try:
            message = lease.acquire()
            if message:
                print(message, flush=True)
        except LeaseError as e:
            lease, error = None, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not int(ok) and error is None:
            error = LeaseError(f"MODEL_DIR={model_dir} is in use (see process 0's message)")
    if error is not None:
        raise error
    return lease


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _dump(holder: Holder) -> str:
    return json.dumps(dataclasses.asdict(holder), sort_keys=True) + "\n"


def _parse(text: str) -> Holder:
    try:
        return Holder(**json.loads(text))
    except (json.JSONDecodeError, TypeError):  # a torn write: nobody can be holding it
        return Holder("?", -1, 0.0, 0.0, "")
