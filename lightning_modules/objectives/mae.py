"""Masked autoencoding on a ViT (He et al. 2021): encode a random subset of patches, reconstruct the rest
with a light decoder, loss on the masked patches only."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from lightning_modules.config.rules import check
from lightning_modules.core.distributed import shard_draw
from lightning_modules.core.errors import ConfigError
from lightning_modules.objectives.base import Objective


def random_masking(batch: int, num_patches: int, mask_ratio: float, device=None):
    """Per sample, keep ``round(N * (1 - ratio))`` random patches.

    Returns (kept indices, mask) with mask 1 where a patch is hidden. Under DDP the noise is drawn for
    the global batch and sliced (``shard_draw``): each rank masks as the single-process run would."""
    n_keep = max(1, round(num_patches * (1 - mask_ratio)))
    order = shard_draw(lambda m: torch.rand(m, num_patches, device=device), batch).argsort(dim=1)
    keep = order[:, :n_keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, keep, 0.0)
    return keep, mask


class MAE(Objective):
    def __init__(
        self,
        backbone,
        data,
        mask_ratio: float = 0.75,
        decoder_dim: int = 64,
        decoder_depth: int = 1,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ):
        super().__init__(backbone, data)
        vit = backbone.model
        if not isinstance(vit, VisionTransformer):
            named = getattr(backbone, "name", None)  # a timm model's; a backbone of the user's own: its class
            what = f"model.name={named}" if isinstance(named, str) else f"the {type(backbone).__name__} backbone"
            raise ConfigError(
                f"objective=mae needs a ViT backbone, but {what} is a {type(vit).__name__}; use model=vit_micro or a"
                " timm vit_* model (or objective=simclr)"
            )
        self.mask_ratio, self.norm_pix_loss = float(check("objective.mask_ratio", mask_ratio)), bool(norm_pix_loss)
        self.patch = vit.patch_embed.patch_size[0]
        if self.norm_pix_loss and self.patch**2 * data.channels < 2:  # a patch's variance needs two values
            raise ConfigError(
                f"objective.norm_pix_loss=true needs patches of two values or more, but model.kwargs.patch_size="
                f"{self.patch} on {data.channels} channel(s) gives one; set objective.norm_pix_loss=false"
            )
        if any(side % self.patch for side in vit.patch_embed.img_size or ()):  # patchify needs whole patches
            raise ConfigError(
                f"model.kwargs.patch_size={self.patch}: objective=mae needs the image size"
                f" ({vit.patch_embed.img_size[0]}) to be a multiple of the patch size"
            )
        num_patches = vit.patch_embed.num_patches
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, num_patches, decoder_dim))
        self.decoder = nn.Sequential(*[Block(decoder_dim, decoder_heads, mlp_ratio=2.0) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch**2 * data.channels)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.patch
        x = images.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def encode(self, vit: VisionTransformer, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Run the ViT on the kept patches only (plus its prefix tokens); returns their encodings."""
        x = vit._pos_embed(vit.patch_embed(images))
        prefix, patches = x[:, : vit.num_prefix_tokens], x[:, vit.num_prefix_tokens :]
        patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        x = vit.norm(vit.blocks(vit.norm_pre(torch.cat([prefix, patches], dim=1))))
        return x[:, vit.num_prefix_tokens :]

    def forward(self, backbone, batch):
        images = batch["image"]
        b = images.shape[0]
        target = self.patchify(images)
        keep, mask = random_masking(b, target.shape[1], self.mask_ratio, images.device)
        latent = self.decoder_embed(self.encode(backbone.model, images, keep))
        tokens = self.mask_token.to(latent.dtype).expand(b, target.shape[1], -1).clone()  # bf16 under autocast
        tokens = tokens.scatter(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), latent)
        pred = self.decoder_pred(self.decoder_norm(self.decoder(tokens + self.decoder_pos)))
        if self.norm_pix_loss:  # per-patch normalised targets, as in the MAE paper
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return {"loss": loss, "mask": mask}
