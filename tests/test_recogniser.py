"""The recogniser: labelled strips from renders, CTC decoding, a few training steps recorded in
MLflow, its checkpoint read back by ``ocr=learned``, and refinement of ellipses on the photo."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch
from conftest import TINY_RECOGNISER

from cartridgeocr.errors import ConfigError
from cartridgeocr.experiments.compose import compose
from cartridgeocr.geometry import Ellipse, refine_ellipse
from cartridgeocr.reading.unroll import UnrollConfig, unroll
from cartridgeocr.recognition.charset import CHARSET, encode, label_text
from cartridgeocr.recognition.decode import beam_search, greedy, rerank_with_lexicon
from cartridgeocr.recognition.strips import casings_with_primers, label_strip

TINY = TINY_RECOGNISER


def test_labels_name_the_words_upright_in_each_strip() -> None:
    """Every stamped word is in the label of the strip where it reads upright, and only there."""
    from cartridgeocr.data.synthetic import render_sample

    seen = 0
    for index in range(3):
        image, anns = render_sample(2000, 512, index)
        for ann, casing, primer in casings_with_primers(anns):
            strips = label_strip(
                unroll(image, casing, primer, UnrollConfig()), ann["headstamp_segments"]
            )
            by_direction = {s.direction: s.text.split(" ") for s in strips}
            for seg in ann["headstamp_segments"]:
                mine = "outward" if seg["outward"] else "inward"
                other = "inward" if seg["outward"] else "outward"
                words = label_text(seg["text"]).split(" ")
                text = " ".join(by_direction.get(mine, []))
                assert label_text(seg["text"]) in text, (seg, by_direction)
                if not any(
                    label_text(s["text"]) == label_text(seg["text"])
                    for s in ann["headstamp_segments"]
                    if s["outward"] != seg["outward"]
                ):
                    assert not set(words) <= set(by_direction.get(other, [])) or len(words) == 1
                seen += 1
    assert seen >= 3


@pytest.mark.parametrize("stride", [2, 4])
def test_output_lengths_match_the_frames_the_network_gives(stride: int) -> None:
    """CTC is told how many frames each strip has: that count must be what the body gives."""
    from cartridgeocr.recognition.model import CRNN, output_lengths

    net = CRNN(len(CHARSET) + 1, 32, (4, 4, 8, 8), 8, "conv", stride).eval()
    for width in (9, 30, 31, 64, 101):
        frames = net(torch.zeros(1, 1, 32, width)).shape[1]
        assert frames == int(output_lengths(torch.tensor([width]), stride)[0]), width
    with pytest.raises(ConfigError, match="recogniser.stride=3"):
        CRNN(len(CHARSET) + 1, 32, stride=3)


def _strip_folder(root: Path) -> Path:
    """Two strips on disk, as `ensure_strips` writes them: one with three words, one empty."""
    import json

    from cartridgeocr.recognition.strips import LABELS

    (root / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(root / "images" / name), np.full((48, 400, 3), 120, np.uint8))
    words = [[20, 80, "WIN"], [150, 230, "9MM"], [300, 380, "LUGER"]]
    labels = [
        {"file": "a.png", "text": "WIN 9MM LUGER", "direction": "outward", "words": words},
        {"file": "b.png", "text": "", "direction": "inward", "words": []},
    ]
    (root / LABELS).write_text(json.dumps({"strips": labels}))
    return root


def test_curriculum_shows_single_words_then_windows_then_the_mix(tmp_path: Path) -> None:
    from cartridgeocr.recognition.data import EpochSampler, StripDataset, curriculum_stage

    curriculum = {"words_epochs": 2, "windows_epochs": 1, "words_pad": 0.25}
    assert [curriculum_stage(curriculum, e) for e in range(4)] == [
        "words",
        "words",
        "windows",
        "mix",
    ]
    assert curriculum_stage(None, 0) == curriculum_stage(curriculum, None) == "mix"
    augment = {"p": 0.0, "window_p": 0.0, "window_words": 3, "invert_p": 0.0}
    data = StripDataset(_strip_folder(tmp_path), 32, {"grey": True}, augment, curriculum)
    words = {"WIN", "9MM", "LUGER"}
    for seed in range(20):
        # Words stage: one word, cut at most 0.25 x 48 = 12 columns beyond it; the empty strip
        # (index 1) is swapped for one with words.
        for index in (0, 1):
            x, codes, text = data[(index, seed, 0)]
            assert text in words and len(codes) == len(text)
            assert x.shape[-1] <= round((80 - 20 + 1 + 2 * 12) * 32 / 48) + 1 or text != "WIN"
        # Windows stage: 1 to 3 neighbouring words, always a window.
        _, _, text = data[(0, seed, 2)]
        assert text and " ".join(text.split()) in "WIN 9MM LUGER"
        # Mix with window_p=0: the whole strip, and the empty one stays empty.
        assert data[(0, seed, 3)][2] == "WIN 9MM LUGER" and data[(1, seed, 3)][2] == ""
    sampler = EpochSampler(2, seed=0)
    sampler.set_epoch(5)
    assert [item[2] for item in sampler] == [5, 5]


def test_greedy_and_beam_decode_repeats_and_blanks() -> None:
    """``WCC``: the two Cs need a blank between them; a repeat without one is one letter."""
    idx = encode("WCC")
    frames = [idx[0], idx[0], 0, idx[1], idx[1], 0, idx[2], 0]
    probs = np.full((len(frames), len(CHARSET) + 1), 0.01)
    for t, c in enumerate(frames):
        probs[t, c] = 0.9
    probs /= probs.sum(axis=1, keepdims=True)
    g = greedy(probs)
    assert g.text == "WCC" and g.frames == [0, 3, 6] and len(g.confidences) == 3
    best = beam_search(probs, beam_width=4)
    assert best[0].text == "WCC" and best[0].log_prob >= best[-1].log_prob


def test_lexicon_reranking_prefers_a_known_word() -> None:
    from cartridgeocr.reading.lexicon import Lexicon

    # Frames that hesitate between LUGER and LUCER (G 0.45, C 0.55).
    text = "LUGER"
    probs = np.full((10, len(CHARSET) + 1), 1e-4)
    for t, ch in enumerate(text):
        probs[2 * t, encode(ch)[0]] = 1.0
        probs[2 * t + 1, 0] = 1.0
    g, c = encode("G")[0], encode("C")[0]
    probs[4, g], probs[4, c] = 0.45, 0.55
    probs /= probs.sum(axis=1, keepdims=True)
    hypotheses = beam_search(probs, beam_width=8)
    assert hypotheses[0].text == "LUCER"
    assert rerank_with_lexicon(hypotheses, Lexicon.load(None), bonus=1.0).text == "LUGER"


@pytest.fixture(scope="module")
def recogniser_run(tmp_path_factory) -> dict:
    from cartridgeocr.recognition.train import train_recogniser

    root = tmp_path_factory.mktemp("recogniser")
    cfg = compose(TINY, config_name="train_recogniser", root_dir=root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics, objects = train_recogniser(cfg)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "metrics": metrics, "objects": objects}


def test_training_a_few_steps_is_recorded_in_mlflow(recogniser_run) -> None:
    from cartridgeocr.recognition.model import RECOGNISER_KEY, load_recogniser

    root, objects = recogniser_run["root"], recogniser_run["objects"]
    assert (
        "val/cer" in recogniser_run["metrics"] and "val/token_recall" in recogniser_run["metrics"]
    )
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(objects["run_id"])
    assert run.data.tags["kind"] == "recogniser"
    assert {"val/cer", "val/token_recall", "train/loss"} <= set(run.data.metrics)
    artifacts = {
        a.path for d in ("checkpoints", "strips") for a in client.list_artifacts(run.info.run_id, d)
    }
    assert {"checkpoints/best.ckpt", "checkpoints/last.ckpt", "strips/epoch_000.png"} <= artifacts
    assert "strips/real_vs_synthetic.png" in artifacts  # training strips beside real ones
    best = objects["checkpoint"].best_model_path
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt[RECOGNISER_KEY]["charset"] == CHARSET
    assert ckpt[RECOGNISER_KEY]["reading"]["unroll"]["height"] == 48
    model = load_recogniser(best)
    out = model(torch.zeros(2, 1, model.height, 64))
    assert out.shape[:2] == (2, 64 // model.stride) and torch.isfinite(out).all()


def test_learned_ocr_reads_strips_and_places_words(recogniser_run) -> None:
    from cartridgeocr.reading.ocr.learned import LearnedOcr

    best = recogniser_run["objects"]["checkpoint"].best_model_path
    engine = LearnedOcr(checkpoint=best, decoder="beam", lexicon=True)
    strips = [np.full((48, 300), 128, np.uint8), np.full((48, 200, 3), 90, np.uint8)]
    pieces = engine.read_many(strips)
    assert len(pieces) == 2
    for piece_list, strip in zip(pieces, strips, strict=True):
        for p in piece_list:
            assert 0 <= p.x0 <= p.x1 <= strip.shape[1] and " " not in p.text
    assert engine.describe()["name"] == "learned"


def test_learned_ocr_refuses_what_is_not_a_recogniser(recogniser_run, tmp_path) -> None:
    from cartridgeocr.reading.ocr.learned import LearnedOcr

    fake = tmp_path / "detector.ckpt"
    torch.save(
        {"state_dict": {}, "cartridgeocr_class": "cartridgeocr.models.yolo:YoloModule"}, fake
    )
    with pytest.raises(ConfigError, match="not a recogniser checkpoint") as err:
        LearnedOcr(checkpoint=str(fake))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="exactly one"):
        LearnedOcr()
    # A run that is not a recogniser's: refused by its tag before anything is downloaded.
    uri = f"sqlite:///{recogniser_run['root'] / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("cartridgeocr")
    other = client.create_run(exp.experiment_id, tags={"kind": "evaluation"}).info.run_id
    with pytest.raises(ConfigError, match="not a recogniser run"):
        LearnedOcr(run_id=other, tracking_uri=uri)
    engine = LearnedOcr(run_id=recogniser_run["objects"]["run_id"], tracking_uri=uri)
    assert engine.source.startswith("runs:/")


def test_too_small_casing_gets_a_reason_not_text(recogniser_run) -> None:
    from cartridgeocr.reading.ocr.learned import LearnedOcr
    from cartridgeocr.reading.pipeline import Reader

    best = recogniser_run["objects"]["checkpoint"].best_model_path
    reader = Reader(None, LearnedOcr(checkpoint=best, min_casing_diameter=60))
    image = np.full((100, 100, 3), 128, np.uint8)
    small = (Ellipse(50, 50, 20, 20, 0), Ellipse(50, 50, 6, 6, 0))
    large = (Ellipse(50, 50, 40, 40, 0), Ellipse(50, 50, 12, 12, 0))
    r_small, r_large = reader.read_rings(image, [small, large])
    assert r_small.text == "" and "40 px across" in r_small.reason and r_small.strip is None
    assert r_large.reason is None and r_large.strip is not None


def test_refinement_recovers_a_rendered_casing_within_a_pixel() -> None:
    """A casing rendered with its exact ellipse, given to the refinement 4% off: back within
    1 px (centre and radius), and the primer (its dark gap) too."""
    from cartridgeocr.data.synthetic import render_sample

    image, anns = render_sample(7, 640, 5)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    rng = np.random.default_rng(1)
    checked = 0
    for ann in anns:
        truth = Ellipse.make(*ann["ellipse"])
        r = truth.radius
        off = Ellipse(
            truth.cx + 0.04 * r,
            truth.cy - 0.03 * r,
            truth.a * (1 + rng.normal(0, 0.04)),
            truth.b * (1 + rng.normal(0, 0.04)),
            truth.angle,
        )
        feature = "edge" if ann["category_id"] == 1 else "valley"
        res = refine_ellipse(grey, off, feature, search=0.15 if feature == "edge" else 0.3)
        assert res.ok, res.reason
        fit = res.ellipse
        assert math.hypot(fit.cx - truth.cx, fit.cy - truth.cy) < 1.0
        assert abs(fit.radius - truth.radius) < 1.0
        checked += 1
    assert checked >= 4


def test_refinement_keeps_the_detector_ellipse_without_evidence() -> None:
    flat = np.full((200, 200), 100, np.uint8)
    given = Ellipse(100, 100, 60, 50, 10)
    res = refine_ellipse(
        flat + np.random.default_rng(0).integers(0, 3, flat.shape).astype(np.uint8), given
    )
    assert not res.ok and res.ellipse == given and res.reason


def test_recogniser_config_errors_are_one_line(tmp_path: Path) -> None:
    from cartridgeocr.recognition.train import train_recogniser

    for override, words in (
        ("strips.height=20", "strips.height=20"),
        ("strips.val_seed=2000", "strips.val_seed"),
        ("strips.stamp_style=paint", "strips.stamp_style='paint'"),
    ):
        cfg = compose([*TINY, override], config_name="train_recogniser", root_dir=tmp_path)
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as err:
            train_recogniser(cfg)
        assert "\n" not in str(err.value)
