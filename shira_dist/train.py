"""The training job: ``python -m shira_dist.train --config configs/<x>.yaml [key=value ...]``.

Runs unchanged as one process or under torchrun / the deepspeed launcher / srun (see
shira_dist/training/dist_env.py). Exit status: 0 done (or stopped at training.stop_after_step),
2 the config, the data or the machine cannot run it (found before start-up: nothing started,
no process group; or later, e.g. a bad row deep in a data file), 1 a failure while running
(diverged, disk full, or a bug), 128 + N a signal N (SIGTERM: 143). The job's own errors are
one line on stderr; a bug keeps its traceback. metrics.json records each outcome.
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
EXIT_FAILED = 1


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

    from .training.errors import RunFailed, RunInterrupted
    from .training.run import run

    try:
        run(cfg, env)
    except ConfigError as e:  # found after start-up (a bad row deep in a file, a model-specific limit)
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    except RunFailed as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except RunInterrupted as e:
        print(f"{prog}: {e}; metrics.json says status interrupted", file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
