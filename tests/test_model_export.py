"""A fine-tune's model/ leaves pretune: loaded by timm and transformers alone (in a subprocess that never imports
pretune) with pretune's own logits, predict.py on new files and texts giving the test metrics' predictions, ONNX and
torch.export within 1e-4, every bad input one line; the pre-training's backbone/ loads the same way."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from tests.conftest import CONF, ROOT, make_cfg

CLASSES = ("a", "b", "c")
SIZES = [(16, 16), (20, 14), (13, 22), (24, 24)]  # any size, square or not: resized and cropped as evaluation does
PARITY = 1e-5  # max |logit difference| of a library's own load from pretune's


# --- data ----------------------------------------------------------------------------------------------------
def _image(label: int, index: int, rng) -> Image.Image:
    """A class-shaped image (bright top, left or centre) with noise, in one of ``SIZES``."""
    w, h = SIZES[index % len(SIZES)]
    x = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
    region = [np.s_[: h // 2, :], np.s_[:, : w // 2], np.s_[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]][label]
    x[region] = 200
    return Image.fromarray(x, "RGB")


def write_image_folder(root: Path, n: dict) -> Path:
    rng = np.random.default_rng(0)
    for split, count in n.items():
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _image(label, i, rng).save(root / split / name / f"{i}.png")
    return root


WORDS = {
    "a": "socket network host port connection server client packet address",
    "b": "string line text character split join format encode unicode",
    "c": "file path directory open read write close folder name",
}


def write_texts(path: Path, per_class: int, seed: int) -> Path:
    """A CSV of texts (a few words of their class's vocabulary and some shared ones) and labels."""
    rng = np.random.default_rng(seed)
    shared = "the a of to and with for from".split()
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["text", "label"])
        for i in range(per_class * len(WORDS)):
            label = list(WORDS)[i % len(WORDS)]
            words = list(rng.choice(WORDS[label].split(), 4 + i % 5)) + list(rng.choice(shared, 2 + i % 3))
            out.writerow([" ".join(rng.permutation(words)), label])
    return path


TINY_TRAIN = [
    "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "~callbacks.last_checkpoint",
]
TEXT_MODEL = [
    "datamodule=text_classification",
    "model=bert_micro",
    "model.layers=2",
    "model.hidden=32",
    "model.heads=2",
    "model.intermediate=64",
    "model.vocab_size=300",
    "model.max_positions=32",
    "datamodule.max_length=16",
    "datamodule.batch_size=16",
]


def script_cfg(name: str, overrides: list[str], out_dir: Path):
    """scripts/predict.py's or export.py's config, composed as the script composes it (they train nothing: no
    trainer or logger to make quiet)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def _run(stage: str, overrides: list[str], out_dir: Path) -> dict:
    from lightning_modules.runtime.run import run

    return run(make_cfg(stage, overrides, out_dir))


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """resnet_micro fine-tuned on an RGB image folder of any-sized files, held in memory."""
    root = write_image_folder(tmp_path_factory.mktemp("photos"), {"train": 8, "val": 3, "test": 4})
    out = root.parent / "image_run"
    overrides = ["model=resnet_micro", "datamodule=image_folder", f"datamodule.root={root}", "datamodule.image_size=16"]
    metrics = _run("finetune", [*overrides, "datamodule.batch_size=8", *TINY_TRAIN], out)
    assert metrics["status"] == "ok" and metrics["model/dir"] == "model"
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """A tiny BERT (cls pooling, its tokenizer trained on the training texts) fine-tuned on a CSV."""
    data = tmp_path_factory.mktemp("texts")
    train, test = write_texts(data / "train.csv", 20, 0), write_texts(data / "test.csv", 4, 1)
    out = data / "text_run"
    files = [f"datamodule.path={train}", f"datamodule.test_path={test}", "datamodule.val_fraction=0.2"]
    metrics = _run("finetune", [*TEXT_MODEL, *files, *TINY_TRAIN], out)
    assert metrics["status"] == "ok" and metrics["model/dir"] == "model"
    return out


def pretune_logits(run_dir: Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The logits pretune's own test step gives (the run's config, its best checkpoint, its datamodule's split in
    order), and the labels."""
    from lightning_modules.backbones.factory import build_backbone
    from lightning_modules.config.library import build
    from lightning_modules.objectives.base import build_objective
    from lightning_modules.training.module import PretuneModule

    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = build(cfg.datamodule, "datamodule", labeled=True)
    backbone = build_backbone(OmegaConf.to_container(cfg.model, resolve=True), data=datamodule)
    datamodule.use_backbone(backbone)
    datamodule.setup("fit")
    module = PretuneModule(backbone, build_objective(cfg.objective, backbone, datamodule.spec), {}, {})
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    module.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in datamodule.eval_loader(split, sharded=False):
            logits.append(module(batch)["logits"])
            labels.append(batch["label"])
    return torch.cat(logits), torch.cat(labels)


