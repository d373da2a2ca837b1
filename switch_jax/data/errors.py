"""The one exception the data package raises for user-fixable problems, and a bounded path check."""

from __future__ import annotations

import os
import threading


def _on_gce() -> bool:
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return "Google" in f.read()
    except OSError:
        return False


# TF's GCS client probes the GCE metadata server for credentials; off Google Cloud that probe
# only waits for a timeout. On a GCE/TPU VM it is how private buckets authenticate, so keep it.
if not _on_gce():
    os.environ.setdefault("NO_GCE_CHECK", "true")

DEFAULT_CHECK_TIMEOUT_S = 30.0


class DataError(ValueError):
    """A data problem the user can fix (missing data, unreachable vocabulary, bad lengths)."""


def path_exists(path: str, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S) -> bool:
    """`tf.io.gfile.exists` that answers False instead of raising or hanging on remote paths.

    Args:
      path: a local path or a URL understood by tf.io.gfile (gs://, ...).
      timeout_s: seconds to wait for a remote file system before calling it unreachable.
    """
    if "://" not in path:
        return os.path.exists(path)
    import tensorflow as tf

    answer = [False]

    def probe():
        try:
            answer[0] = bool(tf.io.gfile.exists(path))
        except Exception:  # noqa: BLE001 - any failure means "not reachable" here
            answer[0] = False

    # A daemon thread, because the GCS client retries with back-off for minutes when DNS works
    # but the network does not; the caller gets a clear error instead of a hang.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answer[0] if not thread.is_alive() else False
