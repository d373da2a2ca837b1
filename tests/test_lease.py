"""MODEL_DIR lease: a live holder refuses a second trainer, a stale lease is taken over."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from switch_jax.store import lease as lease_lib
from switch_jax.store import lease_stores
from switch_jax.store.lease import LEASE_FILE, Lease, LeaseError


def _write(model_dir, **fields):
    now = time.time()
    holder = {
        "host": "other-host",
        "pid": 4242,
        "started": now - 60,
        "refreshed": now,
        "token": "t0",
        **fields,
    }
    (model_dir / LEASE_FILE).write_text(json.dumps(holder))


def _holder(model_dir) -> dict:
    return json.loads((model_dir / LEASE_FILE).read_text())


def test_first_takes_second_is_refused_naming_the_holder(tmp_path):
    first = Lease(tmp_path, refresh_s=60)
    assert first.acquire() is None
    held = _holder(tmp_path)
    assert (held["pid"], held["token"]) == (os.getpid(), first.holder.token)
    with pytest.raises(LeaseError) as e:
        Lease(tmp_path).acquire()
    message = str(e.value)
    assert "\n" not in message
    assert f"MODEL_DIR={tmp_path} is in use by another trainer (host " in message
    assert f"pid {os.getpid()}," in message
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    second = Lease(tmp_path)
    assert second.acquire() is None  # free again after release
    second.release()


def test_live_lease_on_another_host_is_refused(tmp_path):
    _write(tmp_path, refreshed=time.time() - 30)
    with pytest.raises(LeaseError, match="host other-host, pid 4242, .*refreshed 30s ago"):
        Lease(tmp_path, ttl_s=120).acquire()
    assert _holder(tmp_path)["token"] == "t0"  # untouched


def test_expired_lease_is_taken_over_with_a_message(tmp_path):
    _write(tmp_path, refreshed=time.time() - 500)
    lease = Lease(tmp_path, ttl_s=1.0, refresh_s=0.7)  # watched unchanged for the TTL first
    message = lease.acquire()
    assert message.startswith(f"took over the lease of MODEL_DIR={tmp_path} from an expired run")
    assert "host other-host, pid 4242" in message
    assert _holder(tmp_path)["token"] == lease.holder.token
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [LEASE_FILE, f"{LEASE_FILE}.lock"]  # no stale or tmp files
    lease.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write(tmp_path, host=Lease(tmp_path).holder.host, pid=dead.pid)
    lease = Lease(tmp_path)
    assert "no longer running" in lease.acquire()
    lease.release()


def _wait_for(condition, timeout=20.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_refresh_keeps_a_live_lease_and_notices_a_take_over(tmp_path):
    lease = Lease(tmp_path, refresh_s=0.05)
    lease.acquire()
    first = _holder(tmp_path)["refreshed"]
    _wait_for(lambda: _holder(tmp_path)["refreshed"] > first)
    assert _holder(tmp_path)["token"] == lease.holder.token
    _write(tmp_path, refreshed=time.time())  # someone else now holds it
    _wait_for(lambda: lease.lost)
    with pytest.raises(LeaseError, match="was taken over by another trainer"):
        lease.check()
    lease.release()
    assert _holder(tmp_path)["token"] == "t0"  # the new holder's lease is not deleted


@pytest.mark.parametrize("round_", range(10))
def test_racing_takers_of_a_stale_lease_only_one_wins(tmp_path, round_):
    _write(tmp_path, refreshed=0.0)
    results, winners = [], []

    def take():
        lease = Lease(tmp_path, ttl_s=0.3, refresh_s=0.2)
        try:
            message = lease.acquire()
        except LeaseError as e:
            results.append(str(e))
            return
        results.append(message)
        winners.append(lease)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A winner may have taken the stale lease over, or created it in the instant it was renamed
    # away; either way exactly one holds it and it is the one in the file.
    assert len(winners) == 1, results
    holder = json.loads((tmp_path / LEASE_FILE).read_text())
    assert holder["token"] == winners[0].holder.token
    winners[0].release()


def test_hold_releases_on_error(tmp_path):
    with pytest.raises(ValueError), lease_lib.hold(tmp_path):
        raise ValueError
    assert not (tmp_path / LEASE_FILE).exists()


def test_check_reads_the_lease_now_not_only_the_refresh_threads_flag(tmp_path):
    lease = Lease(tmp_path, refresh_s=60)  # the refresh thread will not look for a minute
    lease.acquire()
    lease.check()
    _write(tmp_path, refreshed=time.time())
    with pytest.raises(LeaseError, match="was taken over by another trainer"):
        lease.check()
    lease.release()
    assert _holder(tmp_path)["token"] == "t0"


# A trainer in miniature: takes the lease, then for each "save" line on stdin calls check() and,
# if it passes, writes a checkpoint file; answers one line per command.
_TRAINER = """
import os, sys
from switch_jax.store.lease import Lease, LeaseError
model_dir, ttl, refresh = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lease = Lease(model_dir, ttl_s=ttl, refresh_s=refresh)
lease.acquire()
print("held", lease.holder.token, flush=True)
for n, line in enumerate(sys.stdin):
    try:
        lease.check()
    except LeaseError as e:
        print("refused", e, flush=True)
        continue
    open(os.path.join(model_dir, f"checkpoint-{n}"), "w").close()
    print("saved", flush=True)
