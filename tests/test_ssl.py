"""Self-supervised objectives (BYOL, DINO, VICReg), their EMA teacher, the photo augmentations and the feature
monitor: losses equal hand computations, the EMA update its formula, the teacher gets no gradient and is not in the
optimizer, k-NN equals brute force, each augmentation op applies with its probability and equals torchvision's."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from datamodules.transforms.augment import BatchAugment
from datamodules.transforms.photo import PhotoOps
from lightning_modules.callbacks.feature_monitor import FeatureMonitor, knn_predict
from lightning_modules.objectives.byol import BYOL
from lightning_modules.objectives.dino import DINO, TrainingCenterDINOLoss
from lightning_modules.objectives.vicreg import VICReg, vicreg_loss
from lightning_modules.training.optim import build_optimizer
from tests.helpers import SPEC, batch, resnet, vit

SMALL = {"scale": [0.6, 1.0], "jitter": 0.8, "blur": 0.5, "blur_sigma": [0.1, 1.0], "solarize": 0.2}


def _byol(backbone):
    return BYOL(backbone, SPEC, proj_hidden=32, proj_dim=16, pred_hidden=32, augment=SMALL, augment_2=SMALL)


def _dino(backbone, **kwargs):
    local = dict(SMALL, scale=[0.1, 0.4])
    sizes = {"out_dim": 64, "head_hidden": 32, "bottleneck_dim": 16, "local_views": 2, "local_size": 8}
    return DINO(backbone, SPEC, **{**sizes, **kwargs}, augment=SMALL, augment_2=SMALL, local_augment=local)


def _vicreg(backbone):
    return VICReg(backbone, SPEC, proj_hidden=32, proj_dim=32, augment=SMALL)


# --- losses, by hand -----------------------------------------------------------------------------------------


def test_dino_loss_with_centering_and_sharpening_equals_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(3, 5, generator=gen) for _ in range(2)]  # 2 global views of 3 images, 5 prototypes
    student = [torch.randn(3, 5, generator=gen) for _ in range(4)]  # the same 2 + 2 local views
    center = torch.randn(1, 1, 5, generator=gen)
    loss_fn = TrainingCenterDINOLoss(5, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(center)
    loss = loss_fn(teacher, student, teacher_temp=0.05)

    terms = []
    for t, t_out in enumerate(teacher):
        p = torch.softmax((t_out - center[0]) / 0.05, dim=1)  # centred, sharpened
        for s, s_out in enumerate(student):
            if s != t:  # a view is not compared with itself
                log_q = torch.log_softmax(s_out / 0.1, dim=1)
                terms.append(-(p * log_q).sum(1).mean())
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    # The center moved towards the mean teacher output, in training only.
    mean = torch.stack(teacher).mean(dim=(0, 1))
    torch.testing.assert_close(loss_fn.center[0, 0], 0.9 * center[0, 0] + 0.1 * mean)
    moved = loss_fn.center.clone()
    loss_fn.eval()
    loss_fn(teacher, student, teacher_temp=0.05)
    assert torch.equal(loss_fn.center, moved)


def test_vicreg_loss_equals_its_three_terms_by_hand():
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    loss = vicreg_loss(z1, z2, invariance=25.0, variance=25.0, covariance=1.0)

    invariance = ((z1 - z2) ** 2).mean()

    def variance(z):
        std = torch.sqrt(z.var(dim=0, unbiased=True) + 1e-4)
        return torch.relu(1 - std).mean()

    def covariance(z):
        c = z - z.mean(0)
        cov = c.T @ c / (len(z) - 1)
        return (cov**2).sum() / 4 - (cov.diagonal() ** 2).sum() / 4  # off-diagonal squares over the dimension

    expected = 25 * invariance + 25 * 0.5 * (variance(z1) + variance(z2)) + covariance(z1) + covariance(z2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_byol_loss_is_the_symmetrised_negative_cosine_of_prediction_and_teacher_projection():
    torch.manual_seed(0)
    backbone = resnet()
    objective = _byol(backbone).eval()  # eval: BatchNorm from running statistics, so a second pass repeats
    data = batch(8, labels=False)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        loss = objective(backbone, data)["loss"]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(5)
        x = data["image"]
        views = torch.cat([objective.augment(x), objective.augment_2(x)])
        p1, p2 = objective.predictor(objective.projector(backbone({"image": views}))).chunk(2)
        z1, z2 = objective.teacher(views).chunk(2)
        expected = -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# --- the teacher ---------------------------------------------------------------------------------------------


def test_the_ema_update_equals_its_formula_with_the_cosine_momentum():
    torch.manual_seed(0)
    backbone = vit()
    objective = _byol(backbone)
    teacher_before = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    with torch.no_grad():  # the student moves (as an optimizer step would)
        for p in [*backbone.parameters(), *objective.projector.parameters()]:
            p.add_(torch.randn_like(p))
    step, total = 3, 11
    objective.progress = (step, total)
    objective.after_step(backbone)
    m = 1.0 - (1.0 - 0.99) * (math.cos(math.pi * step / (total - 1)) + 1) / 2  # 0.99 at step 0, 1 at the last
    student = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    student |= {f"head.{k}": v for k, v in objective.projector.state_dict().items()}
    for name, p in objective.teacher.named_parameters():
        torch.testing.assert_close(p, m * teacher_before[name] + (1 - m) * student[name], rtol=1e-6, atol=1e-7)
    assert objective.teacher.momentum_at(0, total) == pytest.approx(0.99)
    assert objective.teacher.momentum_at(total - 1, total) == pytest.approx(1.0)


@pytest.mark.parametrize("make", [_byol, _dino], ids=["byol", "dino"])
def test_the_teacher_gets_no_gradient_and_is_not_in_the_optimizer(make):
    torch.manual_seed(0)
    backbone = resnet()
    objective = make(backbone)
    objective(backbone, batch(8, labels=False))["loss"].backward()
    teacher = list(objective.teacher.parameters())
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    assert any(p.grad is not None for p in backbone.parameters())  # the student did learn from it
    optimizer = build_optimizer({"name": "adamw", "lr": 1e-3}, backbone, objective)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher}
    trained = [p for n, p in objective.named_parameters() if not n.startswith("teacher.")]
    assert {id(p) for p in trained} <= optimized


def test_dino_exports_its_teacher_and_byol_its_student():
    backbone = resnet()
    dino, byol = _dino(backbone), _byol(backbone)
    assert dino.exported_backbone(backbone)[0] is dino.teacher.backbone
    assert byol.exported_backbone(backbone)[0] is backbone
    assert _dino(backbone, export="student").exported_backbone(backbone)[0] is backbone


def _train(backbone, objective, data: dict, steps: int):
    """``steps`` AdamW steps of ``objective`` on ``data``, the teacher following after each, as the module does;
    yields each step's loss."""
    optimizer = build_optimizer({"name": "adamw", "lr": 3e-3}, backbone, objective)
    for step in range(steps):
        objective.progress = (step, steps)
        loss = objective(backbone, data)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.after_step(backbone)
        yield loss.detach()


