"""Turn a sweep into a table (Markdown and CSV), the best configuration and plots.

pretune report outputs/multirun/finetune/<timestamp>
pretune report <run dir> <run dir> ... --out my_report
pretune report outputs/multirun/finetune/<timestamp> --wandb   # the plots on W&B too

``scripts/report.py`` (from a checkout) runs this same command.
"""

import argparse
import sys
from pathlib import Path

from lightning_modules.runtime.failure import report


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
    try:
        from lightning_modules.reports.sweep import write_sweep_report  # light (no torch); after the arguments

        path = write_sweep_report(args.paths, args.out, wandb=args.wandb)
    except Exception as err:  # one line; the traceback in <out>/error.log (HYDRA_FULL_ERROR=1: shown)
        return report(err, args.out or args.paths[0] / "report")
    print(f"Report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
