"""The command that starts N training processes per node (``cores train --gpus N``).

``deepspeed`` (default): ``python -m deepspeed.launcher.runner --num_gpus N [--num_nodes M
--hostfile FILE] --master_port P --no_local_rank --module cores_cli.cli.train_worker --recipe
FILE``. DeepSpeed's runner starts the processes of this node, or, with a hostfile, reaches the
other nodes through its multi-node backend (pdsh by default) and starts them there.

``torchrun``: ``python -m torch.distributed.run --nproc_per_node N --nnodes M --node_rank R
--master_addr A --master_port P -m cores_cli.cli.train_worker --recipe FILE``; for several
nodes, run the same ``cores train`` on every node with its ``--node-rank``.

The interpreter is this one (``sys.executable``), so the launched processes see the same
environment. The recipe is passed as a resolved file (the run directory's ``recipe.yaml``),
which every node must be able to read (a shared file system, as for the data).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import CoresError

WORKER_MODULE = "cores_cli.cli.train_worker"
Launcher = Literal["deepspeed", "torchrun"]


@dataclass
class LaunchSpec:
    gpus: int
    """Processes per node (≥ 1)."""
    recipe_file: Path
    nodes: int = 1
    hostfile: Path | None = None
    launcher: Launcher = "deepspeed"
    master_port: int = 29500
    master_addr: str | None = None
    node_rank: int | None = None
    resume: bool = False


def launch_command(spec: LaunchSpec, python: str | None = None) -> list[str]:
    if spec.gpus < 1:
        raise CoresError("a launched run needs --gpus 1 or more (--gpus 0 trains on the CPU in this process)")
    if spec.nodes < 1:
        raise CoresError("--nodes must be 1 or more")
    py = python or sys.executable
    worker_args = ["--recipe", str(spec.recipe_file)] + (["--resume"] if spec.resume else [])
    if spec.launcher == "deepspeed":
        if spec.nodes > 1 and spec.hostfile is None:
            raise CoresError("--nodes > 1 with the deepspeed launcher needs --hostfile (one 'HOST slots=N' line per node)")
        if spec.node_rank is not None:
            raise CoresError("--node-rank is for --launcher torchrun; deepspeed's launcher reaches the other nodes itself")
        cmd = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(spec.gpus)]
        if spec.hostfile is not None:
            if not spec.hostfile.is_file():
                raise CoresError(f"hostfile not found: {spec.hostfile}")
            cmd += ["--hostfile", str(spec.hostfile), "--num_nodes", str(spec.nodes)]
        if spec.master_addr:
            cmd += ["--master_addr", spec.master_addr]
        cmd += ["--master_port", str(spec.master_port), "--no_local_rank", "--module", WORKER_MODULE]
        return cmd + worker_args
    if spec.launcher == "torchrun":
        if spec.hostfile is not None:
            raise CoresError("--hostfile is for --launcher deepspeed; with torchrun run cores train on every node with --node-rank")
        if spec.nodes > 1 and (spec.master_addr is None or spec.node_rank is None):
            raise CoresError("torchrun on several nodes needs --master-addr (node 0's address) and this node's --node-rank")
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(spec.gpus), "--nnodes", str(spec.nodes)]
        if spec.nodes > 1:
            cmd += ["--node_rank", str(spec.node_rank), "--master_addr", str(spec.master_addr)]
        else:
            cmd += ["--master_addr", spec.master_addr or "127.0.0.1"]
        cmd += ["--master_port", str(spec.master_port), "-m", WORKER_MODULE]
        return cmd + worker_args
    raise CoresError(f"unknown launcher {spec.launcher!r}; use deepspeed or torchrun")