@pytest.mark.parametrize(
    ("make_backbone", "make_objective"),
    [(resnet, _byol), (vit, _byol), (resnet, _dino), (vit, _dino), (resnet, _vicreg), (vit, _vicreg)],
    ids=["byol-resnet", "byol-vit", "dino-resnet", "dino-vit", "vicreg-resnet", "vicreg-vit"],
)
def test_each_objective_trains_a_cnn_and_a_vit(make_backbone, make_objective):
    """A few steps with the teacher following: finite losses, the backbone moved, the teacher moved after it."""
    torch.manual_seed(0)
    backbone = make_backbone()
    objective = make_objective(backbone)
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    for loss in _train(backbone, objective, batch(8, labels=False), steps=2):
        assert torch.isfinite(loss)
    assert any(not torch.equal(start[k], v) for k, v in backbone.state_dict().items())
    if hasattr(objective, "teacher"):
        moved = objective.teacher.backbone.state_dict()
        assert any(not torch.equal(start[k], moved[k]) for k in start if start[k].is_floating_point())


def _teacher_entropies(objective, images: torch.Tensor) -> tuple[float, float]:
    """The entropy of the centred, sharpened teacher distribution, per image (mean) and of the batch's mean one."""

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp_min(1e-12).log()).sum(-1)

    with torch.no_grad():
        logits = (objective.teacher(images) - objective.criterion.center.squeeze(0)) / objective.teacher_temp
        p = F.softmax(logits, dim=-1)
        return entropy(p).mean().item(), entropy(p.mean(0)).item()


