#!/usr/bin/env python
"""``pretune export`` from a checkout, without installing it: ``python scripts/export.py <arguments>`` runs the
same application (``pretune/commands/export.py``), with the same arguments and outputs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pretune.commands.export import main  # noqa: E402

if __name__ == "__main__":
    main()
