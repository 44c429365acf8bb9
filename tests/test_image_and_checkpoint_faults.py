"""Images of every mode and depth, and checkpoints that load but cannot be used.

Images: one rule (common.to_rgb) makes any image 8-bit RGB wherever the project reads one, or
refuses it naming the file and its mode; each start-up check refuses what its loader would
refuse, before any work. Checkpoints: NaN or infinite weights, another shape, a folder, an
image, a truncated archive, and heads that do not divide the width are one line that starts
with the path, on every command line that loads one (docs/training.md, "Images of every mode").
"""
import shutil
import struct
import warnings
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

import common  # noqa: E402
import cdgmae  # noqa: E402
import evaluate as ev  # noqa: E402
import generate_views as gv  # noqa: E402
import metrics  # noqa: E402
import propagate as pr  # noqa: E402
from test_dift import tiny_sd_folder  # noqa: E402
from test_evaluation_faults import H, W, make_davis, propagate_argv  # noqa: E402
from test_generate_views import compvis_checkpoint, tiny_sldm, write_images  # noqa: E402, F401
from test_generation_faults import assert_one_line_naming, cli  # noqa: E402
from test_training_faults import TINY  # noqa: E402
from transformers import CLIPImageProcessor  # noqa: E402


# -----------------------------------------------------------------------------
# Images of every mode, written the way a camera, a scanner or an editor writes them
# -----------------------------------------------------------------------------

GRADIENT = np.arange(4 * 256, dtype=np.uint32).reshape(4, 256) * 64  # 16-bit values 0 .. 65472