def test_dino_on_a_tiny_vit_needs_batchnorm_in_its_head_for_the_teacher_to_tell_images_apart():
    """A tiny ViT's features of different images start nearly parallel (docs/self-supervised.md: cosine 0.998 for
    vit_micro on MNIST), so the teacher gives every image the same distribution and centering flattens it: the batch
    mean's entropy equals the per-image one. BatchNorm in the head (objective.head_bn=true) takes the common part
    out: sharp per image, diverse across the batch."""
    gaps = {}
    for head_bn in (False, True):
        torch.manual_seed(0)
        backbone = vit()
        objective = _dino(backbone, head_bn=head_bn, local_views=0)
        data = batch(64, labels=False)
        list(_train(backbone, objective, data, steps=20))
        per_image, of_mean = _teacher_entropies(objective, data["image"])
        gaps[head_bn] = of_mean - per_image
    assert gaps[False] < 0.5 and gaps[True] > 1.5, gaps  # measured: 0.19 and 2.18 nats


def test_dino_local_crops_are_small_on_a_cnn_and_full_size_on_a_fixed_size_vit():
    assert _dino(resnet()).local_augment.size == 8
    assert _dino(vit()).local_augment.size is None  # vit_tiny at img_size=16 takes 16-pixel inputs only


# --- k-NN ----------------------------------------------------------------------------------------------------


