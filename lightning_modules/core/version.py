"""pretune's one version: ``pretune --version``, ``pretune.__version__``, the package metadata (pyproject reads it
from here) and every run's record (``run.json``, so the loggers' config too). Kept in ``core`` so the run record,
at the bottom of the layers, can name it without importing the command line."""

__version__ = "0.2.0"