def in_a_clean_process(code: str) -> dict:
    """Run ``code`` in a fresh interpreter that never imports pretune (asserted), from outside the checkout; it
    prints its result as ``RESULT <json>`` (transformers' prompts share stdout)."""
    guard = (
        "\nimport sys\nassert not [m for m in sys.modules if m.split('.')[0] in ('lightning_modules', 'datamodules')]\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "HOME": str(Path.home())}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code) + guard],
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.rindex("RESULT ") + len("RESULT ") :])


def test_file_order(run_dir: Path) -> list[Path]:
    """The test split's files in the order the datamodule reads them (classes sorted, files sorted)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    root = Path(cfg.datamodule.root) / "test"
    return [f for name in sorted(CLASSES) for f in sorted((root / name).iterdir())]


test_file_order.__test__ = False  # a helper, not a test


# --- the libraries alone -------------------------------------------------------------------------------------
def test_timm_alone_loads_the_image_model_with_its_head_and_preprocessing(image_run):
    """timm.create_model("local-dir:...") with its head, resolve_data_config + create_transform on the test files
    (any size): pretune's test logits, and its metrics' accuracy."""
    files = [str(f) for f in test_file_order(image_run)]
    out = in_a_clean_process(
        f"""
        import json, timm, torch
        from PIL import Image
        model = timm.create_model("local-dir:{image_run / "model"}", pretrained=True).eval()
        config = timm.data.resolve_data_config(model=model)
        transform = timm.data.create_transform(**config)
        images = torch.stack([transform(Image.open(f).convert("RGB")) for f in {files!r}])
        with torch.no_grad():
            logits = model(images)
        print("RESULT " + json.dumps({{"logits": logits.tolist(), "labels": model.pretrained_cfg["label_names"],
                          "config": {{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}}}))
        """
    )
    expected, labels = pretune_logits(image_run)
    got = torch.tensor(out["logits"])
    print(f"\nmax |logit difference|, timm alone: {float((got - expected).abs().max()):.2e}")  # shown with -s
    assert (got - expected).abs().max() <= PARITY
    assert out["labels"] == list(CLASSES)
    assert out["config"]["input_size"] == [3, 16, 16] and out["config"]["crop_pct"] == 1.0
    metrics = json.loads((image_run / "metrics.json").read_text())
    assert float((got.argmax(-1) == labels).float().mean()) == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_transformers_alone_loads_the_text_model_and_its_pipeline(text_run):
    """AutoModelForSequenceClassification and pipeline("text-classification") (trust_remote_code: the folder's
    modeling_pretune.py) on the test texts: pretune's test logits; without trust_remote_code it is refused, not
    silently built as a BERT classifier with a fresh pooler."""
    texts = [row["text"] for row in csv.DictReader(open(OmegaConf.load(text_run / "config.yaml").datamodule.test_path))]
    model_dir = text_run / "model"
    out = in_a_clean_process(
        f"""
        import json, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
        d = "{model_dir}"
        model = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
        enc = tokenizer({texts!r}, truncation=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        classify = pipeline("text-classification", model=d, trust_remote_code=True)
        top = [r["label"] for r in classify({texts!r}, truncation=True)]
        try:
            AutoModelForSequenceClassification.from_pretrained(d)
            refused = ""
        except ValueError as err:
            refused = str(err)
        print("RESULT " + json.dumps({{"logits": logits.tolist(), "top": top, "id2label": model.config.id2label,
                          "refused": refused}}))
        """
    )
    expected, labels = pretune_logits(text_run)
    got = torch.tensor(out["logits"])
    print(f"\nmax |logit difference|, transformers alone (cls): {float((got - expected).abs().max()):.2e}")
    assert (got - expected).abs().max() <= PARITY
    assert out["top"] == [CLASSES[i] for i in expected.argmax(-1).tolist()]
    assert out["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}
    assert "trust_remote_code=True" in out["refused"]
    metrics = json.loads((text_run / "metrics.json").read_text())
    assert float((got.argmax(-1) == labels).float().mean()) == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_every_pooling_loads_with_pretune_logits(tmp_path):
    """BERT-style cls and mean pooling, GPT-style last (right padding, texts of several lengths): the folder's own
    class gives pretune's logits, in a process without pretune."""
    from lightning_modules.backbones.model_dir import write_model
    from tests.text_helpers import BERT, GPT, text_backbone, token_batch

    texts = ["a short one", "a much longer text about sockets, files and the lines of a string", "x"]
    expected, dirs = {}, {}
    for model, pooling in ((BERT, "cls"), (BERT, "mean"), (GPT, "last")):
        torch.manual_seed(0)
        backbone = text_backbone(model, pooling=pooling).eval()
        head = torch.nn.Linear(backbone.num_features, 4)
        name = f"{model['name']}-{pooling}"
        dirs[name] = str(
            write_model(backbone, head, tmp_path / name, list("wxyz"), {"modality": "text", "max_length": 32})
        )
        with torch.no_grad():
            expected[name] = head(backbone(token_batch(backbone, texts)))
    out = in_a_clean_process(
        f"""
        import json, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        logits = {{}}
        for name, d in {dirs!r}.items():
            model = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
            enc = tokenizer({texts!r}, truncation=True, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits[name] = model(**enc).logits.tolist()
        print("RESULT " + json.dumps(logits))
        """
    )
    for name, want in expected.items():
        worst = float((torch.tensor(out[name]) - want).abs().max())
        print(f"\nmax |logit difference|, transformers alone ({name}): {worst:.2e}")
        assert worst <= PARITY, name


def test_timm_transform_is_predicts_transform():
    """timm's create_transform from the exported config resizes and crops any image as pretune's evaluation does,
    for the in-memory folder (crop 1.0, bicubic), the arrays' (bilinear) and streaming (eval_crop_pct 0.875: pretune
    rounds size / crop_pct, timm floors it; the exported crop_pct makes them meet)."""
    import timm.data

    from datamodules.transforms.images import image_preprocessing, preprocessing_transform, standardize
    from lightning_modules.backbones.image import timm_data

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in [(50, 37), (32, 32), (9, 64)]
    ]
    for size, interpolation, crop in (
        (32, "bicubic", 1.0),
        (32, "bilinear", 1.0),
        (32, "bicubic", 0.875),
        (24, "bicubic", 0.9),
    ):
        pre = image_preprocessing(3, size, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], interpolation, crop)
        timm_transform = timm.data.create_transform(**timm.data.resolve_data_config(timm_data(pre)))
        ours = preprocessing_transform(pre)
        for image in images:
            mine = standardize(ours(image).unsqueeze(0), pre["mean"], pre["std"])[0]
            assert torch.equal(mine, timm_transform(image)), (size, interpolation, crop, image.size)


