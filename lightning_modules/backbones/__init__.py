"""Backbones: the one contract (``base.Backbone``: features, layer groups, spec, weights and processor), its
implementations (``image``: timm, ``text``: transformers, ``dual``: two towers), the ``factory`` that builds one
from a model config, the hand-off of weights between runs (``handoff``: ``backbone/`` written and read back;
``weight_files``: other people's weight files), and backbones as W&B artifacts (``artifacts``)."""
