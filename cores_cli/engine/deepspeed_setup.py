"""DeepSpeed for cores: accelerator, engine, schedule, and optimizer state as plain tensors.

Everything that touches DeepSpeed's API lives here, so the training loop reads as a loop.

- **Accelerator.** DeepSpeed is told which one to use (CUDA or its CPU accelerator) before it is
  imported; the process group itself is :mod:`cores_cli.engine.distributed`'s. On the CPU no
  DeepSpeed op is compiled (:func:`skip_unused_cpu_ops`).
- **Engine.** ZeRO stage 0/1/2 from the recipe (2 by default; it also runs on the CPU with
  DeepSpeed's CPU accelerator and gloo), bf16 on GPU and fp32 on CPU, gradient clipping and
  accumulation by DeepSpeed, a client ``torch.optim.AdamW`` (the same update on every device,
  no fused CUDA op needed) and a ``LambdaLR`` warm-up/decay schedule that DeepSpeed steps.
- **Optimizer state** is read and written per parameter *name* as full fp32 tensors
  (``exp_avg``, ``exp_avg_sq``, and the fp32 master weight when training in bf16), through
  DeepSpeed's ``safe_get_full_*``/``safe_set_full_*`` under ZeRO. The files therefore hold no
  pickles, do not depend on how ZeRO partitioned the state, and load into any world size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import CoresError
from .train_config import TrainConfig

OPT_KEYS = ("exp_avg", "exp_avg_sq")


def select_accelerator(device_type: str) -> None:
    """Tell DeepSpeed which accelerator to use; must run before ``deepspeed`` is imported
    (``--gpus 0`` on a GPU machine still trains on the CPU)."""
    os.environ["DS_ACCELERATOR"] = "cuda" if device_type == "cuda" else "cpu"


def check_accelerator(device_type: str) -> None:
    """Refuse a DeepSpeed already set up in this process for another accelerator."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != device_type:
        raise CoresError(
            f"DeepSpeed was already set up for {name!r} in this process, but training runs on {device_type!r}; "
            "run training in a fresh process (or set DS_ACCELERATOR before importing deepspeed)"
        )


SHM_COMM_OP = "deepspeed_shm_comm"
"""DeepSpeed's shared-memory all-reduce for CPU processes (a C++ op compiled on first use)."""


def skip_unused_cpu_ops(device_type: str) -> None:
    """Keep DeepSpeed's CPU accelerator from compiling its shared-memory all-reduce op.

    Starting a process group on the CPU, DeepSpeed JIT-builds :data:`SHM_COMM_OP` whenever its
    compatibility table says the op can be built: about a minute of silent C++ compilation on a
    first run (2 CPU cores), before step 1. Only ``inference_all_reduce`` (tensor-parallel
    inference layers) calls that op; training's all-reduce and reduce-scatter go through
    ``torch.distributed`` (gloo), so training never uses it. DeepSpeed consults that table
    (``deepspeed.ops.__compatible_ops__``, probed once per process and kept in the module so
    that edits to it persist) before building the op, and marking the op unavailable there is
    how DeepSpeed lets a process do without it. Must run before the group is started."""
    if device_type != "cpu":
        return  # the CUDA accelerator has no such op
    select_accelerator(device_type)  # before this first import of deepspeed, which fixes it
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def extension_dir(name: str) -> Path:
    """Where torch keeps the build of C++/CUDA extension ``name`` (``TORCH_EXTENSIONS_DIR``, or
    torch's default build root, then the extension's name)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


def announce_op_builds(device_type: str, say: Callable[[str], None]) -> None:
    """Say so, naming the op and its cache, before DeepSpeed compiles one of its ops (a
    C++/CUDA build that takes minutes and otherwise runs silently). An op already built is
    loaded from torch's extension folder without a word. Once per process."""
    select_accelerator(device_type)  # before the first import of deepspeed, which fixes it
    from deepspeed.ops.op_builder.builder import OpBuilder

    original = OpBuilder.jit_load
    if getattr(original, "_cores_announces", False):
        return

    def jit_load(self, verbose=True):
        where = extension_dir(self.name)
        if not (where / f"{self.name}.so").is_file():
            say(
                f"DeepSpeed needs its {self.name} op, which is not built on this machine yet: compiling it once "
                f"(can take minutes; kept in {where}, set TORCH_EXTENSIONS_DIR to choose where)"
            )
        return original(self, verbose)

    jit_load._cores_announces = True
    OpBuilder.jit_load = jit_load


