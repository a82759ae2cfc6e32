"""``python -m shira_dist.launch ...`` is ``shira-launch ...``."""

import sys

from .cli import main

sys.exit(main())
