"""The one exception the data package raises for user-fixable problems, and a bounded path check."""

from __future__ import annotations

import os
import threading

# tfds and seqio probe the GCE metadata server when they see a gs:// path; off a GCE VM that probe
# waits for a timeout, so it is switched off unless the user asked for it.
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
