"""pretune's models: backbones with layer groups, objectives, the LightningModule, freezing.

Kept import-light: torch, Lightning and timm load only when a submodule that needs them is
imported, so the command line answers ``--help`` and config mistakes at once.
"""
