"""Backbones: the one contract (``base.Backbone``: features, layer groups, spec, weights and processor) and
its implementations, plus the hand-off of weights between runs (``handoff``)."""
