"""The view-consistency metrics of Sec. 3.2, Eq. (1)-(3), and the Table 1 evaluation CLI."""
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

import common
import cdgmae
import metrics
from metrics import global_similarity, local_similarity, nearest_patch_similarity

pytestmark = pytest.mark.float_kernels  # the verdicts compare float results of torch's kernels


def test_identical_views_have_all_three_similarities_equal_to_one():
    torch.manual_seed(0)
    cls, patches = torch.randn(4, 16), torch.randn(4, 9, 16)
    for value in (global_similarity(cls, cls), local_similarity(patches, patches),
                  nearest_patch_similarity(patches, patches)):
        # float32 unit vectors of D = 16: normalising and the dot product round by <= 2 (D + 2) eps = 2e-6
        torch.testing.assert_close(value, torch.ones(4), rtol=0, atol=1e-5)


def test_nearest_patch_similarity_is_never_below_local_similarity():
    torch.manual_seed(1)
    a = torch.randn(200, 12, 8)
    b = 0.5 * a + torch.randn(200, 12, 8) * torch.rand(200, 1, 1) * 3  # from near copies to unrelated views
    # exact in exact arithmetic; NPS's matrix product and LS's elementwise sum round a cosine (D = 8) apart by
    # <= 2 D eps = 1e-6, and the means of 12 values by <= 12 eps each: < 3e-6
    assert (nearest_patch_similarity(a, b) >= local_similarity(a, b) - 1e-5).all()


def test_shuffling_patch_positions_keeps_gs_and_nps_and_lowers_ls():
    torch.manual_seed(2)
    cls, patches = torch.randn(3, 16), torch.randn(3, 9, 16)
    shuffled = patches[:, torch.randperm(9)]
    # below: float32 cosines of D = 16 and means of 9 of them, in whatever order: <= 2 (D + 2) eps + 9 eps = 3e-6
    torch.testing.assert_close(global_similarity(cls, cls), torch.ones(3), rtol=0, atol=1e-5)  # cls untouched
    torch.testing.assert_close(nearest_patch_similarity(patches, shuffled), torch.ones(3), rtol=0, atol=1e-5)
    assert (local_similarity(patches, shuffled) < 0.9).all()
    # NPS of unrelated views does not depend on where the patches of either view sit
    other = torch.randn(3, 9, 16)
    torch.testing.assert_close(nearest_patch_similarity(patches, other),
                               nearest_patch_similarity(patches[:, torch.randperm(9)], other[:, torch.randperm(9)]),
                               rtol=0, atol=1e-5)


def test_a_small_example_worked_out_by_hand():
    # A few float32 operations on small exact numbers: within a few eps of the values worked out here, well
    # inside assert_close's float32 tolerance (1e-5 + 1.3e-6 relative).
    # cls (3, 4) vs (4, 3): cos = 24 / 25
    torch.testing.assert_close(global_similarity(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])),
                               torch.tensor([0.96]))
    # V1 patches (1, 0), (0, 1); V2 patches (0, 1), (2, 2).  sim(a1, b1) = 0, sim(a1, b2) = 1/sqrt2,
    # sim(a2, b1) = 1, sim(a2, b2) = 1/sqrt2.  LS = (0 + 1/sqrt2) / 2, NPS = (1/sqrt2 + 1) / 2.
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(local_similarity(a, b), torch.tensor([r / 2]))
    torch.testing.assert_close(nearest_patch_similarity(a, b), torch.tensor([(r + 1) / 2]))
    # NPS looks for V1's patches in V2, not the reverse: V1 = two copies of (1, 0), V2 = (1, 0), (0, 1)
    c, d = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(nearest_patch_similarity(c, d), torch.tensor([1.0]))
    torch.testing.assert_close(nearest_patch_similarity(d, c), torch.tensor([0.5]))
    torch.testing.assert_close(local_similarity(c, d), torch.tensor([0.5]))


def test_knn_pairs_take_one_of_the_k_nearest_by_cls_cosine():
    torch.manual_seed(3)
    cls = torch.randn(30, 6)
    rng = np.random.default_rng(0)
    queries = rng.choice(30, 12, replace=False)
    pairs = metrics.knn_pairs_from_features(cls, queries, k=5, rng=rng)
    x = cls.double().numpy()
    for q, n in pairs:  # brute force: rank every other image by cosine similarity to the query
        cos = sorted((float(x[q] @ x[j] / np.linalg.norm(x[q]) / np.linalg.norm(x[j])) for j in range(30) if j != q),
                     reverse=True)
        # n is among the 5 nearest up to the search's float32 rounding (D = 6: <= 4 (D + 2) eps = 2e-6)
        assert float(x[q] @ x[n] / np.linalg.norm(x[q]) / np.linalg.norm(x[n])) >= cos[4] - 1e-5 and n != q
    assert [q for q, _ in pairs] == list(queries)


