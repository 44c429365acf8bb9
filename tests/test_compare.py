"""`python demo.py --compare`: the paper's comparisons (Tables 5, 2, 4) in miniature, at a
size that runs in seconds: every pretext trains the same model for the same number of steps,
SiamMAE's training videos are never evaluated ones, the k-NN bags are nearest neighbours by
the CropMAE encoder's cls embedding, the tables have the paper's rows, and a rerun resumes
(or refuses other settings)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cdgmae
import demo
import generate_views
import metrics
from test_knn_bags import assert_k_nearest, cosine_similarities

TINY = ["--num-bags", "32", "--batch-size", "16", "--epochs", "1", "--davis-videos", "1", "--vip-videos", "1",
        "--jhmdb-videos", "1", "--train-videos", "16", "--seeds", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    table = demo.main(["--compare", "--output", str(out), *TINY])
    return out, table


def steps_taken(run):
    return torch.load(Path(run) / "checkpoint-last.pth", map_location="cpu", weights_only=True)["global_step"]


def test_every_method_trains_the_same_model_for_the_same_number_of_steps(comparison):
    out, _ = comparison
    seed = out / "seed-0"
    steps = {m: steps_taken(seed / m / "train") for m in demo.METHODS}
    # bags, images and k-NN bags: 32 items // 16 = 2 steps an epoch, 1 epoch; videos: 16 // 16 = 1 step an epoch
    assert steps == {m: 2 for m in demo.METHODS}, steps
    args = {m: json.loads((seed / m / "train" / "args.json").read_text()) for m in demo.METHODS}
    assert {a["pretext"] for a in args.values()} == {"bags", "crops", "frames"}
    assert args["siammae"]["epochs"] == 2 and args["a1"]["epochs"] == 1
    assert (args["a3"]["anchors"], args["a3"]["anchor_mask"]) == (3, 0.25)
    # one initialisation for all: the random-init row is every method's starting point
    first = torch.load(seed / "a1" / "train" / "checkpoint-0000.pth", map_location="cpu", weights_only=True)["model"]
    for m in ("cropmae", "siammae", "knn", "a3"):
        other = torch.load(seed / m / "train" / "checkpoint-0000.pth", map_location="cpu", weights_only=True)["model"]
        assert all(torch.equal(first[k], other[k]) for k in first), m


def test_siammae_trains_on_videos_that_are_not_evaluated(comparison):
    out, _ = comparison
    toy = out / "seed-0" / "toy"
    evaluated = [np.asarray(Image.open(p)) for p in sorted(toy.glob("davis/JPEGImages/480p/*/00000.jpg"))
                 + sorted(toy.glob("vip/Images/*/000000000001.jpg"))]
    training = sorted((toy / "videos").glob("*/00000.jpg"))
    assert len(training) == 16 and evaluated
    for path in training:
        frame = np.asarray(Image.open(path))
        assert not any(frame.shape == e.shape and np.abs(frame.astype(int) - e).mean() < 8 for e in evaluated), path


@pytest.mark.float_kernels
def test_knn_bags_are_the_nearest_images_by_the_cropmae_encoders_cls(comparison):
    out, _ = comparison
    toy = out / "seed-0" / "toy"
    encoder = cdgmae.encoder_from_checkpoint(out / "seed-0" / "cropmae" / "train" / "checkpoint-last.pth").eval()
    images = [toy / "images" / p for p in generate_views.list_images(toy / "images")]  # the saved rows' order
    saved = np.concatenate([np.load(p) for p in sorted((toy / "knn_bags" / generate_views.KNN_FOLDER).glob(
        "embeddings-*.npy"))])
    # the embedding is metrics.cls_features (tested with the metrics), stored in float16: rounding <= 2^-11
    # relative; another batch size sums the 3 blocks' <= 384 terms in another order, <= 384 eps sum|terms| each
    cls = metrics.cls_features(encoder, images, 64, True, 16, 0)
    np.testing.assert_allclose(saved.astype(np.float32), cls.numpy(), rtol=1e-3, atol=1e-3)
    found = []
    for i in (0, 7, 31):
        views = sorted((toy / "knn_bags" / images[i].stem).glob("view_*.jpg"))
        assert len(views) == 5
        found.append([next(j for j, p in enumerate(images) if p.read_bytes() == v.read_bytes()) for v in views])
    assert_k_nearest(cosine_similarities(saved)[[0, 7, 31]], found, 5, dim=96)  # nearest first, up to rounding


def test_tables_have_the_papers_rows_and_a_picture(comparison):
    out, table = comparison
    text = (out / "comparison.txt").read_text()
    for label in [v[0] for v in demo.METHODS.values()] + list(demo.BASELINES.values()):
        assert label in text
    assert "Table 5" in text and "Table 2" in text and "Table 4" in text
    a1 = table["a1"]["davis"]["J&F_m"][0]
    assert re.search(rf"CDG-MAE-a1 \(generated views\)\s+{a1:.1f}\s", text)
    assert Image.open(out / "comparison.png").size[0] > 400


def test_a_rerun_resumes_and_other_settings_are_refused(comparison, capsys):
    out, table = comparison
    results = sorted(out.glob("seed-0/*/results.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    assert demo.main(["--compare", "--output", str(out), *TINY]) == table
    assert [p.stat().st_mtime_ns for p in results] == stamps  # nothing retrained or rescored
    with pytest.raises(SystemExit) as error:
        demo.main(["--compare", "--output", str(out), *TINY, "--epochs", "2"])
    assert "compare.json" in str(error.value) and "epochs" in str(error.value)