def test_knn_equals_a_brute_force_weighted_vote():
    gen = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(50, 8, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    queries = torch.randn(30, 8, generator=gen)
    predicted = knn_predict(queries, bank, labels, classes=4, k=5, temperature=0.07)
    for i, q in enumerate(queries):
        sims = [float(F.cosine_similarity(q, b, dim=0)) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda j: -sims[j])[:5]
        votes = [0.0] * 4
        for j in nearest:
            votes[int(labels[j])] += math.exp(sims[j] / 0.07)
        assert int(predicted[i]) == max(range(4), key=lambda c: votes[c]), i


def test_the_online_probe_learns_the_banks_classes_and_goes_on_from_where_it_stopped():
    """Trained at a validation on separable features (4 classes around 4 far-apart centres), it classifies held-out
    ones; a second validation continues the same probe (its passes add up) and stays right."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen) * 4

    def features(n):
        labels = torch.randint(0, 4, (n,), generator=gen)
        return centres[labels] + torch.randn(n, 16, generator=gen), labels

    monitor = FeatureMonitor(probe_epochs=3, probe_batch_size=32)
    monitor.classes = 4
    bank, labels = features(200)
    queries, truth = features(100)
    before = FeatureMonitor(probe_epochs=1)
    before.classes = 4
    before._make_probe(16, "cpu")
    assert (before.probe(queries).argmax(1) == truth).float().mean() < 0.6  # the seeded start does not classify
    monitor._train_probe(bank, labels)
    first = monitor.probe[1].weight.detach().clone()
    assert (monitor.probe(queries).argmax(1) == truth).float().mean() > 0.95
    monitor._train_probe(bank, labels)
    assert monitor.probe_passes == 6 and not torch.equal(first, monitor.probe[1].weight)
    assert (monitor.probe(queries).argmax(1) == truth).float().mean() > 0.95


# --- photo augmentations -------------------------------------------------------------------------------------


def _rgb(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "op", ["jitter", "grayscale", "blur", "solarize"], ids=["jitter", "grayscale", "blur", "solarize"]
)
def test_each_photo_op_applies_with_its_probability(op):
    """Over 4,000 images, the share each op changes is its probability (within 4 standard errors)."""
    p, n = 0.3, 4000
    x = _rgb(n)
    torch.manual_seed(0)
    out = PhotoOps(**{op: p})(x)
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert abs(changed.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_photo_ops_equal_torchvisions_with_the_factors_they_drew():
    """What the streaming path's torchvision transforms do with the same factors, in the documented draw order:
    the jitter's mask, brightness, contrast, saturation, hue; grayscale's mask; blur's mask and sigma; solarize's."""
    import torchvision.transforms.v2.functional as TF

    n, x = 16, _rgb(16, seed=1)
    ops = PhotoOps(jitter=0.5, jitter_strength=(0.4, 0.4, 0.2, 0.1), grayscale=0.5, blur=0.5, blur_sigma=(0.5, 1.0))
    ops.solarize = 0.5
    torch.manual_seed(3)
    out = ops(x)
    torch.manual_seed(3)
    jitter = torch.rand(n) < 0.5
    b, c, s = (torch.empty(n).uniform_(1 - v, 1 + v) for v in (0.4, 0.4, 0.2))
    h = torch.empty(n).uniform_(-0.1, 0.1)
    grey, blur = torch.rand(n) < 0.5, torch.rand(n) < 0.5
    sigma = torch.empty(n).uniform_(0.5, 1.0)
    solarize = torch.rand(n) < 0.5
    for i in range(n):
        y = x[i]
        if jitter[i]:
            y = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(y, b[i]), c[i]), s[i]), h[i])
        if grey[i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if blur[i]:
            y = TF.gaussian_blur(y, [7, 7], [float(sigma[i])] * 2)  # 2 * ceil(3 * 1.0) + 1 taps
        if solarize[i]:
            y = TF.solarize(y, 0.5)
        torch.testing.assert_close(out[i], y, atol=2e-4, rtol=0)


def test_photo_ops_act_on_pixels_of_normalised_batches():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = _rgb(4)
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ops = PhotoOps(solarize=1.0)
    ops.set_pixel_stats(mean, std)
    solarized = ops(normalised) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    torch.testing.assert_close(solarized, torch.where(pixels >= 0.5, 1 - pixels, pixels), atol=1e-5, rtol=0)


def test_grey_images_skip_the_colour_ops_with_a_note(caplog, monkeypatch):
    import logging

    import datamodules.transforms.photo as photo

    photo._grey_noted = False
    x = torch.rand(64, 1, 8, 8)
    # Lightning stops its logger propagating to the root (where caplog listens) when it was imported before any
    # handler existed, and the transfer study sets its level to WARNING: both depend on test order.
    monkeypatch.setattr(logging.getLogger("pytorch_lightning"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="pytorch_lightning"):
        out = PhotoOps(grayscale=1.0, jitter=1.0, jitter_strength=(0.0, 0.0, 0.5, 0.5))(x)
    torch.testing.assert_close(out, x)  # no brightness or contrast asked for; saturation and hue skipped
    assert "grey (1 channel): grayscale, saturation and hue are skipped" in caplog.text


def test_a_recipe_without_photo_ops_draws_what_it_drew_before():
    """The photo ops off draw nothing: the old recipe's images under a seed, and the RNG after, are unchanged."""
    recipe = {"scale": [0.5, 1.0], "rotate": 15, "translate": 0.1, "brightness": 0.4, "contrast": 0.4}
    x = batch(8)["image"]
    torch.manual_seed(0)
    a = BatchAugment(**recipe, noise=0.1, erase=0.25)(x)
    after_a = torch.rand(1)
    torch.manual_seed(0)
    b = BatchAugment(**recipe, noise=0.1, erase=0.25, jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)(x)
    assert torch.equal(a, b) and torch.equal(after_a, torch.rand(1))


def test_the_photo_ops_are_datamodule_augment_keys_on_every_loading_path(tmp_path):
    """The one recipe takes the photo ops held in memory and streamed: each path's device part undoes its own
    normalisation (solarize at p=1 is exact on pixels), and the spec carries it for an objective's views; ``size``
    is the views' alone."""
    from datamodules.sources.digits import DigitsDataModule
    from lightning_modules.core.errors import ConfigError
    from tests.test_streaming import stream, write_folder

    def solarized_on_pixels(augment, mean, std, channels):
        mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1) for v in (mean, std))
        pixels = torch.rand(4, channels, 16, 16, generator=torch.Generator().manual_seed(0))
        out = augment((pixels - mean) / std) * std + mean
        torch.testing.assert_close(out, torch.where(pixels >= 0.5, 1 - pixels, pixels), atol=1e-5, rtol=0)

    solarize = {"preset": "none", "solarize": 1.0}
    held = DigitsDataModule(augment=solarize, batch_size=8, image_size=16)
    held.setup()
    assert [step.__name__ for step in held.augment.steps] == ["_photo"]
    assert held.spec.mean == (float(held.mean),) and held.spec.std == (float(held.std),)
    solarized_on_pixels(held.augment, held.mean, held.std, 1)
    streamed = stream(write_folder(tmp_path, n=6), augment=solarize, batch_size=4)
    mean, std = streamed.normalization
    assert [step.__name__ for step in streamed.augment.steps] == ["_photo"]
    assert streamed.spec.mean == tuple(mean) and streamed.spec.std == tuple(std) and mean[0] != mean[1]
    solarized_on_pixels(streamed.augment, mean, std, 3)
    with pytest.raises(ConfigError, match=r"^datamodule.augment.size is unknown: allowed are auto_augment, blur"):
        DigitsDataModule(augment={"size": 8})


