"""Turn data into litdata shards once, for ``datamodule=shards`` (datamodules/loading/prepare.py says what is written).

    pretune prepare image_folder root=/data/pets out=/data/pets-shards
    pretune prepare text file=corpus.jsonl out=/data/corpus-shards [text_column=text label_column=label]
    pretune prepare image_text file=pairs.csv out=/data/pairs [image_column=image text_column=caption]

Options (key=value): out (required; must not exist, or overwrite=true), val_fraction=0.15, test_fraction=0.15,
split_seed=0 (splits not given by val/ test/ folders or a ``split`` column), shuffle_seed=0 (the training items'
order: written shuffled, so that every chunk mixes the classes), chunk_mb=64, workers=<cores>,
on_bad_sample=error|skip. A mistake is one line on stderr and exit status 2. ``scripts/prepare_data.py`` (from a
checkout) runs this same command. Needs the ``shards`` extra (litdata).
"""

from __future__ import annotations

import sys

from lightning_modules.core.errors import ConfigError
from lightning_modules.core.extras import require

OPTIONS = {
    "out": str,
    "root": str,
    "file": str,
    "text_column": str,
    "label_column": str,
    "image_column": str,
    "split_column": str,
    "val_fraction": float,
    "test_fraction": float,
    "split_seed": int,
    "shuffle_seed": int,
    "chunk_mb": float,
    "workers": int,
    "on_bad_sample": str,
    "overwrite": bool,
}


def parse(argv: list[str]) -> tuple[str, dict]:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    kind, options = argv[0], {}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise ConfigError(f"{arg}: allowed are key=value with key one of {', '.join(OPTIONS)}")
        kind_of = OPTIONS[key]
        try:
            if kind_of is bool:
                if value.lower() not in ("true", "false"):
                    raise ValueError
                options[key] = value.lower() == "true"
            else:
                options[key] = kind_of(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is invalid: allowed is {kind_of.__name__}") from None
    return kind, options


def main(argv: list[str] | None = None) -> None:
    try:
        kind, options = parse(sys.argv[1:] if argv is None else argv)
        require("pretune prepare", "litdata")
        from datamodules.loading.prepare import prepare  # imports numpy, PIL, sklearn (no torch): after the arguments

        out = prepare(kind, **options)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    import json

    from datamodules.loading.prepare import META  # as above: no torch

    meta = json.loads((out / META).read_text())
    skipped = f", {len(meta['skipped'])} unreadable images left out" if meta.get("skipped") else ""
    print(f"prepared {kind} shards in {out}: {meta['splits']}{skipped}")


if __name__ == "__main__":
    main()
