"""One module per ``pretune`` subcommand, each the application its ``scripts/<name>.py`` shim runs: the Hydra
ones (pretrain, finetune, evaluate, predict, export, transfer_study) compose the shipped configs with the user's
``--config-dir`` over them (``app.py``); report, prepare_data and benchmark take their own arguments."""
