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
import logging
import os
import sys
from typing import Optional

# Nothing here ever downloads: models and data are local files or packaged assets.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

EXIT_BAD_CONFIG = 2
EXIT_FAILED = 1

# What packages the job does not use print when transformers imports them anyway (it imports
# torchao whenever it is installed, to offer its quantizers): torchao's kernels built for another
# Python or GPU, and the Enum types torchao registers with torch's pytree. Only these messages are
# dropped; every other warning of these loggers still shows.
_KNOWN_IMPORT_NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_import_noise() -> None:
    """Drop the known import-time messages of packages the job only imports (idempotent)."""
    for name, fragments in _KNOWN_IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))


def _unshadow_hf_kernels() -> None:
    """``python -m shira_dist.train`` from the repository root puts the root first on sys.path, where
    kernels/ (installed as shira_dist.kernels) would pass for Hugging Face's ``kernels`` package:
    transformers and bitsandbytes import it, and the latter warns that its hub kernels failed to load.
    Drop that one entry; shira_dist itself is already imported."""
    ours = os.path.realpath(os.path.dirname(sys.modules["shira_dist.kernels"].__file__)) \
        if "shira_dist.kernels" in sys.modules else None
    sys.path[:] = [p for p in sys.path
                   if ours is None or os.path.realpath(os.path.join(p or os.getcwd(), "kernels")) != ours]


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
    quiet_import_noise()
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
    _unshadow_hf_kernels()
    sys.exit(main())
