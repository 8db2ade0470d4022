"""Each objective learns, MAE masks what it says, NT-Xent matches a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.core.errors import ConfigError
from lightning_modules.objectives.classification import Classification
from lightning_modules.objectives.mae import MAE, random_masking
from lightning_modules.objectives.simclr import SimCLR, nt_xent
from tests.helpers import SPEC, batch, resnet, vit


def _fixed_loss(objective, backbone, data) -> float:
    """The loss under one fixed draw of the objective's randomness (masks, views)."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(123)
        return objective(backbone, data)["loss"].item()


def _train(objective, backbone, data, steps=40, lr=3e-3):
    params = list(backbone.parameters()) + list(objective.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss = objective(backbone, data)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def _simclr(backbone):
    return SimCLR(
        backbone, SPEC, temperature=0.5, proj_hidden=32, proj_dim=16, augment={"scale": [0.6, 1.0], "noise": 0.1}
    )


@pytest.mark.parametrize(
    ("make_backbone", "make_objective", "labels"),
    [
        (
            vit,
            lambda b: MAE(b, SPEC, mask_ratio=0.75, decoder_dim=32, decoder_heads=2, norm_pix_loss=False),
            False,
        ),
        (resnet, lambda b: _simclr(b), False),
        (vit, lambda b: _simclr(b), False),
        (resnet, lambda b: Classification(b, SPEC), True),
        (vit, lambda b: Classification(b, SPEC), True),
    ],
    ids=["mae-vit", "simclr-resnet", "simclr-vit", "cls-resnet", "cls-vit"],
)
def test_loss_falls_on_a_tiny_batch(make_backbone, make_objective, labels):
    torch.manual_seed(0)
    backbone = make_backbone()
    objective = make_objective(backbone)
    data = batch(16, labels=labels)
    before = _fixed_loss(objective, backbone, data)
    _train(objective, backbone, data)
    after = _fixed_loss(objective, backbone, data)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_mae_masks_exactly_the_configured_ratio(ratio):
    keep, mask = random_masking(8, 16, ratio)
    hidden = round(16 * ratio)
    assert (mask.sum(dim=1) == hidden).all()
    assert keep.shape == (8, 16 - hidden)
    # The kept indices are exactly the visible patches, each once.
    assert torch.equal(mask.gather(1, keep), torch.zeros_like(keep, dtype=mask.dtype))
    assert all(len(set(row.tolist())) == keep.shape[1] for row in keep)


def test_mae_loss_only_counts_masked_patches():
    torch.manual_seed(0)
    backbone = vit()
    mae = MAE(backbone, SPEC, mask_ratio=0.5, decoder_dim=32, decoder_heads=2, norm_pix_loss=False)
    images = batch(4, labels=False)["image"]
    captured = {}
    mae.decoder_pred.register_forward_hook(lambda m, i, o: captured.update(pred=o))
    out = mae(backbone, {"image": images})
    mask, pred, target = out["mask"], captured["pred"], mae.patchify(images)
    assert mask.sum() == mask.numel() // 2
    per_patch = ((pred - target) ** 2).mean(-1)
    masked_only = per_patch[mask.bool()].mean()
    assert out["loss"].item() == pytest.approx(masked_only.item(), rel=1e-6)
    assert per_patch[~mask.bool()].mean().item() != pytest.approx(masked_only.item(), rel=1e-3)


def test_mae_refuses_a_cnn():
    with pytest.raises(ConfigError, match="objective=mae needs a ViT backbone.*resnet18"):
        MAE(resnet(), SPEC)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5])
def test_mae_refuses_bad_mask_ratio(ratio):
    with pytest.raises(ConfigError, match=f"objective.mask_ratio={ratio} is out of range"):
        MAE(vit(), SPEC, mask_ratio=ratio)


def test_nt_xent_equals_hand_computation():
    torch.manual_seed(0)
    z1, z2, t = torch.randn(3, 4), torch.randn(3, 4), 0.5
    z = [v / v.norm() for v in torch.cat([z1, z2])]
    n = 3
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = {j: float(z[i] @ z[j]) / t for j in range(2 * n) if j != i}
        total += -math.log(math.exp(sims[pos]) / sum(math.exp(s) for s in sims.values()))
    assert nt_xent(z1, z2, t).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_nt_xent_is_low_for_matching_views():
    z = torch.randn(8, 16)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.randn(8, 16), 0.1)


def test_mixup_mixes_images_and_targets_with_the_soft_target_loss(monkeypatch):
    from timm.data import Mixup

    torch.manual_seed(0)
    backbone = vit()
    objective = Classification(backbone, SPEC, mixup=0.4)
    monkeypatch.setattr(Mixup, "_params_per_batch", lambda self: (0.3, False))  # fix lambda, no cutmix
    data = batch(6)
    seen = {}
    backbone.register_forward_pre_hook(lambda m, args: seen.update(image=args[0]["image"]))
    out = objective(backbone, data)
    x, y = data["image"], data["label"]
    torch.testing.assert_close(seen["image"], 0.3 * x + 0.7 * x.flip(0))
    soft = 0.3 * F.one_hot(y, 3) + 0.7 * F.one_hot(y.flip(0), 3)
    hand = -(soft * F.log_softmax(out["logits"], -1)).sum(-1).mean()
    assert out["loss"].item() == pytest.approx(hand.item(), rel=1e-6)
    objective.eval()  # evaluation never mixes: plain cross-entropy on the true labels
    plain = objective(backbone, data)
    assert plain["loss"].item() == pytest.approx(F.cross_entropy(plain["logits"], y).item(), rel=1e-6)


def test_mixup_needs_an_even_batch_and_valid_alphas():
    with pytest.raises(ConfigError, match="objective.mixup=-1 is out of range"):
        Classification(vit(), SPEC, mixup=-1)
    objective = Classification(vit(), SPEC, cutmix=1.0)
    with pytest.raises(ConfigError, match="even datamodule.batch_size"):
        objective(vit(), batch(5))
