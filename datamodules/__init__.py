"""DataModules: one per data source. Batches are dicts (``{"image": ..., "label": ...}``)."""
