"""pretune's models and the machinery around them, grouped by role:

- ``backbones/``   the backbone contract (features, layer groups, spec, weights + processor), its timm and
                   transformers implementations, and the hand-off of weights between runs
- ``objectives/``  training signals with their heads and losses (classification, mae, simclr, ...)
- ``module.py``    the LightningModule that joins a backbone and an objective; ``optim.py`` its optimizer
                   groups (one per layer group) and schedules
- ``callbacks/``   what shapes or watches a run: freezing strategies, monitoring, seeding, progress,
                   the forgetting probe, the backbone export
- ``reports/``     sweep and transfer-study reports
- ``runtime/``     the run machinery: entry points, one run, run files, DDP/FSDP, W&B
- ``config/``      errors, the value schema and the config checks (no torch)

Kept import-light: torch, Lightning and timm load only when a submodule that needs them is
imported, so the command line answers ``--help`` and config mistakes at once.
"""
