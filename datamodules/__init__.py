"""DataModules, grouped by role: ``sources/`` (one DataModule per data source, the ones a config names),
``loading/`` (how data reaches the model: in memory, streamed, prepared shards, and the choice between them),
``transforms/`` (decoding, augmentation, tokenisation). ``base.py`` is the contract every DataModule answers,
``spec.py`` what objectives and backbones learn of the data. Batches are dicts (``{"image": ..., "label": ...}``)."""