# --- predict.py ----------------------------------------------------------------------------------------------
def _predict(tmp_path: Path, *overrides: str, name: str = "predict") -> tuple[dict, list[dict]]:
    from lightning_modules.runtime.cli import main

    cfg = script_cfg("predict", list(overrides), tmp_path / name)
    main(cfg)
    out = tmp_path / name
    return json.loads((out / "metrics.json").read_text()), list(csv.DictReader(open(out / "predictions.csv")))


def test_predict_on_a_folder_gives_the_test_predictions(image_run, tmp_path):
    """The test folder (read recursively, files of any size): each file's top label is pretune's test prediction,
    so their accuracy is metrics.json's test/acc."""
    root = Path(OmegaConf.load(image_run / "config.yaml").datamodule.root) / "test"
    metrics, rows = _predict(tmp_path, f"run_dir={image_run}", f"input={root}", "top_k=2", "num_workers=1")
    expected, _ = pretune_logits(image_run)
    by_file = {row["input"]: row for row in rows}
    files = test_file_order(image_run)
    assert metrics["predicted"] == len(files) == len(rows) and metrics["skipped"] == 0
    predicted = [by_file[str(f.relative_to(root))]["label_1"] for f in files]
    assert predicted == [CLASSES[i] for i in expected.argmax(-1).tolist()]
    probabilities = expected.softmax(-1).max(-1).values.tolist()
    assert [float(by_file[str(f.relative_to(root))]["probability_1"]) for f in files] == pytest.approx(
        probabilities, abs=1e-5
    )
    truth = [f.parent.name for f in files]
    accuracy = np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
    assert accuracy == pytest.approx(json.loads((image_run / "metrics.json").read_text())["test/acc"], abs=1e-6)
    assert set(rows[0]) == {"input", "label_1", "probability_1", "label_2", "probability_2"}


def test_predict_on_a_text_file_gives_the_test_predictions(text_run, tmp_path):
    test_path = OmegaConf.load(text_run / "config.yaml").datamodule.test_path
    texts = [row["text"] for row in csv.DictReader(open(test_path))]
    (tmp_path / "new.txt").write_text("\n".join(texts[:5]) + "\n\n" + "\n".join(texts[5:]) + "\n")  # a blank line
    metrics, rows = _predict(tmp_path, f"run_dir={text_run / 'model'}", f"input={tmp_path / 'new.txt'}", "batch_size=5")
    expected, labels = pretune_logits(text_run)
    assert [row["input"] for row in rows] == texts and metrics["predicted"] == len(texts)
    assert [row["label_1"] for row in rows] == [CLASSES[i] for i in expected.argmax(-1).tolist()]
    # the same texts as a CSV column, by name
    metrics, rows_csv = _predict(tmp_path, f"run_dir={text_run}", f"input={test_path}", "text_column=text", name="csv")
    assert [row["label_1"] for row in rows_csv] == [row["label_1"] for row in rows]


def test_predict_skips_or_stops_at_an_unreadable_image(image_run, tmp_path, capsys):
    from lightning_modules.runtime.cli import main

    folder = tmp_path / "new"
    (folder / "deep" / "er").mkdir(parents=True)
    for i, f in enumerate(test_file_order(image_run)[:3]):
        (folder / "deep" / "er" / f"{i}.png").write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    metrics, rows = _predict(tmp_path, f"run_dir={image_run}", f"input={folder}", "on_bad_sample=skip", name="skip")
    assert metrics["skipped"] == 1 and sorted(r["input"] for r in rows) == [f"deep/er/{i}.png" for i in range(3)]
    assert "skipped unreadable image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(script_cfg("predict", [f"run_dir={image_run}", f"input={folder}"], tmp_path / "stop"))
    assert exit_.value.code == 2
    line = _one_line(capsys)
    assert "broken.png" in line and "on_bad_sample=skip" in line


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _fake_run(root: Path, stage: str, objective: str) -> Path:
    """A run dir as config.yaml and metrics.json describe it (nothing loaded before the line)."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(
        f"stage: {stage}\nobjective:\n  _target_: lightning_modules.objectives.x.{objective}\n"
    )
    (root / "metrics.json").write_text(json.dumps({"status": "ok", "stage": stage}))
    return root


def test_every_bad_predict_input_is_one_line(image_run, text_run, tmp_path, capsys):
    from lightning_modules.runtime.cli import main

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("first text\nsecond text\n")
    (tmp_path / "table.csv").write_text("review,stars\ngood,5\n")
    (tmp_path / "data.bin").write_bytes(b"\0")
    image, text = f"run_dir={image_run}", f"run_dir={text_run}"
    cases = {
        "the pattern matches no file": [image, f"input={tmp_path}/*.jpg"],
        "no such file or folder": [image, f"input={tmp_path}/missing"],
        "the folder holds no image": [image, f"input={tmp_path / 'empty'}"],
        "is neither an image": [image, f"input={tmp_path / 'data.bin'}"],
        "text_column=text: no such column": [text, f"input={tmp_path / 'table.csv'}"],
        "holds text inputs, but run_dir": [image, f"input={tmp_path / 'notes.txt'}"],
        "holds image inputs, but run_dir": [text, f"input={OmegaConf.load(image_run / 'config.yaml').datamodule.root}"],
        "is a pre-training run (objective MAE)": [
            f"run_dir={_fake_run(tmp_path / 'mae', 'pretrain', 'MAE')}",
            f"input={tmp_path / 'notes.txt'}",
        ],
        "class_names is required": [
            f"run_dir={_fake_run(tmp_path / 'clip', 'pretrain', 'CLIP')}",
            f"input={tmp_path / 'notes.txt'}",
        ],
        "only a CLIP run takes class names": [image, f"input={tmp_path / 'notes.txt'}", "class_names=[x,y]"],
        "the fine-tune wrote none": [
            f"run_dir={_fake_run(tmp_path / 'old', 'finetune', 'Classification')}",
            f"input={tmp_path / 'notes.txt'}",
        ],
        "top_k=0 is out of range": [image, f"input={tmp_path / 'notes.txt'}", "top_k=0"],
    }
    for i, (expected, overrides) in enumerate(cases.items()):
        with pytest.raises(SystemExit) as exit_:
            main(script_cfg("predict", overrides, tmp_path / f"out{i}"))
        line = _one_line(capsys)
        assert exit_.value.code == 2 and expected in line, (expected, line)


def test_a_bad_input_through_the_script_is_one_line_before_torch(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "scripts/predict.py",
            f"run_dir={tmp_path}",
            f"input={tmp_path}/*.png",
            f"hydra.run.dir={tmp_path / 'o'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: input={tmp_path}/*.png: the pattern matches no file; allowed is"
        " an image folder, an image file, a glob of images, or a .txt/.csv/.tsv/.jsonl file of texts"
    ]


# --- export.py -----------------------------------------------------------------------------------------------
def _export(tmp_path: Path, run_dir: Path, fmt: str, *overrides: str) -> tuple[dict, Path]:
    from lightning_modules.runtime.cli import main

    out = tmp_path / f"export-{fmt}"
    main(script_cfg("export", [f"run_dir={run_dir}", f"format={fmt}", *overrides], out))
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, out / metrics["file"]


@pytest.mark.slow
def test_onnx_image_and_text_within_1e_4_with_a_dynamic_batch(image_run, text_run, tmp_path):
    """Checked by export.py on real inputs, then run here by onnxruntime at another batch size (and, for text,
    another length) than it was exported with, against pretune's test logits."""
    import onnxruntime

    test_root = Path(OmegaConf.load(image_run / "config.yaml").datamodule.root) / "test"
    metrics, path = _export(tmp_path / "image", image_run, "onnx", f"input={test_root}")
    print(f"\nmax |logit difference|, ONNX image: {metrics['parity/max_abs_logit_diff']:.2e}")
    assert metrics["parity/max_abs_logit_diff"] <= 1e-4 and metrics["parity/inputs"] == 12
    from lightning_modules.runtime.predict import find_inputs, model_batches, model_from_dir

    model = model_from_dir(image_run / "model")
    cfg = OmegaConf.create({"batch_size": 5, "num_workers": 0, "on_bad_sample": "error", "input": str(test_root)})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected, _ = pretune_logits(image_run)
    order = {str(f): i for i, f in enumerate(test_file_order(image_run))}
    inputs = find_inputs(str(test_root))
    for indices, batch in model_batches(model, inputs, cfg, torch.device("cpu")):  # batches of 5, 5, 2
        (got,) = session.run(["logits"], {"image": batch["image"].numpy()})
        want = expected[[order[str(inputs.items[i])] for i in indices]]
        assert np.abs(got - want.numpy()).max() <= 1e-4

    texts_file = tmp_path / "texts.txt"
    texts = [row["text"] for row in csv.DictReader(open(OmegaConf.load(text_run / "config.yaml").datamodule.test_path))]
    texts_file.write_text("\n".join(texts))
    metrics, path = _export(tmp_path / "text", text_run, "onnx", f"input={texts_file}")
    print(f"\nmax |logit difference|, ONNX text: {metrics['parity/max_abs_logit_diff']:.2e}")
    assert metrics["parity/max_abs_logit_diff"] <= 1e-4 and metrics["inputs"] == ["input_ids", "attention_mask"]
    tokenizer = model_from_dir(text_run / "model").network.processor
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected, _ = pretune_logits(text_run)
    for start, stop in ((0, 3), (3, 10)):
        enc = tokenizer(texts[start:stop], truncation=True, padding=True, return_tensors="np")
        (got,) = session.run(["logits"], {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        assert np.abs(got - expected[start:stop].numpy()).max() <= 1e-4


@pytest.mark.slow
def test_torch_export_pt2_within_1e_4(image_run, text_run, tmp_path):
    metrics, path = _export(tmp_path, image_run, "pt2")
    assert metrics["parity/max_abs_logit_diff"] <= 1e-4 and metrics["parity/on"] == "synthetic"
    program = torch.export.load(str(path)).module()
    expected, _ = pretune_logits(image_run)
    files = test_file_order(image_run)[:3]
    from lightning_modules.runtime.predict import Inputs, model_batches, model_from_dir

    model = model_from_dir(image_run / "model")
    cfg = OmegaConf.create({"batch_size": 3, "num_workers": 0, "on_bad_sample": "error", "input": "x"})
    ((_, batch),) = list(model_batches(model, Inputs("image", files, []), cfg, torch.device("cpu")))
    worst = float((program(batch["image"]) - expected[:3]).abs().max())
    print(f"\nmax |logit difference|, pt2 image: {worst:.2e}")
    assert worst <= 1e-4

    texts_file = tmp_path / "texts.txt"
    texts = [row["text"] for row in csv.DictReader(open(OmegaConf.load(text_run / "config.yaml").datamodule.test_path))]
    texts_file.write_text("\n".join(texts))
    metrics, path = _export(tmp_path / "text", text_run, "pt2", f"input={texts_file}")
    print(f"max |logit difference|, pt2 text: {metrics['parity/max_abs_logit_diff']:.2e}")
    assert metrics["parity/max_abs_logit_diff"] <= 1e-4 and metrics["parity/inputs"] == len(texts)


def test_export_of_what_is_not_a_fine_tune_is_one_line(tmp_path, capsys):
    from lightning_modules.runtime.cli import main

    clip = _fake_run(tmp_path / "clip", "pretrain", "CLIP")
    with pytest.raises(SystemExit) as exit_:
        main(script_cfg("export", [f"run_dir={clip}", "format=onnx"], tmp_path / "out"))
    assert exit_.value.code == 2 and "no model/ there (it is a pretrain run, not a fine-tune" in _one_line(capsys)


# --- the pre-training's backbone/ ----------------------------------------------------------------------------
def test_a_pretraining_backbone_loads_with_timm_and_transformers_alone(tmp_path):
    """backbone/ as the README loads it: timm's local-dir (its config.json, the data's preprocessing, no head) and
    create_model with the weights file (num_classes=0: the file holds no classifier), AutoModel for text."""
    from datamodules.transforms.images import image_preprocessing
    from lightning_modules.backbones.handoff import export_backbone
    from tests.helpers import vit
    from tests.text_helpers import text_backbone, token_batch

    image_backbone = vit().eval()
    pre = image_preprocessing(1, 16, [0.3], [0.2], "bilinear", 1.0)
    image_dir = export_backbone(image_backbone, tmp_path / "image" / "backbone", preprocessing=pre)
    text = text_backbone(pooling="cls").eval()
    text_dir = export_backbone(text, tmp_path / "text" / "backbone")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    texts = ["open a file", "split the lines of a string into a list"]
    with torch.no_grad():
        image_features, text_features = image_backbone({"image": x}), text(token_batch(text, texts))
    out = in_a_clean_process(
        f"""
        import json, timm, torch, yaml
        from transformers import AutoModel, AutoTokenizer
        x = torch.tensor({x.tolist()})
        d = "{image_dir}"
        local = timm.create_model(f"local-dir:{{d}}", pretrained=True).eval()
        meta = yaml.safe_load(open(f"{{d}}/config.yaml"))
        by_file = timm.create_model(meta["name"], pretrained=True, num_classes=0, **meta["kwargs"],
                                    pretrained_cfg_overlay=dict(file=f"{{d}}/model.safetensors")).eval()
        t = "{text_dir}"
        model = AutoModel.from_pretrained(t, add_pooling_layer=False).eval()
        enc = AutoTokenizer.from_pretrained(t)({texts!r}, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out = {{"local": local(x).tolist(), "file": by_file(x).tolist(), "cls": hidden[:, 0].tolist(),
                   "data": timm.data.resolve_data_config(model=local)}}
        print("RESULT " + json.dumps(out, default=list))
        """
    )
    assert (torch.tensor(out["local"]) - image_features).abs().max() <= PARITY
    assert (torch.tensor(out["file"]) - image_features).abs().max() <= PARITY
    assert (torch.tensor(out["cls"]) - text_features).abs().max() <= PARITY
    assert out["data"]["mean"] == [0.3] and out["data"]["input_size"] == [1, 16, 16]


# --- when there is nothing to export, W&B, the Hub, sweeps ---------------------------------------------------
def test_a_backbone_without_a_classifier_format_is_one_warning_and_no_model_dir(tmp_path, capsys):
    from lightning_modules.backbones.base import Backbone
    from lightning_modules.callbacks.model_export import ModelExport
    from tests.helpers import SPEC

    class Mine(Backbone):  # a user's backbone that does not opt in
        modality, type = "image", "mine"

    class Data:
        spec = SPEC

        def eval_preprocessing(self):
            return {"modality": "image", "image_size": 16, "channels": 1}

    trainer = type(
        "Trainer", (), {"datamodule": Data(), "callback_metrics": {}, "checkpoint_callback": None, "loggers": []}
    )
    module = type(
        "Module",
        (),
        {"backbone": Mine(torch.nn.Identity(), 4), "objective": type("O", (), {"linear_head": torch.nn.Linear(4, 3)})},
    )
    export = ModelExport(tmp_path / "model", {})
    export.export(trainer, module)
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())  # no half-written folder either
    assert "Mine has no classifier format of its own" in export.run_metrics()["model/skipped"]
    assert capsys.readouterr().err.startswith("warning: model/: Mine has no classifier format")


def test_push_to_hub_offline_or_without_a_token_fails_before_training(tmp_path, monkeypatch):
    from lightning_modules.config.check import check_config
    from lightning_modules.core.errors import ConfigError

    cfg = make_cfg("finetune", ["push_to_hub=me/digits-classifier"], tmp_path)
    with pytest.raises(ConfigError, match=r"^push_to_hub=me/digits-classifier: the Hugging Face Hub is offline"):
        check_config(cfg)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    with pytest.raises(ConfigError, match=r"^push_to_hub=me/digits-classifier: no Hugging Face token"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"^push_to_hub='not a repo' is invalid"):
        check_config(make_cfg("finetune", ["push_to_hub='not a repo'"], tmp_path))


def test_the_model_is_a_wandb_artifact_linked_to_its_backbone(tmp_path):
    """Offline: the fine-tune logs model/ as a model artifact (its files, the backbone it came from in the
    metadata); online, a local backbone/ whose pre-training logged it is marked as the run's input."""
    from lightning_modules.backbones.artifacts import record_use
    from lightning_modules.backbones.handoff import export_backbone, resolve_init
    from tests.helpers import resnet
    from tests.wandb_log import read_offline_run

    pre = export_backbone(resnet(), tmp_path / "pre" / "backbone", {"wandb_artifact": "backbone-resnet18-simclr"})
    out = tmp_path / "ft"
    overrides = [
        "model=resnet_micro",
        f"model.init={pre}",
        "model.kwargs.channels=[8,16,32,64]",
        "model.kwargs.stem_width=8",
    ]
    run_cfg = make_cfg(
        "finetune", [*overrides, "debug=limit", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"], out
    )
    with open_dict(run_cfg):
        run_cfg.logger = OmegaConf.load(ROOT / "conf" / "logger" / "wandb.yaml")
    from lightning_modules.runtime.run import run

    assert run(run_cfg)["model/dir"] == "model"
    artifacts = read_offline_run(out)["artifacts"]
    (model,) = [a for a in artifacts if a["name"].startswith("model-")]
    assert model["name"] == "model-resnet18-digits" and model["type"] == "model"
    assert {"pretune.json", "config.json", "model.safetensors", "README.md"} <= set(model["files"])
    meta = json.loads((out / "model" / "pretune.json").read_text())
    assert meta["pretrained"]["logged_as"] == "backbone-resnet18-simclr" and meta["pretrained"]["path"] == str(pre)

    class Online:
        offline, used = False, []

        def use_artifact(self, artifact):
            self.used.append(artifact)

    online = Online()
    record_use(online, str(pre), resolve_init(str(pre)))
    (used,) = online.used
    assert used.name == "backbone-resnet18-simclr" and used.type == "model"


@pytest.mark.slow
def test_every_job_of_a_sweep_exports_its_own_model(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/finetune.py",
            "-m",
            "optimizer.lr=1e-3,1e-2",
            "model=resnet_micro",
            "debug=limit",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metas = [json.loads((sweep / job / "model" / "pretune.json").read_text()) for job in ("0", "1")]
    assert [m["run_dir"] for m in metas] == [str((sweep / job).resolve()) for job in ("0", "1")]
    assert metas[0]["sha256"] != metas[1]["sha256"]  # each job's own weights
    for job, meta in zip(("0", "1"), metas, strict=True):
        assert meta["metrics"]["test/acc"] == pytest.approx(
            json.loads((sweep / job / "metrics.json").read_text())["test/acc"]
        )
