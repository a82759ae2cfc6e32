"""What ``shira-dist`` does with a saved adapter (the parsers are in shira_dist/cli.py).

    common.py     the adapter directory, its base model (--base or the recorded one), loading both
    merge.py      shira-dist merge      the adapter merged into its base, saved as a plain HF model
    generate.py   shira-dist generate   streamed text from base + adapter (--prompt, or --chat)
    evaluate.py   shira-dist eval       held-out metrics with the job's own evaluation

Each command takes a small dataclass of arguments and raises CommandError on bad input.
"""

from .common import CommandError

__all__ = ["CommandError"]
