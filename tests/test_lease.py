"""MODEL_DIR lease: a live holder refuses a second trainer, a stale lease is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from switch_jax.store import lease as lease_lib
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
    lease = Lease(tmp_path, ttl_s=120)
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
        lease = Lease(tmp_path, refresh_s=60)
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
