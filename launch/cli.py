"""``shira-launch``: start a shira_dist training run locally, on several nodes, or through SLURM.

    shira-launch local     --config configs/tiny.yaml --nproc-per-node 2 distributed.strategy=ddp
    shira-launch torchrun  --config configs/tiny.yaml --nnodes 2 --node-rank 0 --rdzv-endpoint HOST:PORT --run-id ID
    shira-launch deepspeed --config configs/x.yaml --hosts localhost:2
    shira-launch slurm     --config configs/tiny.yaml --nodes 2 [--dry-run]
    shira-launch status RUN_DIR_OR_JOB_ID              # any backend's run directory, or a SLURM job id
    shira-launch cancel RUN_DIR_OR_JOB_ID              # SLURM runs

Every launch makes a run directory (``runs/<name>-<run id>/``, see ``shira_dist.launch.run_dir``)
and passes it to the training job as ``output_dir``. Trailing ``key=value`` arguments are config
overrides. Bad arguments, a missing config or tool exit with status 2 before anything starts.
Secret-looking ``--env`` values (``*_KEY``, ``*_TOKEN``, ...) travel only in the environment.
"""

from __future__ import annotations

import argparse
import sys

from . import status
from .backends import deepspeed, local, slurm, torchrun
from .errors import LaunchError
from .options import check_text_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shira-launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for backend in (local, torchrun, deepspeed, slurm):
        backend.add_parser(subparsers)
    status.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may sit between options (argparse stops collecting a positional list at the first option).
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = ["shira-launch", *argv]  # recorded in the run directory's launch.yaml
    try:
        check_text_options(args)
        return args.run(args)
    except LaunchError as exc:
        print(f"shira-launch {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
