"""The config's one home for what a user can get wrong, before anything heavy is imported (no torch): the kinds of
rule (``kinds``), every key's rule by config group (``rules/``), which inputs each component takes
(``modalities``), the check of a composed config (``check``), and building a component from its ``_target_``
with one-line errors (``library``). The errors themselves are ``core/errors.py``."""
