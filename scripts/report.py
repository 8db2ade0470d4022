#!/usr/bin/env python
"""Turn a sweep into a table (Markdown and CSV), the best configuration and plots.

python scripts/report.py outputs/multirun/finetune/<timestamp>
python scripts/report.py <run dir> <run dir> ... --out my_report
python scripts/report.py outputs/multirun/finetune/<timestamp> --wandb   # the plots on W&B too
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a multirun directory, or run directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <first path>/report)")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the table and plots as a W&B run (job_type report) in the sweep's group; offline without a key",
    )
    args = parser.parse_args(argv)
    from lightning_modules.runtime.failure import report

    try:
        from lightning_modules.reports.sweep import write_sweep_report

        path = write_sweep_report(args.paths, args.out, wandb=args.wandb)
    except Exception as err:  # one line; the traceback in <out>/error.log (HYDRA_FULL_ERROR=1: shown)
        return report(err, args.out or args.paths[0] / "report")
    print(f"Report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
