"""How data reaches the model: held in memory (``in_memory``: images, ``text``: token ids), streamed from disk by
worker processes (``streaming``), or prepared once as shards (``prepare``) that stream from disk or a bucket;
``decision`` chooses memory or streaming from the data's size and a budget."""
