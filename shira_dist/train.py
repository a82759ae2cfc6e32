"""The training job: ``python -m shira_dist.train --config configs/<x>.yaml [key=value ...]``.

Runs unchanged as one process or under torchrun / the deepspeed launcher / srun (see
shira_dist/training/dist_env.py). Exit status: 0 done, 2 the config or the machine cannot
run it (nothing started, no process group), 1 a failure while running.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

# Nothing here ever downloads: models and data are local files or packaged assets.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

EXIT_BAD_CONFIG = 2


def build_parser(prog: str = "python -m shira_dist.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune a SHiRA adapter as a run config says.",
        epilog="example: %(prog)s --config configs/tiny.yaml training.max_steps=3 output_dir=/tmp/run")
    parser.add_argument("--config", required=True, help="a YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted-key overrides, e.g. training.max_steps=3 shira.r=4 tracking=none")
    return parser


def main(argv: Optional[list[str]] = None, prog: str = "python -m shira_dist.train") -> int:
    args = build_parser(prog).parse_args(argv)
    from .training.config import ConfigError, load_run_config
    from .training.dist_env import read_dist_env
    from .training.preflight import PreflightError, preflight

    try:
        cfg = load_run_config(args.config, args.overrides)
        env = read_dist_env()
        preflight(cfg, env)
    except (ConfigError, PreflightError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG

    from .training.run import run

    run(cfg, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