def test_the_crop_size_option_makes_small_local_views():
    x = batch(4)["image"]  # 16 x 16
    assert BatchAugment(scale=(0.1, 0.4), size=8)(x).shape == (4, 1, 8, 8)


def test_photo_ops_draw_the_global_batch_under_ddp(monkeypatch):
    import lightning_modules.core.distributed as distributed

    ops = PhotoOps(jitter=0.8, grayscale=0.2, blur=0.5, solarize=0.2)
    x = _rgb(8)
    torch.manual_seed(0)
    single = ops(x)
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank_world", lambda r=rank: (r, 2))
        torch.manual_seed(0)
        ranks.append(ops(x[rank * 4 : (rank + 1) * 4]))
    torch.testing.assert_close(torch.cat(ranks), single)


def test_objectives_tell_their_augmentations_the_datas_normalisation():
    spec = replace(SPEC, mean=(0.25,), std=(0.5,))
    objective = BYOL(resnet(), spec, proj_hidden=16, proj_dim=8, pred_hidden=16, augment=SMALL)
    assert objective.augment.photo.mean.flatten().tolist() == [0.25]
    assert objective.augment.photo.std.flatten().tolist() == [0.5]


# --- end to end: resume, export, the monitor, the EMA of weights -------------------------------------------------

TINY_PRETRAIN = [
    "model=resnet_micro",
    "datamodule.batch_size=32",
    "datamodule.eval_batch_size=128",
    "trainer.limit_val_batches=1",
    "callbacks.feature_monitor.bank_size=200",
]


