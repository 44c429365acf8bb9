"""k-NN image bags (Table 2, last row): `generate_views.py knn` writes, for every image, a bag of
its k nearest other images by cosine similarity of a ViT's cls embedding, nearest first, which
cdgmae.py reads like generated views; the search is chunked with a running top-k and every
phase resumes where a killed run stopped."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import cdgmae
import generate_views as gv
import metrics
from test_generate_views import tree_bytes
from test_generation_faults import assert_one_line_naming, cli

NUM_IMAGES, SIZE = 30, 32
KNN = ["--k", "5", "--input-size", str(SIZE), "--batch-size", "4", "--chunk", "7", "--workers", "0",
       "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """30 images in two folders and three formats (sizes differ), and a tiny ViT checkpoint."""
    root = tmp_path_factory.mktemp("knn")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        rel, fmt = [(f"n01/img{i:02d}.JPEG", "JPEG"), (f"n02/sub/img{i:02d}.png", "PNG"),
                    (f"n02/img{i:02d}.jpg", "JPEG")][i % 3]
        base = rng.integers(0, 256, 3)  # a colour per image, plus texture: embeddings far apart
        pixels = np.clip(base + rng.normal(0, 60, (36 + i % 5, 44, 3)), 0, 255).astype(np.uint8)
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, format=fmt)
    torch.manual_seed(0)
    vit = cdgmae.VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.save({"model": vit.state_dict(), "args": {"num_heads": 2}}, root / "vit.pth")
    return root


def run(data, output, *extra):
    return gv.main(["knn", "--images", str(data / "images"), "--checkpoint", str(data / "vit.pth"),
                    "--output", str(output), *KNN, *extra])


def cosine_similarities(embeddings):
    """[N, N] cosine similarities of the rows, in float64, an image's own -inf."""
    x = np.asarray(embeddings, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return sim


def assert_k_nearest(sim, found, k, dim):
    """found [N, k]: each row's k nearest, nearest first, up to the search's float32 rounding.

    The search's similarities are float32 (unit vectors of `dim` components: normalising and summing in
    another order, <= 2 (dim + 2) eps from the float64 ones, eps = 2^-24), so its picks, in order, have
    float64 similarities within twice that of the k largest in order; a near tie may go either way."""
    largest = -np.sort(-sim, axis=1)[:, :k]
    picked = np.take_along_axis(sim, np.asarray(found), axis=1)
    assert picked.shape == largest.shape and np.allclose(picked, largest, rtol=0, atol=4 * (dim + 2) * 2 ** -24)


def file_hash(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.float_kernels
@pytest.mark.parametrize("chunk", [7, 4, 64])
def test_nearest_neighbours_equal_a_full_similarity_search_across_chunk_boundaries(chunk):
    torch.manual_seed(1)
    features = torch.randn(30, 8, dtype=torch.float64)
    queries = torch.tensor([29, 0, 13, 6, 7])
    found = metrics.nearest_neighbours(features, 4, queries, chunk=chunk)
    assert_k_nearest(cosine_similarities(features)[queries], found, 4, dim=8)  # self excluded, nearest first
    assert metrics.nearest_neighbours(features, 4, chunk=chunk).shape == (30, 4)


def test_a_duplicate_image_is_a_neighbour_but_the_image_itself_is_not():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert metrics.nearest_neighbours(features, 1, chunk=3).flatten().tolist() == [1, 0, 3, 2]


@pytest.mark.float_kernels
def test_bags_hold_the_k_nearest_other_images_in_order_and_cdgmae_reads_them(tmp_path, data):
    output = tmp_path / "bags"
    summary = run(data, output)
    assert (summary["written"], summary["complete_before"]) == (NUM_IMAGES, 0)
    paths = [data / "images" / p for p in gv.list_images(data / "images")]  # the order of the saved rows
    saved = np.concatenate([np.load(p) for p in sorted((output / gv.KNN_FOLDER).glob("embeddings-*.npy"))])
    vit = cdgmae.encoder_from_checkpoint(str(data / "vit.pth")).eval()
    with torch.no_grad():  # the ViT's cls embedding, image by image
        cls = torch.stack([vit.forward_features(metrics.evaluation_tensor(common.load_rgb(p), SIZE)[None])[0, 0]
                           for p in paths])
    # float16 keeps 11 significant bits (relative rounding <= 2^-11 = 4.9e-4); the batched float32 ViT sums
    # <= 192 terms (the patch embedding) of size <= 1 in another order, <= 192 eps ~ 1e-5 a layer
    np.testing.assert_allclose(saved.astype(np.float32), cls.numpy(), rtol=1e-3, atol=1e-4)
    by_bytes = {file_hash(p): i for i, p in enumerate(paths)}  # the images are all different
    found = []
    for image in paths:
        rel = image.relative_to(data / "images")
        real, views = common.bag_files(output / rel.parent / rel.stem)
        assert Path(real).name == "real" + image.suffix.lower() and file_hash(real) == file_hash(image)
        found.append([by_bytes[file_hash(v)] for v in views])
        assert [Path(v).suffix for v in views] == [paths[j].suffix.lower() for j in found[-1]]
        assert os.path.samefile(views[0], paths[found[-1][0]])  # a hard link, not a copy, on one filesystem
    assert_k_nearest(cosine_similarities(saved), found, 5, dim=32)  # view_00 is the nearest

    bags = common.find_bags(output)
    assert len(bags) == NUM_IMAGES
    assert common.check_bags(output, bags, num_views=5, min_views=2, verify_images="decode") == {}
    dataset = cdgmae.BagDataset(output, bags, num_views=5, num_anchors=2, input_size=16, num_patches=4)
    target, anchors, _, _ = dataset[(0, 3)]
    assert target.shape == (3, 16, 16) and anchors.shape == (2, 3, 16, 16)


def test_a_run_killed_while_embedding_resumes_without_recomputing_and_ends_identical(tmp_path, data,
                                                                                     monkeypatch):
    monkeypatch.setattr(gv, "KNN_SHARD", 8)  # 30 images: shards of 8, 8, 8, 6
    embedded = []
    forward = cdgmae.VisionTransformer.forward_features
    monkeypatch.setattr(cdgmae.VisionTransformer, "forward_features",
                        lambda self, x: embedded.append(len(x)) or forward(self, x))
    cls_features = metrics.cls_features

    def killed_in_the_second_shard(vit, paths, *args, **kwargs):
        if embedded:  # the second shard: killed after its first batch of 4 images
            cls_features(vit, paths[:4], *args, **kwargs)
            raise KeyboardInterrupt
        return cls_features(vit, paths, *args, **kwargs)
    monkeypatch.setattr(metrics, "cls_features", killed_in_the_second_shard)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(data, resumed)
    assert sorted(p.name for p in (resumed / gv.KNN_FOLDER).iterdir()) == ["embeddings-00000.npy"]
    assert sum(embedded) == 12 and common.find_bags(resumed) == []

    monkeypatch.setattr(metrics, "cls_features", cls_features)
    embedded.clear()
    assert run(data, resumed)["written"] == NUM_IMAGES
    assert sum(embedded) == NUM_IMAGES - 8  # the saved shard was read back, not recomputed
    fresh = tmp_path / "fresh"
    run(data, fresh)
    assert tree_bytes(resumed) == tree_bytes(fresh)

    embedded.clear()  # a lost neighbour shard is searched again, from the saved embeddings, identically
    (resumed / gv.KNN_FOLDER / "neighbours-00001.npy").unlink()
    summary = run(data, resumed)
    assert (summary["written"], summary["complete_before"], sum(embedded)) == (0, NUM_IMAGES, 0)
    assert tree_bytes(resumed) == tree_bytes(fresh)


def test_a_rerun_with_other_settings_is_refused_in_one_line_and_changes_nothing(tmp_path, capsys, data):
    output = tmp_path / "bags"
    run(data, output)
    before = tree_bytes(output)
    record = json.loads((output / gv.RECORD_NAME).read_text())
    assert (record["k"], record["input_size"], record["checkpoint_sha256"]) == (5, SIZE, file_hash(data / "vit.pth"))
    argv = ["knn", "--images", data / "images", "--checkpoint", data / "vit.pth", "--output", output, *KNN]
    for change, key in [(["--k", "3"], "k"), (["--input-size", "16"], "input_size")]:
        status, err, message = cli(gv.main, [*argv, *change], capsys)
        assert status == 1 and "Traceback" not in err
        assert_one_line_naming(message, output / gv.RECORD_NAME, key, "--output")
        assert tree_bytes(output) == before
    other = tmp_path / "other.pth"
    torch.manual_seed(9)
    vit = cdgmae.VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.save({"model": vit.state_dict()}, other)
    status, err, message = cli(gv.main, [*argv[:4], other, *argv[5:]], capsys)
    assert status == 1
    assert_one_line_naming(message, "checkpoint_sha256")
    assert tree_bytes(output) == before


@pytest.mark.parametrize("flag,value", [("--k", "0"), ("--k", "101"), ("--chunk", "0"), ("--input-size", "0"),
                                        ("--batch-size", "0"), ("--workers", "-1")])
def test_a_bad_flag_is_one_argparse_line_naming_it(tmp_path, capsys, data, flag, value):
    out = tmp_path / "out"
    status, err, message = cli(gv.main, ["knn", "--images", data / "images", "--checkpoint", data / "vit.pth",
                                         "--output", out, flag, value], capsys)
    assert status == 2 and "Traceback" not in err
    assert_one_line_naming(message, f"argument {flag}", value)
    assert not out.exists()


def test_too_few_images_or_a_bad_checkpoint_stop_before_any_work(tmp_path, capsys, data):
    out = tmp_path / "out"
    argv = ["knn", "--images", data / "images", "--checkpoint", data / "vit.pth", "--output", out, *KNN]
    status, _, message = cli(gv.main, [*argv, "--k", str(NUM_IMAGES)], capsys)
    assert status == 1
    assert_one_line_naming(message, data / "images", "--k")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    status, err, message = cli(gv.main, [*argv[:4], tmp_path / "bad.pth", *argv[5:]], capsys)
    assert status == 1 and "Traceback" not in err
    assert_one_line_naming(message, tmp_path / "bad.pth")
    status, _, message = cli(gv.main, [*argv, "--input-size", "30"], capsys)
    assert status == 1
    assert_one_line_naming(message, "--input-size 30", "patch size 8")
    assert not out.exists()


def test_a_file_list_limits_the_bags_and_the_candidate_neighbours_to_the_listed_images(tmp_path, data):
    listed = sorted(p.relative_to(data / "images").as_posix() for p in (data / "images").rglob("*") if p.is_file())[::3]
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in listed))
    output = tmp_path / "bags"
    assert run(data, output, "--file-list", str(tmp_path / "list.txt"))["written"] == len(listed) == 10
    allowed = {file_hash(data / "images" / p) for p in listed}
    for bag in common.find_bags(output):
        real, views = common.bag_files(output / bag)
        assert len(views) == 5 and {file_hash(v) for v in views} <= allowed - {file_hash(real)}


