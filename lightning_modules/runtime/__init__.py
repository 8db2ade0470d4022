"""The run machinery: the entry points' shared main (``cli``), one run (``run``), run files on disk
(``results``), distributed helpers and strategies (``distributed``, ``parallel``), W&B runs and artifacts."""
