"""What turns raw data into tensors and varies it: whole-batch image augmentation as tensor ops (``augment``),
per-image decoding and torchvision transforms for the streaming path (``images``), tokenisation (``text``)."""
