"""Per-node entry of a multi-node training job under Slurm: `srun` (the TrainerResource's `slurm` launcher) starts

    python -m pipelines.rm.slurm --nproc-per-node G --rdzv-port P spec.json

once on every node of the job step; each reads where it stands from Slurm's environment (node count, its node id,
the job id, the step's node list) and runs torchrun's own entry (`torch.distributed.run.main`) for its share:

    --nproc-per-node G --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HEAD:P
    --rdzv-id synpref-JOB --rdzv-conf is_host=(1 on node 0, else 0) -m pipelines.rm.launch spec.json

HEAD is the step's first host (node id 0), which hosts the c10d store, so no node guesses it from hostnames. Slurm
starts every node; torchrun spawns and watches the node's ranks; pipelines.rm.launch trains. Under c10d the
rendezvous, not --node-rank, orders the nodes, so global rank 0 (the one that talks to Dagster Pipes) may be on any
node: Pipes goes through files in the spec's shared folder. `SYNPREF_RDZV_HOST` overrides HEAD (a cluster whose node
names do not resolve on the training network; tests running two "nodes" on one machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Mapping

from torch.distributed.run import main as torchrun_main

from pipelines.rm.launch import torchrun_args

HOST_OVERRIDE = "SYNPREF_RDZV_HOST"
DEFAULT_RDZV_PORT = 29400


@dataclass(frozen=True)
class SlurmNode:
    """This node's place in the job step, as Slurm tells it."""
    nnodes: int
    node_rank: int
    job_id: str
    head: str  # host of node 0: the rendezvous endpoint


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Slurm's own expansion of a compressed host list (`gpu[01-04,07]`): no home-made hostlist grammar."""
    if shutil.which("scontrol") is None:
        raise RuntimeError(f"the node list {nodelist!r} needs `scontrol show hostnames` (not on PATH); set "
                           f"{HOST_OVERRIDE} to the first node's host")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def first_host(nodelist: str, expand: Callable[[str], list[str]] = scontrol_hostnames) -> str:
    """The first host of a Slurm node list: node id 0 of the step (Slurm numbers nodes in list order)."""
    if "[" in nodelist:
        return expand(nodelist)[0]
    return nodelist.split(",")[0].strip()


def slurm_node(environ: Mapping[str, str] = os.environ,
               expand: Callable[[str], list[str]] = scontrol_hostnames) -> SlurmNode:
    """Where this process stands. The step's variables win over the job's: an srun of fewer nodes than the
    allocation numbers its nodes within the step."""
    def pick(*names: str) -> str:
        for n in names:
            if environ.get(n):
                return environ[n]
        raise ValueError(f"not in a Slurm job step ({' / '.join(names)} unset): start this module with srun")

    nodelist = pick("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    head = environ.get(HOST_OVERRIDE) or first_host(nodelist, expand)
    return SlurmNode(nnodes=int(pick("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")),
                     node_rank=int(pick("SLURM_NODEID")), job_id=pick("SLURM_JOB_ID", "SLURM_JOBID"), head=head)


def node_argv(spec_path: str, node: SlurmNode, *, nproc: int, port: int = DEFAULT_RDZV_PORT,
              module: str = "pipelines.rm.launch") -> list[str]:
    """torchrun's arguments for this node's share (the launcher's own flag list, pipelines.rm.launch)."""
    return torchrun_args(spec_path, nproc=nproc, nnodes=node.nnodes, rdzv_endpoint=f"{node.head}:{port}",
                         rdzv_id=f"synpref-{node.job_id}", module=module, node_rank=node.node_rank,
                         rdzv_is_host=node.node_rank == 0)


def entry_command(spec_path: str, *, nproc: int, port: int = DEFAULT_RDZV_PORT, module: str = "pipelines.rm.launch",
                  python: str = sys.executable) -> list[str]:
    """What srun runs on every node (the same line everywhere; each node finds its rank in its environment)."""
    return [python, "-m", "pipelines.rm.slurm", f"--nproc-per-node={nproc}", f"--rdzv-port={port}",
            f"--module={module}", spec_path]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.rm.slurm",
                                description="One node's share of a Slurm multi-node RM training job (srun starts it "
                                            "on every node of the step)")
    p.add_argument("spec")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--rdzv-port", type=int, default=DEFAULT_RDZV_PORT)
    p.add_argument("--module", default="pipelines.rm.launch")
    a = p.parse_args(argv)
    node = slurm_node()
    args = node_argv(a.spec, node, nproc=a.nproc_per_node, port=a.rdzv_port, module=a.module)
    print(f"[synpref slurm] node {node.node_rank}/{node.nnodes} of job {node.job_id}: torchrun {' '.join(args)}",
          file=sys.stderr, flush=True)
    torchrun_main(args)


if __name__ == "__main__":
    main()
