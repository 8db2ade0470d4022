"""Training on CPU without an NVML probe in every optimizer step.

Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` for the whole process, so that looking for a
GPU never initialises CUDA before a fork. torch then answers ``torch.cuda.is_available()`` by loading NVML
afresh on every call, and Adam/AdamW call it at every ``step()``: 0.5 ms of a 38 ms ``resnet_micro`` step on
this GPU-less machine (timed inside training runs; 0.04 ms when timed alone). Once the trainer has chosen
the CPU there is nothing to fork around, so for the fit and test the check goes to the CUDA runtime instead,
as it does in a process that never imported Lightning (the benchmark's plain loop runs the same way).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

VARIABLE = "PYTORCH_NVML_BASED_CUDA_CHECK"


@contextmanager
def runtime_cuda_check(enabled: bool = True):
    """Within the block, ``torch.cuda.is_available()`` asks the CUDA runtime (cached) rather than NVML."""
    if not enabled:
        yield
        return
    before = os.environ.get(VARIABLE)
    os.environ[VARIABLE] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VARIABLE, None)
        else:
            os.environ[VARIABLE] = before
