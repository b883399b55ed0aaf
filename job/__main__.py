"""``python -m job``: the command line (job.cli)."""

import sys

from job.cli import main

sys.exit(main())
