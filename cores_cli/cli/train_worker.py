"""One training process, as a launcher starts it: ``python -m cores_cli.cli.train_worker --recipe FILE``.

``cores train --gpus N`` builds the launcher command that runs this module N times per node;
the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Rank 0 shows the
progress; a user mistake prints one ``error:`` line per rank (prefixed with the rank on ranks
other than 0) and exits 1.

There is no ``--overwrite`` here: ``cores train`` checked the run directory once before
launching (and with ``--overwrite`` removed the earlier run's results), so the check every
worker repeats in ``run_training`` passes; no worker ever deletes anything.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import CoresError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cores_cli.cli.train_worker", description=__doc__)
    parser.add_argument("--recipe", required=True, help="Resolved recipe file (YAML/JSON).")
    parser.add_argument("--resume", action="store_true", help="Continue from the run directory's latest checkpoint.")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))

    from ..engine.deepspeed_setup import resolve_train_device, select_accelerator
    from ..engine.train_config import load_recipe
    from ..engine.trainer import NullReporter, run_training
    from .common import err_console, fail
    from .train_view import TrainView

    try:
        recipe = load_recipe(args.recipe)
        select_accelerator(resolve_train_device(recipe.train.device).type)
        reporter = TrainView(err_console, recipe.train.log_every) if rank == 0 else NullReporter()
        try:
            run_training(recipe, resume=args.resume, reporter=reporter)
        finally:
            reporter.close()
    except CoresError as exc:
        # every rank says why it stopped (an error on one rank only must not be silent)
        fail(str(exc) if rank == 0 else f"rank {rank}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        _shutdown()
    return 0


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
