"""A torchrun entry for crash tests: `pipelines.rm.launch`, with rank 0 killed by SIGKILL right after step
$SYNPREF_TEST_KILL_AT (a real kill -9: no cleanup, no final checkpoint).

Checkpoints are written in the background (dcp.async_save), so before the kill rank 0 waits, bounded, until the
newest checkpoint due by then (the last multiple of save_last_every before the kill) is committed in
checkpoints/latest: the test then knows which step the resume must start from. $SYNPREF_TEST_KILL_NO_WAIT=1 kills
at once instead (a save may be in flight: the resume starts from whatever was committed)."""

import json
import os
import signal
import sys
import time
from pathlib import Path

from pipelines.rm import launch

WAIT_S = 120  # a guard against a hang, never a speed expectation


def _committed_step(out_dir: str) -> int:
    f = Path(out_dir) / "checkpoints" / "latest"
    try:
        return int(json.loads(f.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_after(step_to_die: int, spec: dict):
    every = int(spec["config"]["save_last_every"])
    due = (step_to_die - 1) // every * every  # the checkpoint saved before this step's log
    wait = not os.environ.get("SYNPREF_TEST_KILL_NO_WAIT")

    def log(rec: dict, step: int) -> None:  # called on rank 0 only
        if step == step_to_die:
            deadline = time.monotonic() + WAIT_S
            while wait and due and _committed_step(spec["out_dir"]) < due and time.monotonic() < deadline:
                time.sleep(0.05)  # the commit comes from the checkpoint thread of this process
            os.kill(os.getpid(), signal.SIGKILL)

    return log


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    launch.main(sys.argv[1], log=_kill_after(int(os.environ["SYNPREF_TEST_KILL_AT"]), spec))