def save_16_bit(path):
    """A 16-bit grey PNG (Pillow opens it as I;16) and the 8-bit image it must become: value >> 8."""
    Image.fromarray(GRADIENT.astype(np.uint16)).save(path)
    return Image.fromarray((GRADIENT // 256).astype(np.uint8), mode="L").convert("RGB")


def save_as(path, image, fmt):
    """Save under `path` whatever its suffix says (a TIFF named .png opens as a TIFF: Pillow reads
    the content, not the name)."""
    with open(path, "wb") as f:
        image.save(f, format=fmt)
    return path


def float_image(value, size=(W, H)):
    return Image.fromarray(np.full(size[::-1], value, np.float32))


def bomb_png(path, width, height):
    """A 1x1 PNG whose header declares width x height (the CRC made valid)."""
    Image.new("L", (1, 1)).save(path, format="PNG")
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def palette_with_transparency(path):
    image = Image.new("P", (4, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    image.putdata([0, 1, 2, 3])
    image.save(path, transparency=bytes([0, 255, 128, 255]))
    return path


def rgb(path_or_image):
    image = common.load_rgb(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(image)


# -----------------------------------------------------------------------------
# The rule: what each mode becomes
# -----------------------------------------------------------------------------

def test_a_16_bit_image_becomes_its_high_byte_not_white(tmp_path):
    expected = save_16_bit(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.array_equal(rgb(tmp_path / "g16.png"), np.asarray(expected))
    # mode I holding 16-bit values (older Pillow opens 16-bit PNGs so) follows the same rule
    as_int32 = Image.fromarray(GRADIENT.astype(np.int32))
    assert as_int32.mode == "I" and np.array_equal(rgb(common.to_rgb(as_int32)), np.asarray(expected))


def test_32_bit_images_convert_inside_their_range_and_are_refused_outside_it(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    converted = rgb(common.load_rgb(save_as(tmp_path / "f.png", Image.fromarray(ramp), "TIFF")))
    assert np.array_equal(converted[..., 0], np.rint(ramp * 255).astype(np.uint8))  # [0, 1] times 255
    refused = {"i.png": (Image.fromarray(np.full((8, 8), 70000, np.int32)), "mode I"),
               "over.png": (float_image(1.5, (8, 8)), "mode F"), "nan.png": (float_image(np.nan, (8, 8)), "mode F")}
    for name, (image, words) in refused.items():
        path = save_as(tmp_path / name, image, "TIFF")
        for load in (common.load_rgb, cdgmae.decode_image, common.check_image):
            with pytest.raises(common.UnreadableImage, match=words) as error:
                load(path)
            assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_cmyk_palette_alpha_and_bilevel_images_keep_their_colours(tmp_path):
    Image.new("CMYK", (4, 4), (10, 20, 30, 40)).save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as image:
        assert image.mode == "CMYK"
        pillows = np.asarray(image.convert("RGB"))  # the rule's CMYK conversion is Pillow's own
    assert np.array_equal(rgb(tmp_path / "cmyk.jpg"), pillows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns when such a palette image goes to RGB directly
        palette = rgb(palette_with_transparency(tmp_path / "p.png"))
    assert palette[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]  # transparency dropped
    Image.new("RGBA", (2, 2), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("LA", (2, 2), (77, 0)).save(tmp_path / "la.png")
    assert rgb(tmp_path / "rgba.png")[0, 0].tolist() == [10, 20, 30]  # alpha dropped, not composited
    assert rgb(tmp_path / "la.png")[0, 0].tolist() == [77, 77, 77]
    Image.new("1", (2, 2), 1).save(tmp_path / "bilevel.png")
    assert rgb(tmp_path / "bilevel.png")[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_ignored_the_pixels_are_used_as_stored(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, 20:] = 255  # left half black, right half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    image = common.load_rgb(tmp_path / "phone.jpg")
    assert image.size == (40, 20)  # not (20, 40): the orientation is not applied
    assert rgb(image)[:, :15].max() < 30 and rgb(image)[:, 25:].min() > 225
    assert cdgmae.decode_image(tmp_path / "phone.jpg").shape == (3, 20, 40)


def test_a_mode_without_a_conversion_is_refused_naming_the_file_and_the_mode(tmp_path):
    path = save_as(tmp_path / "lab.png", Image.new("LAB", (4, 4), (50, 0, 0)), "TIFF")
    with pytest.raises(common.UnreadableImage, match="LAB") as error:
        common.check_image(path)
    assert str(error.value).startswith(f"{path}: a LAB image")


def test_a_header_declaring_an_absurd_size_is_refused_before_decoding_without_a_warning(tmp_path, recwarn):
    # 100000^2 is past Pillow's error limit (2 x MAX_IMAGE_PIXELS); 10000^2 between its warning and
    # error limits, where Pillow would only warn and then try to decode 10^8 pixels.
    for side in (100_000, 10_000):
        path = bomb_png(tmp_path / f"bomb{side}.png", side, side)
        for load in (common.open_image, common.load_rgb, cdgmae.decode_image, common.check_image):
            with pytest.raises(common.UnreadableImage, match="MAX_IMAGE_PIXELS") as error:
                load(path)
            assert str(error.value).startswith(f"{path}: the header declares")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# -----------------------------------------------------------------------------
# Every reader applies the rule: a 16-bit image gives what its 8-bit equivalent gives
# -----------------------------------------------------------------------------

READERS = {
    "common.load_rgb": lambda p: rgb(p),
    "cdgmae.decode_image": lambda p: cdgmae.decode_image(p),
    "propagate.load_frame": lambda p: pr.load_frame(p, (8, 64)),
    "metrics.PairImages": lambda p: metrics.PairImages([(p,)], size=32)[0][0],
    "metrics.gray_uint8 (MIMIC overlap)": lambda p: metrics.gray_uint8(Image.open(p)),
    "generate_views.ImageFiles": lambda p: gv.ImageFiles(p.parent, [p.name], gv.conditioning_tensor)[0][1],
    "generate_views.ImageFiles, CLIP preprocessing": lambda p: gv.ImageFiles(p.parent, [p.name], partial(
        gv.clip_pixels, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})))[0][1],
}


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_reads_a_16_bit_image_as_its_8_bit_equivalent(tmp_path, reader):
    expected = save_16_bit(tmp_path / "g16.png")
    expected.save(tmp_path / "g8.png")
    read = READERS[reader]
    got, want = read(tmp_path / "g16.png"), read(tmp_path / "g8.png")
    assert got.shape == want.shape and (torch.equal(got, want) if torch.is_tensor(got) else np.array_equal(got, want))


def test_bags_of_16_bit_and_palette_images_give_the_samples_of_their_8_bit_equivalents(tmp_path):
    for bag, convert in (("deep", False), ("flat", True)):
        folder = tmp_path / bag / "img"
        folder.mkdir(parents=True)
        real = save_16_bit(folder / "real.png")
        palette_with_transparency(folder / "view_00.png")
        if convert:  # the same images, already 8-bit RGB
            real.save(folder / "real.png")
            common.load_rgb(folder / "view_00.png").save(folder / "view_00.png")
    items = [cdgmae.BagDataset(tmp_path / bag, ["img"], num_views=1, input_size=16, num_patches=4)[(0, 0)]
             for bag in ("deep", "flat")]
    assert all(torch.equal(a, b) for a, b in zip(*items))


# -----------------------------------------------------------------------------
# The start-up checks refuse what the loaders refuse, before any work, in one line
# -----------------------------------------------------------------------------

def write_bags(root, num=4, size=(40, 48)):
    rng = np.random.default_rng(0)
    for i in range(num):
        bag = root / f"img{i:03d}"
        bag.mkdir(parents=True)
        for name in ("real.jpg", "view_00.jpg", "view_01.jpg"):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(bag / name)
    return root


def train_argv(bags, output, *extra):
    return ["--data", bags, "--output", output, *TINY, "--batch-size", "4", "--epochs", "2", *extra]


def test_training_refuses_at_start_up_a_bag_image_the_loader_would_refuse(tmp_path, capsys):
    bags = write_bags(tmp_path / "bags")
    save_as(bags / "img001" / "view_01.jpg", float_image(3.0), "TIFF")
    status, err, message = cli(cdgmae.main, train_argv(bags, tmp_path / "run"), capsys)
    assert status == 1 and "Traceback" not in err
    assert_one_line_naming(message, bags, "img001: view_01.jpg: a 32-bit float image (mode F)")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["bag-problems.txt"]  # no training started
    bomb_png(bags / "img001" / "view_01.jpg", 10_000, 10_000)
    status, err, message = cli(cdgmae.main, train_argv(bags, tmp_path / "run2"), capsys)
    assert status == 1 and "DecompressionBombWarning" not in err
    assert_one_line_naming(message, "img001: view_01.jpg: the header declares 10000x10000 pixels")


def test_the_gpu_decode_refuses_at_start_up_and_in_the_workers_what_it_would_decode_differently(tmp_path):
    bags = write_bags(tmp_path / "bags", num=6)
    Image.new("CMYK", (40, 48)).save(bags / "img000" / "view_00.jpg")             # nvJPEG's CMYK: unverified
    Image.new("RGB", (40, 48)).save(bags / "img001" / "view_00.bmp")              # torchvision has no BMP
    (bags / "img001" / "view_00.jpg").unlink()
    save_16_bit(bags / "img002" / "view_00.png")                                   # torchvision gives uint16
    (bags / "img002" / "view_00.jpg").unlink()
    palette_with_transparency(bags / "img003" / "view_00.png")                     # 8-bit PNG: decoded alike
    (bags / "img003" / "view_00.jpg").unlink()
    Image.new("L", (40, 48), 9).save(bags / "img004" / "view_00.jpg")              # grey JPEG: decoded alike
    names = [f"img{i:03d}" for i in range(6)]
    assert common.check_bags(bags, names, 2, 2) == {}
    refused = common.check_bags(bags, names, 2, 2, also=common.gpu_check)
    assert sorted(refused) == ["img000", "img001", "img002"]
    assert "JPEG image in mode CMYK" in refused["img000"] and "BMP" in refused["img001"]
    assert "16-bit PNG" in refused["img002"] and all("--decode cpu" in why for why in refused.values())
    for bag in refused:  # a file replaced after the start-up check is refused by the worker too
        real, views = common.bag_files(bags / bag)
        with pytest.raises(common.UnreadableImage, match="--decode gpu"):
            cdgmae.read_encoded(views[0])


def test_propagation_and_evaluation_refuse_such_a_frame_before_any_work(tmp_path, capsys):
    checkpoint = cdgmae.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=1)
    torch.save({"model": checkpoint.state_dict()}, tmp_path / "vit.pth")
    for name, damage, words in (("float", lambda p: save_as(p, float_image(3.0), "TIFF"), "mode F"),
                                ("bomb", lambda p: bomb_png(p, 100_000, 100_000), "decompression bomb")):
        root = make_davis(tmp_path / name)
        frame = root / "JPEGImages/480p/seq/00002.jpg"
        damage(frame)
        status, err, message = cli(pr.main, propagate_argv("davis", root, tmp_path / "vit.pth", tmp_path / "out"),
                                   capsys)
        assert status == 1 and "Traceback" not in err and message.startswith(f"{frame}: ")
        assert_one_line_naming(message, words)
        assert not (tmp_path / "out").exists()
        if name == "bomb":  # evaluate.py reads the frames' headers too (their sizes)
            status, err, message = cli(ev.main, ["--dataset", "davis", "--data-root", root, "--predictions",
                                                 root / "Annotations/480p", "--no-progress"], capsys)
            assert status == 1 and message.startswith(f"{frame}: ") and "decompression bomb" in message


def test_own_video_metrics_and_knn_refuse_such_an_image_before_any_work(tmp_path, capsys):
    vit = cdgmae.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(images / f"{i}.png")
    bad = save_as(images / "3.png", float_image(3.0), "TIFF")
    ids = np.zeros((H, W), np.uint8)
    ids[8:16] = 1
    ev.write_palette_png(tmp_path / "mask.png", ids)
    commands = {
        "own video": (pr.main, ["--video", images, "--first-mask", tmp_path / "mask.png", "--checkpoint",
                                tmp_path / "vit.pth", "--output", tmp_path / "o", "--device", "cpu"]),
        "metrics": (metrics.main, ["--checkpoint", tmp_path / "vit.pth", "--images", images, "--csv",
                                   tmp_path / "t.csv", "--knn", "2", "--input-size", "32", "--workers", "0"]),
        "knn": (gv.main, ["knn", "--images", images, "--checkpoint", tmp_path / "vit.pth", "--output", tmp_path / "k",
                          "--k", "2", "--input-size", "32", "--workers", "0", "--no-progress"]),
    }
    for name, (main, argv) in commands.items():
        status, err, message = cli(main, argv, capsys)
        assert status == 1 and "Traceback" not in err and message.startswith(f"{bad}: "), (name, message)
        assert_one_line_naming(message, "mode F")
    assert not any((tmp_path / out).exists() for out in ("o", "t.csv", "k"))


def test_generation_skips_and_lists_an_image_the_loader_refuses(tmp_path, capsys):
    gv.save_sldm(tmp_path / "model", tiny_sldm())
    write_images(tmp_path / "images")
    save_as(tmp_path / "images" / "n01" / "bad.png", float_image(3.0), "TIFF")
    summary = gv.main([str(a) for a in ["--images", tmp_path / "images", "--model", tmp_path / "model", "--output",
                                        tmp_path / "bags", "--views", "1", "--steps", "1", "--workers", "0",
                                        "--device", "cpu", "--no-progress"]])
    assert summary["generated"] == 3 and [p for p, _ in summary["unreadable"]] == ["n01/bad.png"]
    assert "mode F" in (tmp_path / "bags" / "unreadable-shard000-of-001.txt").read_text()


# -----------------------------------------------------------------------------
# Images of one or two pixels
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("width,height", [(1, 1), (2, 1), (1, 2)])
def test_images_of_one_or_two_pixels_are_cropped_and_resized_without_error(width, height):
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
    for _ in range(20):
        box = cdgmae.sample_crop_box(rng, width, height)
        l, t, r, b = box
        assert 0 <= l < r <= 1 and 0 <= t < b <= 1
        crop = cdgmae.crop_resize(pixels, box, 16)
        assert crop.shape == (3, 16, 16)
        if width * height == 1:  # the resampling weights sum to one: a constant image stays that constant
            assert torch.equal(crop, pixels[:, :1, :1].expand_as(crop))
    global_boxes, local_box, _ = cdgmae.sample_crop_params(rng, width, height, 2, 16)
    target, anchors = cdgmae.cut_crops(pixels, global_boxes, local_box, [False] * 3, 16)
    assert target.shape == (3, 16, 16) and anchors.shape == (2, 3, 16, 16)


def test_training_on_bags_of_one_and_two_pixel_images_runs(tmp_path, capsys):
    bags = write_bags(tmp_path / "bags", size=(1, 2))
    Image.new("RGB", (1, 1), (5, 6, 7)).save(bags / "img000" / "real.jpg")
    status, err, _ = cli(cdgmae.main, train_argv(bags, tmp_path / "run", "--max-steps", "1"), capsys)
    assert status == 0, err


# -----------------------------------------------------------------------------
# Heads that do not divide the checkpoint's width
# -----------------------------------------------------------------------------

def vit_checkpoint(path, heads_in_args=None, poison=None):
    torch.manual_seed(0)
    state = cdgmae.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=1).state_dict()
    if poison is not None:
        state["blocks.0.attn.qkv.weight"][0, 0] = poison
    torch.save({"model": state, **({"args": {"num_heads": heads_in_args}} if heads_in_args else {})}, path)
    return path


def command_inputs(tmp_path):
    """A DAVIS-layout video, its first mask and an image folder under tmp_path (made once)."""
    if not (tmp_path / "davis").exists():
        make_davis(tmp_path / "davis")
        shutil.copy(tmp_path / "davis/Annotations/480p/seq/00000.png", tmp_path / "mask.png")
        (tmp_path / "images").mkdir()
        for i in range(4):
            Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(tmp_path / f"images/{i}.png")
    return tmp_path / "davis", tmp_path / "mask.png", tmp_path / "images"


def vit_commands(tmp_path, checkpoint, *extra):
    """{name: (main, argv)}: every command line that loads a ViT checkpoint, on valid small inputs,
    writing under tmp_path/outputs."""
    davis, mask, images = command_inputs(tmp_path)
    out = tmp_path / "outputs"
    out.mkdir(exist_ok=True)
    return {
        "propagate --dataset": (pr.main, propagate_argv("davis", davis, checkpoint, out / "p", *extra)),
        "propagate --video": (pr.main, ["--video", davis / "JPEGImages/480p/seq", "--first-mask", mask,
                                        "--checkpoint", checkpoint, "--output", out / "v", "--device", "cpu", *extra]),
        "metrics": (metrics.main, ["--checkpoint", checkpoint, "--images", images, "--csv", out / "t.csv", "--knn",
                                   "2", "--input-size", "32", "--workers", "0", "--no-overlap", *extra]),
        "knn": (gv.main, ["knn", "--images", images, "--checkpoint", checkpoint, "--output", out / "k", "--k", "2",
                          "--input-size", "32", "--workers", "0", "--no-progress", *extra]),
    }


def assert_refused_naming(results, path, *words):
    """Each command exited 1 with one line that starts with `path` and names `words`; nothing written."""
    for name, (status, err, message) in results.items():
        assert status == 1 and "Traceback" not in err, (name, err)
        assert message is not None and message.startswith(f"{path}: "), (name, message)
        assert_one_line_naming(message, *words)


def run_all(commands, capsys, tmp_path):
    results = {name: cli(main, argv, capsys) for name, (main, argv) in commands.items()}
    assert not any((tmp_path / "outputs").iterdir()), "a refused command wrote output"
    return results


def test_heads_that_do_not_divide_the_width_are_one_line_with_the_values_that_do(tmp_path, capsys):
    checkpoint = vit_checkpoint(tmp_path / "vit.pth")
    results = run_all(vit_commands(tmp_path, checkpoint, "--num-heads", "5"), capsys, tmp_path)
    assert_refused_naming(results, checkpoint, "--num-heads 5", "width 32", "1, 2, 4, 8, 16, 32")
    stored = vit_checkpoint(tmp_path / "stored.pth", heads_in_args=5)
    results = run_all(vit_commands(tmp_path, stored), capsys, tmp_path)
    assert_refused_naming(results, stored, "num_heads 5 (the checkpoint's args)", "width 32", "--num-heads")
    # the way out the message gives: --num-heads overrides the stored count
    assert metrics.load_vit(stored, 32, num_heads=4).num_heads == 4


def test_convert_refuses_a_dino_checkpoint_whose_heads_do_not_divide_its_width(tmp_path, capsys, compvis_checkpoint):
    root = compvis_checkpoint["folder"].parent
    vit = torch.load(root / "dino.pth", weights_only=True)
    torch.save({"model": vit, "args": {"num_heads": 5}}, tmp_path / "dino5.pth")
    argv = ["convert", "--ldm-checkpoint", root / "model.ckpt", "--ldm-config", root / "model.yaml", "--dino",
            tmp_path / "dino5.pth", "--output", tmp_path / "sldm", "--cond-image-size", "32"]
    status, err, message = cli(gv.main, argv, capsys)
    assert status == 1 and message.startswith(f"{tmp_path / 'dino5.pth'}: ") and not (tmp_path / "sldm").exists()
    assert_one_line_naming(message, "num_heads 5", "width 64", "--num-heads one of 1, 2, 4, 8, 16, 32, 64")
    status, err, message = cli(gv.main, argv + ["--num-heads", "4"], capsys)
    assert status == 0 and gv.load_sldm(tmp_path / "sldm").conditioner.vit.num_heads == 4


# -----------------------------------------------------------------------------
# Checkpoints that load but cannot be used
# -----------------------------------------------------------------------------

def not_checkpoints(tmp_path):
    """{what: path} of files and folders given where a checkpoint file is expected."""
    (tmp_path / "folder").mkdir(parents=True)
    (tmp_path / "diffusers" / "unet").mkdir(parents=True)
    (tmp_path / "diffusers" / "model_index.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.jpg")
    data = vit_checkpoint(tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
    return {"a folder": (tmp_path / "folder", "a folder, not a checkpoint file"),
            "a diffusion model folder": (tmp_path / "diffusers", "a diffusion model folder"),
            "an image": (tmp_path / "picture.jpg", "a JPEG image, not a checkpoint"),
            "a truncated archive": (tmp_path / "truncated.pth", "truncated or damaged")}


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, capsys, poison):
    checkpoint = vit_checkpoint(tmp_path / "diverged.pth", poison=poison)
    results = run_all(vit_commands(tmp_path, checkpoint), capsys, tmp_path)
    assert_refused_naming(results, checkpoint, "blocks.0.attn.qkv.weight holds 1 NaN or infinite value")


def test_a_folder_an_image_or_a_truncated_archive_given_as_checkpoint_is_one_line(tmp_path, capsys):
    for what, (path, words) in not_checkpoints(tmp_path / "given").items():
        results = run_all(vit_commands(tmp_path, path), capsys, tmp_path)
        if what == "a folder":  # propagate.py hashes the file first and says so in its own words
            assert results.pop("propagate --dataset")[2] == f"{path}: is a folder, not a checkpoint file " \
                                                           f"(check --checkpoint)"
        assert_refused_naming(results, path, words)


def test_a_diffusion_model_folder_given_to_propagate_points_to_dift(tmp_path, capsys):
    path = not_checkpoints(tmp_path / "given")["a diffusion model folder"][0]
    commands = vit_commands(tmp_path, path)
    results = run_all({k: v for k, v in commands.items() if k.startswith("propagate")}, capsys, tmp_path)
    assert_refused_naming(results, path, "--features dift")


def poison_safetensors(weights):
    """Set one value of the first tensor of a diffusers weights file to NaN; returns its name."""
    from safetensors.torch import load_file, save_file
    state = load_file(weights)
    name = sorted(state)[0]
    state[name].view(-1)[0] = float("nan")
    save_file(state, weights)
    return name


def test_the_s_ldm_pieces_and_the_dino_checkpoint_of_convert_refuse_non_finite_weights(
        tmp_path, capsys, compvis_checkpoint):
    folder = tmp_path / "model"
    gv.save_sldm(folder, tiny_sldm())
    name = poison_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    write_images(tmp_path / "images")
    status, err, message = cli(gv.main, ["--images", tmp_path / "images", "--model", folder, "--output",
                                         tmp_path / "bags", "--workers", "0", "--device", "cpu"], capsys)
    assert status == 1 and message.startswith(f"{folder / 'unet'}: {name} holds 1 NaN")
    status, err, message = cli(pr.main, propagate_argv("davis", make_davis(tmp_path / "davis"), folder,
                                                       tmp_path / "p", "--features", "dift"), capsys)
    assert status == 1 and message.startswith(f"{folder / 'unet'}: {name} holds 1 NaN")
    assert not (tmp_path / "bags").exists() and not (tmp_path / "p").exists()

    root = compvis_checkpoint["folder"].parent
    dino = torch.load(root / "dino.pth", weights_only=True)
    dino["norm.weight"][3] = float("inf")
    torch.save(dino, tmp_path / "dino-inf.pth")
    for dino_path, words in [(tmp_path / "dino-inf.pth", "norm.weight holds 1 NaN or infinite value"),
                             *not_checkpoints(tmp_path / "given").values()]:
        status, err, message = cli(gv.main, ["convert", "--ldm-checkpoint", root / "model.ckpt", "--ldm-config",
                                             root / "model.yaml", "--dino", dino_path, "--output", tmp_path / "s",
                                             "--cond-image-size", "32"], capsys)
        assert status == 1 and message.startswith(f"{dino_path}: ") and not (tmp_path / "s").exists()
        assert_one_line_naming(message, words)


def test_a_stable_diffusion_folder_with_non_finite_weights_is_refused_for_dift(tmp_path, capsys):
    folder = tiny_sd_folder(tmp_path / "sd")
    name = poison_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors")
    status, err, message = cli(pr.main, propagate_argv("davis", make_davis(tmp_path / "davis"), folder,
                                                       tmp_path / "p", "--features", "dift"), capsys)
    assert status == 1 and message.startswith(f"{folder / 'vae'}: {name} holds 1 NaN") and not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Bags and a run stopped after its first step (4 bags, batch 4: 1 step per epoch, 2 epochs)."""
    root = tmp_path_factory.mktemp("resume")
    bags = write_bags(root / "bags")
    cdgmae.main([str(a) for a in train_argv(bags, root / "run", "--max-steps", "1")])
    return bags, root / "run" / "checkpoint-last.pth"


def edited(checkpoint, path, edit):
    ckpt = torch.load(checkpoint, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


def test_resume_refuses_unusable_checkpoints_before_any_work(tmp_path, capsys, finished_run):
    bags, last = finished_run
    qkv = "blocks.0.attn.qkv.weight"
    cases = {  # path -> what the one line must name
        edited(last, tmp_path / "inf.pth", lambda c: c["model"][qkv].view(-1)[0].fill_(float("inf"))):
            [f"{qkv} holds 1 NaN or infinite value", "earlier checkpoint"],
        edited(last, tmp_path / "moment.pth", lambda c: c["optimizer"]["state"][0]["exp_avg"].fill_(float("nan"))):
            ["optimizer state 0.exp_avg holds", "NaN"],
        edited(last, tmp_path / "shapes.pth", lambda c: c["model"].update({"decoder_pred.weight": torch.zeros(7, 32)})):
            ["do not fit this run's model", "decoder_pred.weight", "(7, 32)"],
        vit_checkpoint(tmp_path / "vit.pth"): ["not a cdgmae.py training checkpoint"],
        **{path: [words] for path, words in not_checkpoints(tmp_path / "given").values()},
    }
    cases[tmp_path / "given" / "folder"] = ["a folder, not a checkpoint file", "--resume takes a checkpoint file"]
    cases[tmp_path / "given" / "diffusers"] = ["a folder, not a checkpoint file"]
    for path, words in cases.items():
        out = tmp_path / f"run-{path.name}"
        status, err, message = cli(cdgmae.main, train_argv(bags, out, "--resume", path), capsys)
        assert status == 1 and "Traceback" not in err and message.startswith(f"{path}: "), (path, message)
        assert_one_line_naming(message, *words)
        assert not out.exists()  # refused before the output folder is made


@pytest.mark.parametrize("flags,difference", [(["--embed-dim", "64", "--num-heads", "2"], "--embed-dim: 32 -> 64"),
                                              (["--decoder-block", "croco"], "--decoder-block: cdgmae -> croco")])
def test_resume_refuses_a_checkpoint_of_another_width_or_decoder(tmp_path, capsys, finished_run, flags, difference):
    bags, last = finished_run
    status, err, message = cli(cdgmae.main, train_argv(bags, tmp_path / "run", "--resume", last, *flags), capsys)
    assert status == 1 and message.startswith(f"{last}: ") and not (tmp_path / "run").exists()
    assert_one_line_naming(message, difference)
