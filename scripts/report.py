#!/usr/bin/env python
"""``pretune report`` from a checkout, without installing it: ``python scripts/report.py <arguments>`` runs the
same application (``pretune/commands/report.py``), with the same arguments and outputs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pretune.commands.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
