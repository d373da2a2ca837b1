"""Print docs/reliability.md's bad-input table from tests/test_bad_input_commands.py's cases.

    python scripts/bad_input_table.py > /tmp/table.md

Each case runs as that test runs it (the command's console entry in this process, in a copy of
the test's folder layout); the row shows the command line, the exit status and the last line the
user reads. The test checks those lines; this script only writes them down.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from tests import test_bad_input_commands as cases  # noqa: E402
from tests.console_entry import invoke  # noqa: E402


def run_case(command: str, args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = invoke(command, args)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return status, lines[-1] if lines else ""


def main() -> None:
    layout = Path(tempfile.mkdtemp(prefix="bad_input_layout_"))
    cases._lay_out(layout)
    print("| # | Command | Exit | Message (the last line on stderr) |")
    print("|---|---|---|---|")
    for i, (command, args, _) in enumerate(cases.CASES):
        work = Path(tempfile.mkdtemp(prefix="bad_input_")) / "w"
        shutil.copytree(layout, work)
        os.chdir(work)
        status, message = run_case(command, args)
        line = " ".join([f"switch-{command}", *args]).replace("|", "\\|")
        message = message.replace("|", "\\|").replace(str(work) + "/", "")
        print(f"| {i} | `{line}` | {status} | {message} |", flush=True)
        shutil.rmtree(work.parent, ignore_errors=True)
    shutil.rmtree(layout, ignore_errors=True)


if __name__ == "__main__":
    main()
