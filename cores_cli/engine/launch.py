"""Starting a command's worker processes: one spec, one command line, one way to run it.

``cores train --gpus N`` and ``cores eval --gpus N`` both come here. A :class:`LaunchSpec` names
the processes per node and the Python module each one runs; :func:`launch_command` turns it into
the launcher's command line and :func:`run_launched` runs that and returns its exit status.

Training (:func:`train_launch`) runs :data:`WORKER_MODULE` with the resolved recipe:

- ``deepspeed`` (default): ``python -m deepspeed.launcher.runner --num_gpus N [--hostfile FILE
  --num_nodes M] --master_port P --no_local_rank --module cores_cli.engine.train_worker --recipe
  FILE [--reporter MODULE:FACTORY]``. DeepSpeed's runner starts the processes of this node, or, with a hostfile, reaches the
  other nodes through its multi-node backend (pdsh by default) and starts them there.
- ``torchrun``: ``python -m torch.distributed.run --nproc_per_node N --nnodes M [--node_rank R]
  --master_addr A --master_port P -m cores_cli.engine.train_worker --recipe FILE``; for several
  nodes, run the same ``cores train`` on every node with its ``--node-rank``.

The recipe is passed as a resolved file (the run directory's ``recipe.yaml``), which every node
must be able to read (a shared file system, as for the data).

Evaluation (:func:`eval_launch`) runs the same ``python -m cores_cli eval ...`` command in every
process through ``torchrun --standalone`` (a rendezvous port it picks itself). Rank 0 of such a
run reports an error it meets after the evaluation itself and leaves the exit status in a file
(:func:`leave_status`), which :func:`run_launched` returns: a worker that exits 1 makes torchrun
print a traceback of its own.

The interpreter is this one (``sys.executable``), so the launched processes see the same
environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import CoresError

WORKER_MODULE = "cores_cli.engine.train_worker"
Launcher = Literal["deepspeed", "torchrun"]

STATUS_FILE_ENV = "CORES_LAUNCH_STATUS_FILE"
"""Set by :func:`run_launched` for the processes it starts: where the main process may leave the
exit status of an error it has already reported (:func:`leave_status`)."""


@dataclass
class LaunchSpec:
    processes: int
    """Processes per node (≥ 1): one per GPU, or CPU processes (gloo)."""
    module: str
    """The Python module every process runs (``python -m MODULE ARGS``)."""
    args: list[str] = field(default_factory=list)
    launcher: Launcher = "torchrun"
    nodes: int = 1
    hostfile: Path | None = None
    master_port: int | None = None
    """None: torchrun on one node picks a free port itself (``--standalone``)."""
    master_addr: str | None = None
    node_rank: int | None = None


def train_launch(
    gpus: int,
    recipe_file: Path,
    *,
    resume: bool = False,
    nodes: int = 1,
    hostfile: Path | None = None,
    launcher: Launcher = "deepspeed",
    master_port: int = 29500,
    master_addr: str | None = None,
    node_rank: int | None = None,
    reporter: str | None = None,
) -> LaunchSpec:
    """``cores train --gpus N``: :data:`WORKER_MODULE` on the resolved recipe in every process;
    ``reporter`` names (``MODULE:FACTORY``) what makes rank 0's progress reporter."""
    args = ["--recipe", str(recipe_file)] + (["--resume"] if resume else []) + (["--reporter", reporter] if reporter else [])
    return LaunchSpec(gpus, WORKER_MODULE, args, launcher, nodes, hostfile, master_port, master_addr, node_rank)


def eval_launch(processes: int, command: Sequence[str]) -> LaunchSpec:
    """``cores eval --gpus N``: the same ``cores eval`` command line in N processes on this
    machine. ``command`` is the command's arguments (``eval --dataset ...``); its ``--gpus`` is
    left out, so that the processes evaluate instead of launching again."""
    return LaunchSpec(processes, "cores_cli", without_option(list(command), "--gpus"), "torchrun")


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``NAME VALUE`` and ``NAME=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def launch_command(spec: LaunchSpec, python: str | None = None) -> list[str]:
    """The launcher's command line for ``spec``; a CoresError for options that do not fit together."""
    if spec.processes < 1:
        raise CoresError("a launched run needs --gpus 1 or more (--gpus 0 trains on the CPU in this process)")
    if spec.nodes < 1:
        raise CoresError("--nodes must be 1 or more")
    py = python or sys.executable
    if spec.launcher == "deepspeed":
        if spec.nodes > 1 and spec.hostfile is None:
            raise CoresError("--nodes > 1 with the deepspeed launcher needs --hostfile (one 'HOST slots=N' line per node)")
        if spec.node_rank is not None:
            raise CoresError("--node-rank is for --launcher torchrun; deepspeed's launcher reaches the other nodes itself")
        cmd = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(spec.processes)]
        if spec.hostfile is not None:
            if not spec.hostfile.is_file():
                raise CoresError(f"hostfile not found: {spec.hostfile}")
            cmd += ["--hostfile", str(spec.hostfile), "--num_nodes", str(spec.nodes)]
        if spec.master_addr:
            cmd += ["--master_addr", spec.master_addr]
        if spec.master_port is not None:
            cmd += ["--master_port", str(spec.master_port)]
        return cmd + ["--no_local_rank", "--module", spec.module, *spec.args]
    if spec.launcher == "torchrun":
        if spec.hostfile is not None:
            raise CoresError("--hostfile is for --launcher deepspeed; with torchrun run cores train on every node with --node-rank")
        if spec.nodes > 1 and (spec.master_addr is None or spec.node_rank is None or spec.master_port is None):
            raise CoresError("torchrun on several nodes needs --master-addr (node 0's address) and this node's --node-rank")
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(spec.processes), "--nnodes", str(spec.nodes)]
        if spec.nodes > 1:
            cmd += ["--node_rank", str(spec.node_rank), "--master_addr", str(spec.master_addr), "--master_port", str(spec.master_port)]
        elif spec.master_port is None:
            cmd += ["--standalone"]
        else:
            cmd += ["--master_addr", spec.master_addr or "127.0.0.1", "--master_port", str(spec.master_port)]
        return cmd + ["-m", spec.module, *spec.args]
    raise CoresError(f"unknown launcher {spec.launcher!r}; use deepspeed or torchrun")


def run_launched(argv: list[str]) -> int:
    """Run a :func:`launch_command` line and wait for it; its exit status (128 + N for a
    launcher killed by signal N, as a shell reports it), or, when it exited 0, the status its
    main process left with :func:`leave_status`."""
    with tempfile.TemporaryDirectory(prefix="cores-launch-") as tmp:
        status = Path(tmp) / "status"
        code = subprocess.call(argv, env={**os.environ, STATUS_FILE_ENV: str(status)})
        if code == 0 and status.is_file():
            code = int(status.read_text(encoding="utf-8").strip() or "1")
    if code < 0:
        return 128 - code
    return code if code < 256 else 1


def leave_status(code: int) -> bool:
    """In a process :func:`run_launched` started: leave ``code`` as the run's exit status, for a
    process that reported its error itself and then exits 0. False (nothing left) elsewhere."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path:
        return False
    Path(path).write_text(str(code), encoding="utf-8")
    return True
