"""pretune: config-driven pre-training and fine-tuning (PyTorch Lightning, Hydra, timm, transformers).

The ``pretune`` command (``pretune/cli.py``) runs the applications in ``pretune/commands/``; the configs they
compose ship inside this package (``pretune/conf/`` in a wheel, the repository's ``conf/`` in a checkout). The
models and their machinery are the ``lightning_modules`` and ``datamodules`` packages below it.
"""

from lightning_modules.core.version import __version__

__all__ = ["__version__"]
