"""The ``shira-dist`` console command.

    shira-dist train --config configs/tiny.yaml [key=value ...]    same as python -m shira_dist.train
"""

from __future__ import annotations

import sys
from typing import Optional

COMMANDS = ("train",)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: shira-dist {{{','.join(COMMANDS)}}} ...\n\n"
              "  train   fine-tune a SHiRA adapter from a run config (shira-dist train --help)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        return train_main(rest, prog="shira-dist train")
    print(f"shira-dist: error: unknown command {command!r}; commands: {list(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
