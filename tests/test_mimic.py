"""MIMIC's overlap of two views (MIMIC appendix Sec. 2.2) in metrics.py: each test states one
property of the measure, with the true overlap worked out from the known homography by hand."""
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

import metrics

SIZE, P = 224, 16  # MIMIC's 224 x 224 views and 16 x 16 patches: a 14 x 14 grid


def texture(size, seed):
    """A smooth multi-scale random texture with coloured discs: plenty of SIFT keypoints."""
    rng = np.random.default_rng(seed)
    grey = np.zeros((size, size))
    for cells in (4, 8, 16, 32, 64):
        noise = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        grey += np.asarray(noise.resize((size, size), Image.BICUBIC), np.float64) / 5
    img = Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(size * size // 1700):
        x, y, r = rng.integers(0, size), rng.integers(0, size), rng.integers(3, 14)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def shifted_pair(dx, dy):
    """View a = the top-left 224 x 224 of a larger texture, view b = the crop moved by (dx, dy):
    H maps a's pixel (x, y) to b's (x - dx, y - dy)."""
    src = texture(SIZE + 96, seed=0)
    return src.crop((0, 0, SIZE, SIZE)), src.crop((dx, dy, dx + SIZE, dy + SIZE))


def shift_overlap_by_hand(dx, dy):
    """Shifts of 4 px past a patch boundary: 12 of a patch's 16 pixel columns (rows) land in the
    patch of b holding the patch centre, so that patch is the majority match, and a shift sends
    distinct patches to distinct patches (unique). Count the patches of a whose centre lands in b;
    the reverse direction is the same count (the shift back)."""
    cols = sum(0 <= P * c + P / 2 - dx < SIZE for c in range(SIZE // P))
    rows = sum(0 <= P * r + P / 2 - dy < SIZE for r in range(SIZE // P))
    return cols * rows / (SIZE // P) ** 2


# The overlaps below come from an estimated homography (SIFT + RANSAC): its keypoints sit within a fraction of a
# pixel, so it maps a patch within about a pixel of the true map. A patch 4 px past a boundary keeps >= 11 of its
# 16 pixel columns (rows) on one side even so, and its 100-point vote goes the other way with probability
# < 1e-4; two patches of the 196 (abs 2 / 196) leave room for the estimate's error near the views' corners.
def test_shifted_views_overlap_as_counted_from_the_known_shift():
    a, b = shifted_pair(68, 36)
    truth = shift_overlap_by_hand(68, 36)
    assert truth == pytest.approx(10 * 12 / 196)          # columns 4..13, rows 2..13 of a stay in b
    report = metrics.mimic_overlap_report(a, b)
    assert report["reason"] is None and report["inliers"] >= 20
    assert report["overlap"] == pytest.approx(truth, abs=2 / 196)
    assert metrics.mimic_overlap(b, a) == pytest.approx(truth, abs=2 / 196)  # symmetric measure


def test_zoomed_view_counts_each_patch_of_the_coarser_view_once():
    """b = a's 112 x 112 region at (48, 48) enlarged 2x. a -> b: the 7 x 7 patches of a inside
    the region each cover a 2 x 2 block of b (distinct blocks): 49 of 196. b -> a: the 196
    patches of b fall 4 to a patch of a, and only the first of the 4 counts: again 49 of 196.
    (Without the uniqueness rule b -> a would be 196 / 196.)"""
    a = texture(SIZE, seed=1)
    b = a.crop((48, 48, 160, 160)).resize((SIZE, SIZE), Image.BICUBIC)
    report = metrics.mimic_overlap_report(a, b)
    assert report["reason"] is None
    assert report["a_to_b"] == pytest.approx(49 / 196, abs=2 / 196)
    assert report["b_to_a"] == pytest.approx(49 / 196, abs=2 / 196)
    assert report["overlap"] == pytest.approx(0.25, abs=2 / 196)


def test_patch_step_on_an_exact_homography_matches_the_hand_count():
    """Steps 4-6 alone, with the true H instead of the estimated one (no SIFT)."""
    H = np.array([[1.0, 0, -68], [0, 1, -36], [0, 0, 1]])
    overlap, a_to_b, b_to_a = metrics.homography_overlap(H, (SIZE, SIZE), (SIZE, SIZE))
    assert a_to_b == b_to_a == overlap == shift_overlap_by_hand(68, 36)
    # 2x zoom about (48, 48): a's pixel x -> 2 (x - 48) + 0.5 (PIL's pixel-centre convention)
    Z = np.array([[2.0, 0, -95.5], [0, 2, -95.5], [0, 0, 1]])
    assert metrics.homography_overlap(Z, (SIZE, SIZE), (SIZE, SIZE))[1:] == (49 / 196, 49 / 196)
    # the identity: every patch matches itself
    assert metrics.homography_overlap(np.eye(3), (SIZE, SIZE), (SIZE, SIZE))[0] == 1.0


def test_the_overlap_is_the_smaller_of_the_two_directions():
    """b = a's 112 x 112 region at (48, 48), not resized: all 49 patches of b lie in a (1.0), but
    only 49 of a's 196 patches lie in b (0.25); MIMIC keeps the minimum."""
    H = np.array([[1.0, 0, -48], [0, 1, -48], [0, 0, 1]])
    assert metrics.homography_overlap(H, (SIZE, SIZE), (112, 112)) == (0.25, 0.25, 1.0)
    a = texture(SIZE, seed=4)
    report = metrics.mimic_overlap_report(a, a.crop((48, 48, 160, 160)))
    assert (report["overlap"], report["a_to_b"], report["b_to_a"]) == pytest.approx((0.25, 0.25, 1.0), abs=2 / 196)


def test_majority_vote_counts_points_that_land_outside():
    """Shift right by 12 px: a patch of the last column keeps 4 of its 16 pixel columns inside b,
    so "outside" wins its vote and it has no match; every other patch matches its right
    neighbour, which holds 12 of its 16 pixel columns."""
    H = np.array([[1.0, 0, 12], [0, 1, 0], [0, 0, 1]])
    matches = metrics.matched_patches(H, (SIZE, SIZE), (SIZE, SIZE), rng=0).reshape(14, 14)
    assert (matches[:, -1] == -1).all()
    assert (matches[:, :-1] == np.arange(14)[:, None] * 14 + np.arange(1, 14)[None, :]).all()


def test_identical_views_overlap_fully():
    a = texture(SIZE, seed=2)
    assert metrics.mimic_overlap(a, a) == pytest.approx(1.0, abs=1 / 196)  # H ~ identity: at most one patch off


def test_unrelated_noise_views_have_no_overlap_and_a_reason():
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2))
    report = metrics.mimic_overlap_report(a, b)
    assert report["overlap"] == 0.0
    assert "matches" in report["reason"] or "homography" in report["reason"]


def test_keep_range_is_mimics_fifty_to_seventy_five_percent_with_both_ends_excluded():
    # App. 2.2 keeps "an overlap ranging from 50% to 75%"; MIMIC's code compares 50 < overlap < 75.
    # On 14 x 14 patches both ends occur: 98 / 196 = 0.5 and 147 / 196 = 0.75 are dropped.
    assert not metrics.in_mimic_keep_range(98 / 196) and not metrics.in_mimic_keep_range(147 / 196)
    assert metrics.in_mimic_keep_range(99 / 196) and metrics.in_mimic_keep_range(146 / 196)
    assert metrics.in_mimic_keep_range(0.7) and metrics.in_mimic_keep_range(0.74)
    assert metrics.in_mimic_keep_range(np.array([0.2, 0.5, 0.6, 0.75, 0.9])).tolist() == [False, False, True, False,
                                                                                           False]


# --- Command line ---------------------------------------------------------------

def run_main(args, capsys):
    try:
        metrics.main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_overlap_of_two_files(tmp_path, capsys):
    a, b = shifted_pair(68, 36)
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    code, out, err = run_main(["overlap", str(tmp_path / "a.png"), str(tmp_path / "b.png")], capsys)
    assert code == 0
    assert float(out.strip()) == pytest.approx(shift_overlap_by_hand(68, 36), abs=2 / 196)
    assert "keep range" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", ["missing.jpg", "broken.jpg"])
def test_cli_fails_with_one_line_on_an_unreadable_file(tmp_path, capsys, bad):
    texture(32, 0).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    code, out, err = run_main(["overlap", str(tmp_path / "good.png"), str(tmp_path / bad)], capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and bad in err and "Traceback" not in err


def test_without_opencv_the_overlap_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    texture(32, 0).save(tmp_path / "a.png")
    code, _, err = run_main(["overlap", str(tmp_path / "a.png"), str(tmp_path / "a.png")], capsys)
    assert code == 1 and "opencv-python-headless" in err and len(err.strip().splitlines()) == 1
    # GS / LS / NPS do not need it
    assert metrics.global_similarity(metrics.torch.ones(1, 4), metrics.torch.ones(1, 4)).item() == pytest.approx(1)
    with pytest.raises(ImportError, match="opencv"):
        metrics.mimic_overlap(np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8))


def test_table_1_report_has_an_overlap_column(tmp_path, capsys):
    """Bags whose generated view is the real image moved by (68, 36): the overlap column of the
    Diffusion row is the hand count, on the same 224 x 224 crops the ViT sees."""
    import cdgmae
    import torch
    torch.manual_seed(0)
    vit = cdgmae.VisionTransformer(img_size=SIZE, patch_size=P, embed_dim=32, depth=1, num_heads=2)
    torch.save({"model": vit.state_dict(), "args": {"num_heads": 2}}, tmp_path / "vit.pth")
    for i in range(2):
        a, b = shifted_pair(68, 36)
        (tmp_path / "bags" / f"img{i}").mkdir(parents=True)
        a.save(tmp_path / "bags" / f"img{i}" / "real.png")
        b.save(tmp_path / "bags" / f"img{i}" / "view_00.png")
    rows = metrics.main(["--checkpoint", str(tmp_path / "vit.pth"), "--bags", str(tmp_path / "bags"),
                         "--num-pairs", "2", "--workers", "0", "--device", "cpu", "--csv", str(tmp_path / "t.csv")])
    assert rows[0]["overlap"] == pytest.approx(shift_overlap_by_hand(68, 36), abs=2 / 196)
    assert rows[0]["in_mimic_range"] == 1.0                  # 0.61 is in (0.5, 0.75)
    out = capsys.readouterr().out
    assert "MIMIC overlap" in out.splitlines()[0]
    header = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["overlap", "overlap_std", "in_mimic_range"]
    metrics.main(["--checkpoint", str(tmp_path / "vit.pth"), "--bags", str(tmp_path / "bags"), "--no-overlap",
                  "--num-pairs", "2", "--workers", "0", "--device", "cpu", "--csv", str(tmp_path / "u.csv")])
    assert "overlap" not in (tmp_path / "u.csv").read_text()
