"""One training process, as a launcher starts it:
``python -m cores_cli.engine.train_worker --recipe FILE [--resume] [--reporter MODULE:FACTORY]``.

``cores train --gpus N`` builds the launcher command that runs this module N times per node
(:func:`cores_cli.engine.launch.train_launch`); the launcher sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. Rank 0 shows the progress through the reporter ``--reporter``
names (``cores train`` names its terminal view; none: no progress), as a recipe names a
function by its import path; the engine never imports the command line's rendering itself. A
user mistake prints one ``error:`` line per rank (prefixed with the rank on ranks other than 0)
and exits 1.

There is no ``--overwrite`` here: ``cores train`` checked the run directory once before
launching (and with ``--overwrite`` removed the earlier run's results), so the check every
worker repeats in ``run_training`` passes; no worker ever deletes anything.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from ..errors import CoresError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cores_cli.engine.train_worker", description=__doc__)
    parser.add_argument("--recipe", required=True, help="Resolved recipe file (YAML/JSON).")
    parser.add_argument("--resume", action="store_true", help="Continue from the run directory's latest checkpoint.")
    parser.add_argument("--reporter", default=None, help="MODULE:FACTORY making rank 0's progress reporter from the recipe.")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))

    from .train_config import load_recipe
    from .train_run import train_in_this_process
    from .trainer import NullReporter

    try:
        recipe = load_recipe(args.recipe)
        reporter = reporter_factory(args.reporter)(recipe) if rank == 0 and args.reporter else NullReporter()
        train_in_this_process(recipe, resume=args.resume, reporter=reporter)
    except CoresError as exc:
        # every rank says why it stopped (an error on one rank only must not be silent)
        print(f"error: {exc}" if rank == 0 else f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def reporter_factory(name: str) -> Callable:
    """The callable ``MODULE:NAME`` names (it makes a reporter from a recipe)."""
    module, sep, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr, None) if sep and module and attr else None
    except ImportError:
        factory = None
    if not callable(factory):
        raise CoresError(f"--reporter {name!r} names no callable; give MODULE:FACTORY")
    return factory


if __name__ == "__main__":
    sys.exit(main())
