"""A torchrun entry for crash tests: `pipelines.rm.launch`, with rank 0 killed by SIGKILL right after step
$SYNPREF_TEST_KILL_AT (a real kill -9: no cleanup, no final checkpoint)."""

import os
import signal
import sys

from pipelines.rm import launch


def _kill_after(step_to_die: int):
    def log(rec: dict, step: int) -> None:  # called on rank 0 only
        if step == step_to_die:
            os.kill(os.getpid(), signal.SIGKILL)

    return log


if __name__ == "__main__":
    launch.main(sys.argv[1], log=_kill_after(int(os.environ["SYNPREF_TEST_KILL_AT"])))