def _checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_dino_resumed_mid_epoch_equals_the_uninterrupted_run_teacher_center_and_monitor_included(cfg_factory, tmp_path):
    """Stopped after step 4 of 6 (the first batch of epoch 1; a checkpoint every 2 steps), resumed: the student, the
    teacher (moved before the checkpoint was taken, its momentum read at the restored step), DINO's center and the
    monitor's probe end bit for bit where the uninterrupted run ends."""
    from lightning_modules.runtime.run import run

    common = [
        *TINY_PRETRAIN,
        "objective=dino",
        "objective.local_views=2",
        "objective.momentum=0.9",  # a teacher that moves visibly in 6 steps
        "objective.teacher_temp_warmup=0.5",
        "datamodule.train_batches_per_epoch=3",
        "trainer.max_epochs=2",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ]
    full = run(cfg_factory("pretrain", *common, name="full"))
    run(
        cfg_factory(
            "pretrain",
            *common,
            "+callbacks.stop._target_=tests.helpers.StopAtStep",
            "+callbacks.stop.step=4",
            name="cut",
        )
    )
    assert _checkpoint(tmp_path / "cut")["global_step"] == 4
    resumed = run(cfg_factory("pretrain", *common, f"ckpt_path={tmp_path / 'cut'}", name="cut"))
    a, b = _checkpoint(tmp_path / "full"), _checkpoint(tmp_path / "cut")
    assert a["global_step"] == b["global_step"] == 6
    assert any(k.startswith("objective.teacher.backbone.") for k in a["state_dict"])
    assert "objective.criterion.center" in a["state_dict"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key in ("train/loss", "val/loss", "val/knn_acc", "val/probe_acc"):
        assert resumed[key] == full[key], key

    # The export is the teacher, and says so; a fine-tune loads it.
    from safetensors.torch import load_file

    from lightning_modules.backbones.handoff import read_backbone_config

    exported = load_file(str(tmp_path / "full" / "backbone" / "model.safetensors"))
    prefix = "objective.teacher.backbone.model."
    for name, value in exported.items():
        assert torch.equal(value, a["state_dict"][prefix + name]), name
    assert read_backbone_config(tmp_path / "full" / "backbone")["weights"].startswith("teacher")
    tuned = run(
        cfg_factory(
            "finetune",
            "model=resnet_micro",
            f"model.init={tmp_path / 'full'}",
            "freeze=linear_probe",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            name="tuned",
        )
    )
    assert tuned["status"] == "ok" and "val/knn_acc" not in tuned  # the monitor stays off in a fine-tune


def test_the_monitor_changes_nothing_in_training_and_is_off_with_one_override(cfg_factory, tmp_path):
    from lightning_modules.runtime.run import run

    common = [*TINY_PRETRAIN, "objective=byol", "trainer.max_epochs=2", "trainer.limit_train_batches=3"]
    on = run(cfg_factory("pretrain", *common, name="on"))
    off = run(cfg_factory("pretrain", *common, "callbacks.feature_monitor=null", name="off"))
    a, b = _checkpoint(tmp_path / "on")["state_dict"], _checkpoint(tmp_path / "off")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert on["train/loss"] == off["train/loss"] and on["val/loss"] == off["val/loss"]
    assert 0 <= on["val/knn_acc"] <= 1 and 0 <= on["val/probe_acc"] <= 1 and on["time/monitor_s"] > 0
    assert not {"val/knn_acc", "val/probe_acc", "time/monitor_s"} & off.keys()


def test_the_ema_of_weights_is_what_validation_sees_and_pretraining_exports(cfg_factory, tmp_path):
    from safetensors.torch import load_file

    from lightning_modules.runtime.run import run

    run(
        cfg_factory(
            "pretrain",
            *TINY_PRETRAIN,
            "objective=simclr",
            "callbacks=ema",
            "callbacks.ema.decay=0.5",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=3",
            name="ema",
        )
    )
    checkpoint = _checkpoint(tmp_path / "ema")
    average, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    exported = load_file(str(tmp_path / "ema" / "backbone" / "model.safetensors"))
    for name, value in exported.items():
        assert torch.equal(value, average[f"backbone.model.{name}"]), name
    assert any(not torch.equal(average[k], current[k]) for k in average if k.startswith("backbone."))