def save_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_cli_writes_the_table_1_rows_and_identical_views_score_one(tmp_path):
    torch.manual_seed(4)
    vit = cdgmae.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.save({"model": vit.state_dict(), "args": {"num_heads": 2}}, tmp_path / "vit.pth")
    rng = np.random.default_rng(0)
    for b in range(3):  # bags whose generated view is pixel-identical to the real image
        img = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
        save_image(tmp_path / "bags" / f"c/img{b}" / "real.png", img)
        save_image(tmp_path / "bags" / f"c/img{b}" / "view_00.png", img)
    for s in range(2):  # DAVIS layout, 4 frames per sequence
        for t in range(4):
            save_image(tmp_path / "davis" / "JPEGImages" / "480p" / f"seq{s}" / f"{t:05d}.jpg",
                       rng.integers(0, 256, (36, 48, 3), dtype=np.uint8))
    for i in range(8):
        save_image(tmp_path / "images" / f"n{i % 2}" / f"{i}.png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))

    rows = metrics.main(["--checkpoint", str(tmp_path / "vit.pth"), "--video", str(tmp_path / "davis"),
                         "--frame-gap", "2", "--bags", str(tmp_path / "bags"), "--images", str(tmp_path / "images"),
                         "--knn", "2", "--num-pairs", "3", "--input-size", "32", "--batch-size", "2",
                         "--workers", "0", "--device", "cpu", "--csv", str(tmp_path / "table.csv")])
    by_name = {r["pairs"]: r for r in rows}
    assert list(by_name) == ["Video frames", "Diffusion (S-LDM)", "K-nn images", "Random images"]
    assert [r["num_pairs"] for r in rows] == [3, 3, 3, 3]  # 2 sequences x (4 - 2) frame pairs >= 3
    for key in ("gs", "ls", "nps"):  # identical images: cosines of a vector with itself (D = 32), 2 (D + 2) eps
        assert by_name["Diffusion (S-LDM)"][key] == pytest.approx(1.0, abs=1e-5)
    assert by_name["Random images"]["gs"] < 1 - 1e-4
    with open(tmp_path / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["pairs"] for r in table] == list(by_name)
    for r in table:  # written with 6 decimals: <= 5e-7 off; NPS >= LS up to rounding (test above: < 3e-6)
        assert float(r["nps"]) == pytest.approx(by_name[r["pairs"]]["nps"], abs=1e-6)
        assert float(r["nps"]) >= float(r["ls"]) - 1e-5


def test_evaluate_pairs_scores_each_pair_from_the_vits_last_block_tokens(tmp_path):
    torch.manual_seed(5)
    vit = cdgmae.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        save_image(paths[-1], rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    pairs = [(paths[0], paths[1]), (paths[2], paths[0])]
    scores = metrics.evaluate_pairs(vit, pairs, size=32, batch_size=2, workers=0)
    # The scores come from batches of 2, the check below from single images: the float32 ViT's sums (patch
    # embedding 192 terms, attention 17, projections 32, MLP 128: ~430 in all) round apart by <= 430 eps =
    # 2.6e-5 relative in the worst case, and a cosine moves by at most the two vectors' relative changes: 1e-4.
    with torch.no_grad():
        for p, (a, b) in enumerate(pairs):  # one pair at a time, straight from vit(x): cls first, then 16 patches
            ta, tb = (vit(metrics.evaluation_tensor(common.load_rgb(x), 32)[None])[0] for x in (a, b))
            assert ta.shape == (1 + 16, 32)
            cos = torch.nn.functional.cosine_similarity
            assert scores["gs"][p].item() == pytest.approx(cos(ta[0], tb[0], dim=0).item(), abs=1e-4)
            assert scores["ls"][p].item() == pytest.approx(cos(ta[1:], tb[1:], dim=-1).mean().item(), abs=1e-4)
            nps = torch.stack([cos(ta[i][None], tb[1:], dim=-1).max() for i in range(1, 17)]).mean()
            assert scores["nps"][p].item() == pytest.approx(nps.item(), abs=1e-4)
