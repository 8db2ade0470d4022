"""Objectives own their heads and loss: ``objective(backbone, batch) -> {"loss": ..., ...}``."""
