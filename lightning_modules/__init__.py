"""pretune's models and the machinery around them, in layers; each imports only from itself and the layers
above it in this list (``tests/test_layers.py`` keeps it so, with no import cycle):

- ``core/``        errors and how messages show values, result files, rank helpers, where the things a config
                   names are on disk (``pkg://``, ``backbone/``, weight files, Hugging Face dirs)
- ``config/``      the rule kinds, one rules module per config group (``rules/``), the config check, building a
                   component from its ``_target_`` with one-line errors (no torch)
- ``backbones/``   the backbone contract (features, layer groups, spec, weights + processor), its timm and
                   transformers implementations, the factory that builds one from a model config, the hand-off
                   of weights between runs (``backbone/``) and W&B artifacts
- (``datamodules/``, the top-level package: data sources, loading paths, transforms)
- ``objectives/``  training signals with their heads and losses (classification, mae, simclr, ...)
- ``training/``    the LightningModule that joins a backbone and an objective; its optimizer groups and schedules
- ``callbacks/``   what shapes or watches a run: freezing strategies, monitoring, seeding, progress, the
                   forgetting probe, the backbone export
- ``runtime/``     the run machinery: entry points, one run, DDP/FSDP, W&B runs
- ``reports/``     sweep and transfer-study reports

Kept import-light: torch, Lightning and timm load only when a submodule that needs them is imported, so the
command line answers ``--help`` and config mistakes at once.
"""
