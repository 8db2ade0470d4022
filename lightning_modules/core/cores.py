"""The CPU cores a run may use, and their share when several runs work side by side (a joblib sweep, the transfer
study's pool): one answer for every place that splits them."""

from __future__ import annotations

import os


def cores() -> int:
    """The cores this process may run on (its affinity where the OS says, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_job(jobs: int) -> int:
    """Torch threads for each of ``jobs`` runs sharing the cores: small models on a few cores leave cores idle in
    Python between ops, and threads beyond a run's share only wait on each other."""
    return max(1, cores() // max(1, jobs))