def test_an_unreadable_image_stops_the_run_before_any_embedding_naming_it(tmp_path, capsys, data):
    images = tmp_path / "images"
    for p in (data / "images").rglob("*"):
        if p.is_file():
            (images / p.relative_to(data / "images")).parent.mkdir(parents=True, exist_ok=True)
            (images / p.relative_to(data / "images")).write_bytes(p.read_bytes())
    bad = images / "n01" / "img03.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    out = tmp_path / "out"
    status, err, message = cli(gv.main, ["knn", "--images", images, "--checkpoint", data / "vit.pth",
                                         "--output", out, *KNN], capsys)
    assert status == 1 and "Traceback" not in err
    assert_one_line_naming(message, bad)
    assert not out.exists()


def test_a_saved_shard_that_does_not_fit_the_listing_is_one_line_naming_it(tmp_path, capsys, data):
    output = tmp_path / "bags"
    run(data, output)
    shard = output / gv.KNN_FOLDER / "neighbours-00000.npy"
    np.save(shard, np.zeros((3, 5), dtype=np.int64))  # e.g. a file from another run copied in
    before = tree_bytes(output)
    status, err, message = cli(gv.main, ["knn", "--images", data / "images", "--checkpoint", data / "vit.pth",
                                         "--output", output, *KNN], capsys)
    assert status == 1 and "Traceback" not in err
    assert_one_line_naming(message, shard, "delete it")
    assert tree_bytes(output) == before
