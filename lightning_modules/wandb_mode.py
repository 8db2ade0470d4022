"""W&B runs offline unless a key is configured, so nothing breaks without a server."""

from __future__ import annotations

import netrc
import os


def wandb_offline_default() -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True