lease.release()
"""


class _Trainer:
    def __init__(self, model_dir, ttl_s, refresh_s):
        args = [sys.executable, "-c", _TRAINER, str(model_dir), str(ttl_s), str(refresh_s)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        held, self.token = self.proc.stdout.readline().split()
        assert held == "held"

    def save(self) -> str:
        self.proc.stdin.write("save\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def finish(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(timeout=60)


def _checkpoints(model_dir) -> list[str]:
    return sorted(p.name for p in model_dir.glob("checkpoint-*"))


def test_a_stalled_holder_never_saves_once_another_holds_the_lease(tmp_path):
    ttl = 1.0
    old = _Trainer(tmp_path, ttl, 0.2)
    try:
        assert old.save() == "saved"
        os.kill(old.proc.pid, signal.SIGSTOP)  # a paused VM, a hung mount
        # Until the lease looks old even by the wall clock, a starter refuses at once.
        _wait_for(lambda: time.time() - _holder(tmp_path)["refreshed"] > ttl)
        new = Lease(tmp_path, ttl_s=ttl, refresh_s=0.2)
        assert "from an expired run" in new.acquire()  # watched unchanged for the TTL
        assert new.predecessor_may_live  # so its unfinished checkpoint files are left alone
        before = _checkpoints(tmp_path)
    finally:
        os.kill(old.proc.pid, signal.SIGCONT)
    # Resumed, the old holder refuses its very next save, whatever its refresh thread did.
    for _ in range(2):
        reply = old.save()
        assert reply.startswith("refused MODEL_DIR="), reply
        assert reply.endswith("stopping without saving")
    assert old.finish() == 0
    assert _checkpoints(tmp_path) == before == ["checkpoint-0"]
    assert _holder(tmp_path)["token"] == new.holder.token  # neither overwritten nor deleted
    new.release()


# A holder with real Orbax async saves whose commit is gated by the lease (as in the trainer). The
# test holds each commit at the gate (before Orbax renames the save and applies keep-K) until it
# sends a line, so that the stall lands inside the save every time.
_ORBAX_HOLDER = """
import os, sys, threading
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np
from switch_jax.store import checkpoints
from switch_jax.store.lease import Lease
model_dir, ttl, refresh = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lease = Lease(model_dir, ttl_s=ttl, refresh_s=refresh)
lease.acquire()
go = threading.Semaphore(0)
def guard():
    print("commit pending", flush=True)
    go.acquire()
    lease.check()
ckpts = checkpoints.Checkpoints(model_dir, period=1, keep=1, commit_guard=guard)
threading.Thread(target=lambda: [go.release() for _ in sys.stdin], daemon=True).start()
for step in (1, 2):
    ckpts.save(step, {"w": np.full(4, step, np.float32)}, force=True)
    try:
        ckpts.wait()
        print("committed", step, flush=True)
    except checkpoints.CommitRefused as e:
        print("refused", e, flush=True)
