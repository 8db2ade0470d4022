"""The DataModules a config names (``datamodule=<name>``), one per data source, and the readers behind them:
digits, MNIST-5k, an image folder (``folders``: its files and split), prepared shards, a text corpus, labeled
texts (``stdlib_docs``: the embedded text), image–caption pairs."""
