"""Runs one Stage-1 iteration on a lake and dies by SIGKILL at the worst moment: every verdict of the iteration is
cached in stage1_judgments, its silver rows and metrics row are not written (tests/test_stage1.py)."""

import os
import signal
import sys

from pipelines.curate.stage1 import SILVER, Stage1Config, run_stage1
from pipelines.lake import Lake
from tests.test_stage1 import FRACTION, StandInRMs, judging_setup


def main(root: str) -> None:
    lake = Lake(root)
    real = lake.replace_where

    def replace_where(table, data, column, value):
        if table == SILVER and value >= 1:  # the iteration's silver commit: die before it
            os.kill(os.getpid(), signal.SIGKILL)
        return real(table, data, column, value)

    lake.replace_where = replace_where
    run_stage1(lake, Stage1Config(iterations=1, stage1_fraction=FRACTION, label_origin="simulated"), StandInRMs(),
               judging_setup(), run_id="killed")


if __name__ == "__main__":
    main(sys.argv[1])
