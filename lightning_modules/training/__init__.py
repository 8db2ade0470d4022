"""Training: the LightningModule that joins a backbone and an objective (``module``), and its optimizer groups
(one per layer group) and learning-rate schedules (``optim``)."""