def train_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        if cfg.zero_stage == 0:
            # stage 0 + bf16 falls back to DeepSpeed's unfused fp16-style optimizer with loss
            # scaling; ZeRO-1/2 keep fp32 master weights without it
            raise CoresError("bf16 training needs train.zero_stage 1 or 2")
        return torch.bfloat16
    return torch.float32


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` for 0-based step ``s``: linear warm-up over ``warmup_steps``
    (step 1 already has ``lr / warmup``: no step is wasted at lr 0), then linear (DeepSpeed's
    WarmupDecayLR, LISA's choice) or cosine decay to ``min_lr_ratio`` at the last step, or
    constant."""
    return _Schedule(cfg.schedule, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)


class _Schedule:
    # a class rather than a closure, so LambdaLR.state_dict() stores its plain attributes
    def __init__(self, kind: str, warmup: int, total: int, floor: float) -> None:
        self.kind, self.warmup, self.total, self.floor = kind, warmup, total, floor

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        if self.kind == "warmup_constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (s - self.warmup) / span)
        shape = (1.0 - progress) if self.kind == "warmup_decay" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (1.0 - self.floor) * shape


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype, device: torch.device) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(
            contiguous_gradients=True,
            reduce_scatter=True,
            # LISA's bucket sizes; overlapping communication needs CUDA streams
            reduce_bucket_size=int(5e8),
            allgather_bucket_size=int(5e8),
            overlap_comm=device.type == "cuda",
        )
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Exactly the parameters with ``requires_grad`` (after ``configure_trainable``)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_engine(model: nn.Module, cfg: TrainConfig, total_steps: int, dtype: torch.dtype, device: torch.device):
    """``deepspeed.initialize`` with the client AdamW and the warm-up/decay schedule."""
    import deepspeed

    named = trainable_named(model)
    if not named:
        raise CoresError("no trainable parameters: check model.train_extra and model.lora")
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    factor = lr_factor(cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        config=deepspeed_config(cfg, dtype, device),
    )
    return engine


def current_lr(engine) -> float:
    return float(engine.lr_scheduler.get_last_lr()[0])


# --------------------------------------------------------------------------- optimizer state


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (DeepSpeed's ZeRO wrapper holds it as ``.optimizer``)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def _is_zero(engine) -> bool:
    return not isinstance(engine.optimizer, torch.optim.Optimizer)


def optimizer_step_count(engine) -> int:
    for state in _base_optimizer(engine).state.values():
        step = state.get("step")
        if step is not None:
            return int(step)
    return 0


def export_optimizer_state(engine, model: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """Full per-parameter fp32 states ``{name}::{key}`` and the optimizer step count.

    Collective under ZeRO (every rank must call it); the tensors come back on the CPU.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, torch.Tensor] = {}
    steps = optimizer_step_count(engine)
    if steps == 0:
        return out, 0
    zero = _is_zero(engine)
    state = _base_optimizer(engine).state
    for name, p in trainable_named(model):
        for key in OPT_KEYS:
            t = safe_get_full_optimizer_state(p, key) if zero else state[p][key]
            out[f"{name}::{key}"] = t.detach().to("cpu", torch.float32, copy=True)  # a snapshot, not a view of live state
        if zero and p.dtype != torch.float32:
            out[f"{name}::fp32"] = safe_get_full_fp32_param(p).detach().to("cpu", torch.float32, copy=True)
    return out, steps


def import_optimizer_state(engine, model: nn.Module, tensors: dict[str, torch.Tensor], steps: int) -> None:
    """Put states written by :func:`export_optimizer_state` back (before the first step)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named = trainable_named(model)
    want = {f"{n}::{k}" for n, _ in named for k in OPT_KEYS}
    missing = sorted(want - set(tensors))
    if steps and missing:
        raise CoresError(f"the checkpoint's optimizer state lacks {len(missing)} tensors (e.g. {missing[0]}); was it written with other trainable parts?")
    unexpected = sorted(k for k in tensors if k.rsplit("::", 1)[0] not in dict(named))
    if unexpected:
        raise CoresError(f"the checkpoint's optimizer state has tensors for parameters that are not trainable now (e.g. {unexpected[0]})")
    if steps == 0:
        return
    base = _base_optimizer(engine)
    step_value = torch.tensor(float(steps))
    if _is_zero(engine):
        # torch creates Adam state lazily at the first step, and DeepSpeed links each
        # parameter's fragment of it only then; create it now, link, and fill it.
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = {"step": step_value.clone(), "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        engine.optimizer._lazy_init_hp_params_optimizer_state()
        for name, p in named:
            for key in OPT_KEYS:
                safe_set_full_optimizer_state(p, tensors[f"{name}::{key}"].to(p.device), key)
            # the fp32 master copy: saved for bf16 training; for fp32 it is the weight itself
            # (whatever was loaded into the model after ZeRO took its copy)
            master = tensors.get(f"{name}::fp32")
            safe_set_full_fp32_param(p, (master if master is not None else p.detach()).to(device=p.device, dtype=torch.float32))
    else:
        for name, p in named:
            base.state[p] = {
                "step": step_value.clone(),
                **{key: tensors[f"{name}::{key}"].to(device=p.device, dtype=p.dtype).clone() for key in OPT_KEYS},
            }


def scheduler_state(engine) -> dict:
    """The LambdaLR position as plain JSON data."""
    state = engine.lr_scheduler.state_dict()
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items() if k != "lr_lambdas"}


def load_scheduler_state(engine, state: dict) -> None:
    sched = engine.lr_scheduler
    current = sched.state_dict()
    current.update(state)
    sched.load_state_dict(current)
    # LambdaLR sets the optimizer's lr only when it steps: put the resumed lr in place now.
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr
