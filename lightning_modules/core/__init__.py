"""The bottom layer: what every other module may use and nothing here imports from above it. Errors and how a
value is shown in a message (``errors``), result files (``results``), rank helpers for distributed runs
(``distributed``), where a run stands in its epoch (``progress``), where the things a config names are on disk
(``locations``). No torch at import time, except ``distributed``."""
