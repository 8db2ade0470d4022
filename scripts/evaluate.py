#!/usr/bin/env python
"""``pretune evaluate`` from a checkout, without installing it: ``python scripts/evaluate.py <arguments>`` runs the
same application (``pretune/commands/evaluate.py``), with the same arguments and outputs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pretune.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
