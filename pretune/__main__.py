"""``python -m pretune``: the ``pretune`` command, where the console script is not on the PATH."""

import sys

from pretune.cli import main

sys.exit(main())
