#!/usr/bin/env python
"""``pretune pretrain`` from a checkout, without installing it: ``python scripts/pretrain.py <arguments>`` runs the
same application (``pretune/commands/pretrain.py``), with the same arguments and outputs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pretune.commands.pretrain import main  # noqa: E402

if __name__ == "__main__":
    main()