lease.release()
"""


def test_a_holder_stalled_inside_an_async_save_commits_and_deletes_nothing(tmp_path):
    ttl = 1.0
    args = [sys.executable, "-c", _ORBAX_HOLDER, str(tmp_path), str(ttl), "0.2"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    steps = lambda: sorted(p.name for p in (tmp_path / "checkpoints").iterdir())  # noqa: E731

    def reply(go: bool) -> str:
        if go:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        assert reply(go=False) == "commit pending"
        assert reply(go=True) == "committed 1"
        assert reply(go=False) == "commit pending"  # step 2 is written, its commit not yet run
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            _wait_for(lambda: time.time() - _holder(tmp_path)["refreshed"] > ttl)
            new = Lease(tmp_path, ttl_s=ttl, refresh_s=0.2)
            assert "from an expired run" in new.acquire()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        refused = reply(go=True)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert refused.startswith("refused checkpoint 2 not committed: MODEL_DIR="), refused
    assert refused.endswith("stopping without saving")
    # Without the gate, step 2 would have been renamed into place and keep=1 would have deleted
    # step 1, the checkpoint the new holder resumes from.
    assert [s for s in steps() if "tmp" not in s] == ["1"]
    assert _holder(tmp_path)["token"] == new.holder.token
    new.release()


def test_a_starter_whose_clock_runs_ahead_cannot_take_a_live_lease(tmp_path, monkeypatch):
    holder = _Trainer(tmp_path, 5.0, 0.1)  # a generous TTL: the holder is never late here
    try:
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 100)  # the live lease looks 100 s old
        with pytest.raises(LeaseError, match="in use by .*refreshed while this one waited"):
            Lease(tmp_path, ttl_s=5.0, refresh_s=0.1).acquire()
        monkeypatch.undo()
        assert _holder(tmp_path)["token"] == holder.token
        assert holder.save() == "saved"
    finally:
        assert holder.finish() == 0
    assert not (tmp_path / LEASE_FILE).exists()


# Runs store operations sent as JSON lines, answering 1 if the write happened, else 0.
_RACER = """
import json, sys
from switch_jax.store.lease_stores import Holder, LocalStore
store = LocalStore(sys.argv[1], lock_timeout_s=60)
print("ready", flush=True)
for line in sys.stdin:
    op = json.loads(line)
    holder = Holder(**op["holder"])
    ok = store.refresh(holder) if op["op"] == "refresh" else store.take_over(op["stale"], holder)
    print(int(ok), flush=True)
