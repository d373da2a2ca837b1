"""One trainer per MODEL_DIR: a lease file naming the holder, refreshed while the run lives.

    with lease.hold(model_dir):   # LeaseError (one line naming the holder) if a live run has it
        ... train ...

MODEL_DIR/trainer.lease is JSON {host, pid, started, refreshed, beat, token}; a thread rewrites it
every `refresh_s` with `beat` + 1. No decision compares two hosts' clocks:

- A starter takes a lease over only after watching it stay unchanged for `ttl_s` on its own
  monotonic clock, or at once if the holder's pid no longer runs on this host (a restart after
  kill -9). The holder's wall-clock `refreshed` can make a starter refuse sooner, never take over.
- `check()`, called before every save, re-reads the lease and compares the token. Once the
  holder's last successful refresh (its own monotonic clock) is older than the TTL minus a margin,
  a starter may have taken over: check() then passes only if a refresh that is atomic with
  takeovers succeeds now, and fails outright where the store cannot make it atomic or refreshes
  have been failing (a lost mount). So a takeover comes at least `margin_s` after the last moment
  the old holder passed check() without such a refresh. The trainer also passes check() to
  its checkpoints as the commit guard of every async save (store/checkpoints.py), so a save
  in flight when the holder stalled is never renamed into place, nor are old ones deleted.

Create, refresh, takeover and release run under one flock on trainer.lease.lock, and the lease is
linked or renamed into place (readers never see half of one). On gs:// each write carries a
generation precondition instead (google-cloud-storage, the `gcs` extra). Where flock is missing
or only excludes this host (FUSE mounts such as gcsfuse) one warning says what is lost: two
starters on different hosts may both win, and a refresh stalled for over `margin_s` may overwrite
a takeover; a stalled holder still stops before its next save.

Only the trainer (process 0 of a job) takes the lease; eval, info and infer only read MODEL_DIR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from absl import logging

from switch_jax.store.lease_stores import (
    MARGIN,
    GcsStore,
    Holder,
    LeaseError,
    LocalStore,
    clock,
)
from switch_jax.store.model_dir import LEASE_FILE

__all__ = ["LEASE_FILE", "Holder", "Lease", "LeaseError", "acquire_for_job", "hold"]

TTL_S = 120.0
REFRESH_S = 20.0
_HELD_HERE: set[str] = set()  # tokens this process holds (a restarted container may reuse a pid)


class Lease:
    """An acquired lease on `model_dir`; `lost` turns True once this holder may have lost it."""

    def __init__(self, model_dir: str, *, ttl_s: float = TTL_S, refresh_s: float = REFRESH_S):
        self.margin_s = MARGIN * ttl_s
        if not 0 < refresh_s < ttl_s - self.margin_s:
            raise ValueError(f"lease refresh_s={refresh_s} must be in (0, {ttl_s - self.margin_s})")
        path = os.path.join(os.fspath(model_dir), LEASE_FILE)
        self.model_dir = os.fspath(model_dir)
        remote = path.startswith("gs://")
        # Generous: safety never depends on it, it only bounds the wait behind a stalled process.
        lock_timeout_s = max(self.margin_s, 10.0)
        self.store = (GcsStore if remote else LocalStore)(path, lock_timeout_s=lock_timeout_s)
        self.ttl_s, self.refresh_s = ttl_s, refresh_s
        now = time.time()
        self.holder = Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        self.lost = False
        self.refresh_errors = 0  # failed refreshes since the lease was taken
        self._failing = 0  # failed refreshes since the last one that succeeded
        self._refreshing = threading.Lock()
        # True after taking over a lease by watching it expire: its holder may be a stalled
        # process that resumes (so its unfinished files must not be deleted under it).
        self.predecessor_may_live = False
        self._why_lost = ""
        self._last_ok = clock()  # start of the last write of ours that succeeded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lease; returns a take-over message, or None. Raises LeaseError if held.

        May watch a lease that looks stale for up to `ttl_s` before taking it over.
        """
        # Ours before it is written: a racing starter here must not take it for a dead pid's.
        _HELD_HERE.add(self.holder.token)
        try:
            return self._acquire()
        except OSError as e:
            _HELD_HERE.discard(self.holder.token)
            raise LeaseError(f"MODEL_DIR={self.model_dir}: cannot use {LEASE_FILE}: {e}") from None
        except BaseException:
            _HELD_HERE.discard(self.holder.token)
            raise

    def _acquire(self) -> str | None:
        for _ in range(5):  # a race with another starter, or a release while watching: again
            started = clock()
            if self.store.create(self.holder):
                self._start_refreshing(started)
                return None
            current = self.store.read()
            if current is None:
                continue
            why = self._dead(current[0])
            may_live = why is None
            why = why or self._watch(*current)
            if why is None:
                continue
            started = clock()
            if self.store.take_over(current[1], self.holder):
                self.predecessor_may_live = may_live
                self._start_refreshing(started)
                return f"took over the lease of MODEL_DIR={self.model_dir} from {why}"
        raise LeaseError(f"MODEL_DIR={self.model_dir}: could not take the lease (contended)")

    def _dead(self, other: Holder) -> str | None:
        """Why `other` may be taken over at once: its process is gone from this host."""
        if other.host != self.holder.host:
            return None
        now = time.time()
        if not _running(other.pid):
            return f"a run that is no longer running ({other.describe(now)})"
        if other.pid == os.getpid() and other.token not in _HELD_HERE:
            return f"an earlier process with this pid ({other.describe(now)})"
        return None

    def _watch(self, other: Holder, text: str) -> str | None:
        """Wait until the lease has stayed `text` for the TTL on our clock and say why it is
        stale; None if it vanished. Raises LeaseError as soon as it looks or proves alive."""
        mine = other.host == self.holder.host and other.token in _HELD_HERE
        if mine or time.time() - other.refreshed <= self.ttl_s:
            raise self._in_use(other, "")
        logging.warning(
            "MODEL_DIR=%s: the lease of %s looks stale; watching it for %.0fs before taking over",
            self.model_dir,
            other.describe(time.time()),
            self.ttl_s,
        )
        deadline = clock() + self.ttl_s
        while clock() < deadline:
            time.sleep(min(1.0, self.ttl_s / 20))
            current = self.store.read()
            if current is None:
                return None
            if current[1] != text:
                raise self._in_use(current[0], "; it was refreshed while this one waited")
            if why := self._dead(current[0]):
                return why
        return f"an expired run (unchanged for {self.ttl_s:g}s; {other.describe(time.time())})"

    def _in_use(self, other: Holder, note: str) -> LeaseError:
        return LeaseError(
            f"MODEL_DIR={self.model_dir} is in use by another trainer "
            f"({other.describe(time.time())}{note}); stop it or choose another MODEL_DIR "
            f"(a lease not refreshed for {self.ttl_s:g}s is taken over)"
        )

    def _start_refreshing(self, written_from: float) -> None:
        self._last_ok = written_from
        self._thread = threading.Thread(target=self._refresh_loop, name="lease", daemon=True)
        self._thread.start()

    def _age(self) -> float:
        return clock() - self._last_ok

    def _expired(self) -> bool:
        return self._age() > self.ttl_s - self.margin_s

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost, self._why_lost = True, why
            logging.error("%s", why)

    def _lose_stalled(self) -> None:
        cause = f"{self._failing} refreshes in a row failed" if self._failing else "it stalled"
        self._lose(
            f"MODEL_DIR={self.model_dir}: this trainer's lease was last refreshed "
            f"{self._age():.3g}s ago ({cause}), over the {self.ttl_s - self.margin_s:.3g}s after "
            f"which another trainer may take it over; stopping without saving"
        )

    def _lose_taken(self) -> None:
        self._lose(
            f"MODEL_DIR={self.model_dir} was taken over by another trainer while this one "
            f"stalled for over {self.ttl_s:g}s; stopping without saving"
        )

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s) and not self.lost:
            self._refresh()

    def _refresh(self) -> None:
        with self._refreshing:  # the thread and check() may both get here
            if self.lost:
                return
            # Past the age a starter may have taken over. A fenced store (flock, generations)
            # decides by this very write whether it did; an unfenced one cannot, nor after
            # failures, which may have been writes whose outcome is unknown.
            if self._expired() and (self._failing or not self.store.fenced):
                self._lose_stalled()
                return
            started = clock()
            beat = dataclasses.replace(
                self.holder, refreshed=time.time(), beat=self.holder.beat + 1
            )
            try:
                ok = self.store.refresh(beat)
            except Exception as e:  # a flaky mount or a stalled lock: retried until expired
                self.refresh_errors += 1
                self._failing += 1
                logging.warning("lease refresh of %s failed: %s", self.model_dir, e)
                if self._expired():
                    self._lose_stalled()
                return
            if not ok:
                self._lose_taken()
                return
            self.holder, self._last_ok, self._failing = beat, started, 0

    def check(self) -> None:
        """Raise LeaseError unless this trainer surely still holds the lease (call before writing).

        Reads the lease now and compares the token. Once the last successful refresh is older
        than the TTL minus the margin (a stall), it passes only if a refresh under the lock (or
        generation precondition) succeeds now; where the store cannot fence, it fails.
        """
        if self._expired():
            self._refresh()
        if not self.lost:
            try:
                current = self.store.read()
            except Exception as e:  # the age test above still fences: no takeover before TTL
                logging.warning("lease check of %s could not read it: %s", self.model_dir, e)
                return
            if current is None or current[0].token != self.holder.token:
                self._lose_taken()
        if self.lost:
            raise LeaseError(self._why_lost)

    def release(self) -> None:
        """Stop refreshing and delete the lease if it is surely still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # Unfenced, a delete after the age could remove a takeover's lease; fenced, the token
        # compare under the lock decides.
        if self._thread and not self.lost and (self.store.fenced or not self._expired()):
            try:
                self.store.release(self.holder)
            except Exception as e:  # left behind: the next start watches it expire
                logging.warning("lease release of %s failed: %s", self.model_dir, e)
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
