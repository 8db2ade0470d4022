"""Where the things a config names are on disk, found without torch (the config check calls these before anything
heavy is imported, and the backbones when they load): a folder inside an installed package (``pkg://``), a
pre-trained ``backbone/``, a weight file (``model.init=file:``), a Hugging Face model (``hf:``), a tokenizer.
Each refuses with one line naming the key when there is nothing there."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lightning_modules.core.errors import ConfigError

PACKAGE = "pkg://"  # pkg://<package>/<path inside it>: shipped in an installed Python package
FILE = "file:"  # model.init=file:<path>
WEIGHTS, CONFIG = "model.safetensors", "config.yaml"  # what a backbone/ folder holds


def _shipped_configs() -> tuple[Path, str]:
    """The shipped configs (one folder per group) and how Hydra is told where they are. An installed wheel holds
    them inside the ``pretune`` package (``setup.py`` maps the repository's ``conf/`` to ``pretune/conf/``), found
    through Hydra's ``pkg://`` search path; in a checkout, or an editable install of one, they are the repository's
    ``conf/`` beside the ``pretune`` package. Found without importing ``pretune`` (the top layer)."""
    spec = importlib.util.find_spec("pretune")
    # No pretune package on the path: an editable install made before it existed, run from outside the checkout
    package = (
        Path(spec.origin).resolve().parent if spec and spec.origin else Path(__file__).resolve().parents[2] / "pretune"
    )
    if (package / "conf").is_dir():
        return package / "conf", f"{PACKAGE}pretune.conf"
    return package.parent / "conf", str(package.parent / "conf")


CONF, CONFIG_PATH = _shipped_configs()  # CONFIG_PATH: what the commands' @hydra.main takes


def package_path(spelled: str, what: str) -> Path:
    """``pkg://<package>/<path>`` as a path inside the installed package, found without importing it; ``what``
    names the key in the error (``model.init=hf:pkg://...``)."""
    package, _, inside = spelled.removeprefix(PACKAGE).partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{what}: no installed Python package {package!r} (pip install it)")
    return Path(next(iter(spec.submodule_search_locations))) / inside


def is_file_init(init) -> bool:
    return str(init).startswith(FILE)


def weight_file_path(init: str) -> Path:
    """The file ``model.init=file:<path>`` names (``pkg://<package>/<path>``: inside an installed package),
    checked to exist."""
    spelled = str(init).removeprefix(FILE)
    if not spelled:
        raise ConfigError(f"model.init={init} is invalid: allowed is file:<path to a .safetensors/.pth/.pt/.ckpt>")
    path = package_path(spelled, f"model.init={init}") if spelled.startswith(PACKAGE) else Path(spelled).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.init={init}: no such weight file {path}")
    return path


def find_backbone_dir(init: str) -> Path:
    """Resolve ``model.init`` (a pre-training run dir or a backbone dir) to the backbone folder."""
    path = Path(init).expanduser()
    for candidate in (path, path / "backbone"):
        if (candidate / CONFIG).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    if not path.exists():
        raise ConfigError(
            f"model.init={init}: no such path; allowed: none, timm, a pre-training run dir, a backbone/ dir"
            ", file:<weight file> or hf:<Hugging Face model>"
        )
    raise ConfigError(f"model.init={init}: found no backbone/ with {WEIGHTS} and {CONFIG} there")


def hf_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in flags)


def hf_local_dir(source: str) -> str:
    """``model.init=hf:<source>`` as ``from_pretrained`` takes it: a local model directory (it must hold a
    ``config.json``; ``pkg://<package>/<dir>`` is one inside an installed package) or a hub name (refused offline
    unless it is in the local Hugging Face cache)."""
    what = f"model.init=hf:{source}"
    if not source:
        raise ConfigError(f"{what} is invalid: allowed is hf:<local model dir> or hf:<hub name>")
    if source.startswith(PACKAGE):
        source = str(package_path(source, what))
    path = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) or path.exists():
        if not path.is_dir():
            raise ConfigError(f"{what}: no such directory")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{what}: not a Hugging Face model directory (no config.json in it)")
        return str(path)
    if hf_offline():
        from huggingface_hub import try_to_load_from_cache  # light, and only for a hub name offline

        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise ConfigError(
                f"{what}: a Hugging Face Hub name, but the hub is offline (HF_HUB_OFFLINE=1) and the model is not"
                " in the local cache; use hf:<local model dir>, or go online once to download it"
            )
    return source


def tokenizer_dir(source: str) -> Path:
    """Where ``model.tokenizer`` (a pre-training run, a ``backbone/`` dir or ``hf:<model>``) keeps its tokenizer."""
    if not source.startswith("hf:") and not Path(source).expanduser().exists():
        raise ConfigError(
            f"model.tokenizer={source}: no such path; allowed: null, a pre-training run dir, a backbone/ dir or"
            " hf:<Hugging Face model>"
        )
    try:
        if source.startswith("hf:"):
            return Path(hf_local_dir(source.removeprefix("hf:")))
        return find_backbone_dir(source)
    except ConfigError as err:  # the messages name model.init; this is model.tokenizer
        raise ConfigError(str(err).replace("model.init=", "model.tokenizer=", 1)) from None