"""


def test_refresh_racing_a_takeover_leaves_exactly_one_writer(tmp_path):
    path = tmp_path / LEASE_FILE
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    rng = random.Random(0)
    try:
        assert [r.stdout.readline().strip() for r in racers] == ["ready", "ready"]
        for round_ in range(200):  # the unlocked refresh lost within ~200 rounds
            now = time.time()
            old = lease_lib.Holder("h", 1, now, now, f"old{round_}")
            path.write_text(lease_stores._dump(old))
            ops = [
                {"op": "refresh", "holder": {**dataclasses.asdict(old), "beat": 1}},
                {
                    "op": "take",
                    "stale": path.read_text(),
                    "holder": {**dataclasses.asdict(old), "token": f"new{round_}"},
                },
            ]
            order = rng.sample(range(2), 2)  # either may be sent first
            for i in order:
                racers[i].stdin.write(json.dumps(ops[i]) + "\n")
                racers[i].stdin.flush()
            wrote = [racers[i].stdout.readline().strip() == "1" for i in range(2)]
            assert sum(wrote) == 1, (round_, wrote)
            winner = ops[wrote.index(True)]["holder"]
            assert _holder(tmp_path) == {**winner, "beat": winner.get("beat", 0)}
    finally:
        for r in racers:
            r.stdin.close()
            r.wait(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE_FILE, f"{LEASE_FILE}.lock"]


def test_a_refresh_that_keeps_failing_marks_the_holder_lost(tmp_path):
    lease = Lease(tmp_path, ttl_s=1.0, refresh_s=0.1)
    lease.acquire()

    def cut_off(holder):
        raise OSError(errno.EIO, "Input/output error")

    lease.store.refresh = cut_off  # the mount went away
    _wait_for(lambda: lease.lost)
    assert lease.refresh_errors >= 1
    # Nobody took the lease, yet the holder must assume someone may have.
    assert _holder(tmp_path)["token"] == lease.holder.token
    with pytest.raises(
        LeaseError, match=r"last refreshed [\d.]+s ago \(\d+ refreshes in a row failed\).* stopping"
    ):
        lease.check()
    lease.release()


def test_without_flock_one_warning_says_what_is_lost_and_a_stall_stops_the_holder(
    tmp_path, monkeypatch, caplog
):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lease = Lease(tmp_path, ttl_s=0.4, refresh_s=0.05)
    with caplog.at_level("WARNING"):
        lease.acquire()
    warnings = [r.getMessage() for r in caplog.records if "without flock" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "two starters on different hosts may both take the lease" in warnings[0]
    lease._stop.set()  # the holder stalls; nobody takes the lease over
    lease._thread.join()
    _wait_for(lambda: lease._expired())
    # A refresh here could overlap a takeover unseen: the holder must stop instead.
    with pytest.raises(LeaseError, match=r"last refreshed [\d.]+s ago \(it stalled\)"):
        lease.check()
    assert _holder(tmp_path)["token"] == lease.holder.token
    lease.release()


@pytest.mark.skipif(
    lease_stores._fstype("/tmp").startswith("fuse"), reason="needs a file system with flock"
)
def test_a_holder_stalled_past_the_ttl_that_nobody_took_over_keeps_saving(tmp_path):
    ttl = 1.0
    trainer = _Trainer(tmp_path, ttl, 0.2)
    os.kill(trainer.proc.pid, signal.SIGSTOP)  # Ctrl-Z, a long GC pause, a migrated VM
    try:
        _wait_for(lambda: time.time() - _holder(tmp_path)["refreshed"] > ttl)
    finally:
        os.kill(trainer.proc.pid, signal.SIGCONT)
    # Its refresh under the flock proves nobody took the lease meanwhile: no work is lost.
    assert trainer.save() == "saved"
    assert trainer.finish() == 0
    assert not (tmp_path / LEASE_FILE).exists()


class _FakeBucket:
    """Just enough of google-cloud-storage: objects with generations and preconditions."""

    def __init__(self):
        from google.api_core import exceptions

        self.objects, self.generations, self.lock = {}, iter(range(1, 10**9)), threading.Lock()
        self.errors = exceptions

    def blob(self, name):
        return _FakeBlob(self, name)


class _FakeBlob:
    def __init__(self, bucket, name):
        self.bucket, self.name, self.generation = bucket, name, None

    def _current(self, if_generation_match):
        generation, text = self.bucket.objects.get(self.name, (0, None))
        if if_generation_match is not None and generation != if_generation_match:
            raise self.bucket.errors.PreconditionFailed("generation")
        return generation, text

    def reload(self):
        if self.name not in self.bucket.objects:
            raise self.bucket.errors.NotFound(self.name)
        self.generation = self.bucket.objects[self.name][0]

    def download_as_text(self, if_generation_match):
        with self.bucket.lock:
            generation, text = self._current(if_generation_match)
        if text is None:
            raise self.bucket.errors.NotFound(self.name)
        return text

    def upload_from_string(self, text, if_generation_match):
        with self.bucket.lock:
            self._current(if_generation_match)
            self.generation = next(self.bucket.generations)
            self.bucket.objects[self.name] = (self.generation, text)

    def delete(self, if_generation_match):
        with self.bucket.lock:
            self._current(if_generation_match)
            del self.bucket.objects[self.name]


def test_on_gcs_a_takeover_and_a_late_refresh_are_decided_by_generation(monkeypatch):
    from google.cloud import storage

    bucket = _FakeBucket()
    client = type("Client", (), {"bucket": lambda self, name: bucket})
    monkeypatch.setattr(storage, "Client", client)
    old = Lease("gs://b/run", ttl_s=0.4, refresh_s=0.1)
    old.holder = dataclasses.replace(old.holder, host="other-host")  # as if on another VM
    assert old.acquire() is None
    old._stop.set()  # stalls: its refresh thread ends, the lease stays
    old._thread.join()
    _wait_for(lambda: time.time() - old.holder.refreshed > 0.4)
    new = Lease("gs://b/run", ttl_s=0.4, refresh_s=0.1)
    assert "from an expired run" in new.acquire()
    assert not old.store.refresh(old.holder)  # its generation is gone: the write is refused
    with pytest.raises(LeaseError, match="stopping without saving"):
        old.check()
    old.release()
    new.check()
    assert json.loads(bucket.objects["run/trainer.lease"][1])["token"] == new.holder.token
    new.release()
    assert not bucket.objects
