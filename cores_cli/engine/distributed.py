"""Several processes, one module: join or start the process group, know this process's rank,
take its share of a list, gather objects from every rank, and shut the group down.

Training and evaluation use the same functions. A launcher (``deepspeed``, ``torchrun``, or
:mod:`cores_cli.engine.launch`) describes the group in the environment: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without one there is a single process: training still
starts a one-process group (DeepSpeed needs one), evaluation starts none.

Every helper here also works with no group at all (rank 0 of 1), so library code calls them
unconditionally.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_started_group: Any = None
"""The default group :func:`init_distributed` created in this process, until :func:`shutdown`:
a group someone else created (a notebook's, a test's) is theirs to destroy."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands among the processes of one run."""

    rank: int
    world: int
    local_rank: int
    """The rank among this node's processes: the GPU index it uses."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and shows the progress."""
        return self.rank == 0


@dataclass(frozen=True)
class DistInfo(RankInfo):
    """:class:`RankInfo` and the device this rank computes on (``cuda:LOCAL_RANK`` on GPUs)."""

    device: torch.device
    started: bool = False
    """Whether :func:`init_distributed` started the group just now (then :func:`shutdown` is
    the caller's to call), rather than joining one that existed or starting none."""


def launched_world() -> int:
    """WORLD_SIZE as a launcher set it (1 when nothing launched this process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_info() -> RankInfo:
    """This process's rank in the current group; rank 0 of 1 when there is none."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), local)
    return RankInfo(0, 1, 0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device: torch.device, *, start_alone: bool = False, deepspeed: bool = False) -> DistInfo:
    """Join the process group the launcher described in the environment.

    ``start_alone``: when nothing launched this process, start a one-process group on 127.0.0.1
    and a free port (training: DeepSpeed needs a group even for one process). Without it a
    process that was not launched for several processes joins nothing and is rank 0 of 1
    (evaluation), keeping ``device`` as given.

    ``deepspeed``: start the group through DeepSpeed (its accelerator chosen for ``device``
    first), as training needs; otherwise through ``torch.distributed``. A group that already
    exists in this process is joined as it is.

    On CUDA, this rank's GPU (LOCAL_RANK) becomes the current device and the one returned.
    """
    started = False
    if not dist.is_initialized():
        if not start_alone and launched_world() <= 1:
            return DistInfo(0, 1, 0, device)
        if start_alone and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        _start_group(device, deepspeed)
        started = True
    elif deepspeed:
        _check_deepspeed_accelerator(device)
    elif not start_alone and launched_world() <= 1:
        # a group left by someone else in this process (a test session, a notebook): its ranks,
        # but the device exactly as asked, as for a process with no group
        ranks = rank_info()
        return DistInfo(ranks.rank, ranks.world, ranks.local_rank, device)
    ranks = rank_info()
    if device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        device = torch.device("cuda", ranks.local_rank)
    return DistInfo(ranks.rank, ranks.world, ranks.local_rank, device, started)


def _start_group(device: torch.device, deepspeed: bool) -> None:
    global _started_group
    backend = "nccl" if device.type == "cuda" else "gloo"
    if deepspeed:
        import deepspeed as ds

        _check_deepspeed_accelerator(device)
        _forget_deepspeed_groups()
        # DeepSpeed's CPU accelerator print()s about its shared-memory op: keep stdout for results
        with contextlib.redirect_stdout(sys.stderr):
            ds.init_distributed(dist_backend=backend, verbose=False)
    else:
        dist.init_process_group(backend)
    _started_group = dist.group.WORLD


def _check_deepspeed_accelerator(device: torch.device) -> None:
    from .deepspeed_setup import check_accelerator, select_accelerator

    select_accelerator(device.type)
    check_accelerator(device.type)


def shard(n: int, ranks: RankInfo | None = None) -> list[int]:
    """This process's share of ``n`` items: every world-th index from its rank. No padding, so
    each item is counted once over all ranks (rank r of w gets r, r + w, r + 2w, ...)."""
    ranks = ranks or rank_info()
    return list(range(ranks.rank, n, ranks.world))


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` (picklable) from every rank, in rank order; ``[obj]`` with one process.
    Collective: every rank must call it."""
    world = rank_info().world
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (collective); the values themselves with one process."""
    world = rank_info().world
    if world == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def barrier() -> None:
    """Wait for every rank (nothing to wait for with one process)."""
    if rank_info().world > 1:
        dist.barrier()


def shutdown() -> None:
    """Destroy the group :func:`init_distributed` started in this process, if it is still the
    current one (a group someone else started is left alone), and forget DeepSpeed's cached
    clones of it. A gloo group left to the interpreter's exit can abort a rank ("terminate called
    without an active exception") after all the work is done, so a process calls this once its
    last collective is behind it: training once the run is over (the group may have been
    started by an earlier run in the process), evaluation when its own call started the group
    (:attr:`DistInfo.started`)."""
    global _started_group
    if _started_group is not None and dist.is_available() and dist.is_initialized() and dist.group.WORLD is _started_group:
        dist.destroy_process_group()
        if "deepspeed" in sys.modules:
            _forget_deepspeed_groups()
    _started_group = None


def _forget_deepspeed_groups() -> None:
    """Drop the groups DeepSpeed cached from an earlier process group of this process.

    DeepSpeed keeps a clone of the world group (and the groups derived from it) in module
    globals and never checks that they are still alive. After a run's group was destroyed (a
    second ``run_training`` in one process: a notebook, a test session) the clones name a dead
    group and ``deepspeed.initialize`` fails with "Group ... is not registered".
    """
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith("_GROUP") and name.isupper():
            setattr(groups, name, {} if isinstance(value, dict) else None)
