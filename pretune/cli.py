"""The ``pretune`` command: ``pretune <subcommand> <its arguments>``. Each subcommand is the application of
``pretune/commands/<module>.py`` (the one ``scripts/<module>.py`` runs in a checkout), started with the rest of the
command line as its own: the Hydra ones take ``--help``, ``--cfg job``, ``-m``, overrides, ``--config-dir`` and
``hydra/launcher=...`` exactly as before."""

from __future__ import annotations

import importlib
import sys

from lightning_modules.core.version import __version__

# subcommand -> (module in pretune/commands, what it does)
COMMANDS = {
    "pretrain": ("pretrain", "pre-train a backbone with a self-supervised objective (Hydra)"),
    "finetune": ("finetune", "fine-tune a backbone on a labeled task (Hydra)"),
    "evaluate": ("evaluate", "zero-shot / retrieval evaluation of an image-text model (Hydra)"),
    "predict": ("predict", "predict with a trained classifier on new inputs (Hydra)"),
    "export": ("export", "export a fine-tune's classifier to ONNX or .pt2 (Hydra)"),
    "study": ("transfer_study", "the transfer study: pre-train, fine-tune under strategies, report (Hydra)"),
    "report": ("report", "a sweep's table, best configuration and plots"),
    "prepare": ("prepare_data", "turn images, texts or pairs into litdata shards"),
    "bench": ("bench", "pretune against a plain PyTorch loop, streaming and predict benchmarks"),
}
HYDRA = ("pretrain", "finetune", "evaluate", "predict", "export", "study")


def usage() -> str:
    lines = [f"pretune {__version__}: pretune <command> [arguments]  (pretune <command> --help for its own)", ""]
    lines += [f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "  --version  the version", "Outputs go to ./outputs of the directory you run it from."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V", "version"):
        print(f"pretune {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: pretune {name}: no such command; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pretune.commands.{COMMANDS[name][0]}")
    # A Hydra application reads sys.argv; its argv[0] is the file a DDP rank runs again (runtime/parallel.py).
    sys.argv = [module.__file__ if name in HYDRA else f"pretune {name}", *rest]
    result = module.main()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
