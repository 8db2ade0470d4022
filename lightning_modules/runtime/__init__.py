"""The run machinery: the entry points' shared main (``cli``), one run (``run``), evaluation without training
(``evaluate``), checks that need the built pieces (``preflight``), failures as one line (``failure``), DDP/FSDP
strategies for Hydra jobs (``parallel``), W&B runs (``wandb_runs``)."""
