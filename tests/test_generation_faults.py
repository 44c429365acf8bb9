"""Faults of generate_views.py and metrics.py, one test per class of fault: every expected failure
ends with a non-zero exit status and one line `path: what is wrong (what to do)` naming the file
or flag, no traceback, and nothing already written is changed; a bad input image is skipped,
a full disk is resumed, and two processes on one output both finish with the bags of one run."""
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import common
import cdgmae
import generate_views as gv
import metrics
from test_generate_views import compvis_checkpoint, tiny_sldm, tiny_sldm_folder, tree_bytes, write_images  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ["--views", "2", "--steps", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu",
            "--no-progress"]


def cli(main, argv, capsys):
    """(exit status, stderr, the error line or None) of main(argv), as the shell would see them:
    SystemExit("message") prints the message and exits 1."""
    try:
        main([str(a) for a in argv])
        status, message = 0, None
    except SystemExit as e:
        status, message = (1, e.code) if isinstance(e.code, str) else (e.code, None)
    err = capsys.readouterr().err
    if message is None and status:  # argparse printed usage + one error line
        message = err.strip().splitlines()[-1]
    return status, err + (message or ""), message


def assert_one_line_naming(message, *names):
    assert message is not None and "\n" not in message and "Traceback" not in message
    for name in names:
        assert str(name) in message, (name, message)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_sldm_folder(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def made(tmp_path_factory, model):
    """Images and a finished output of the tiny model with GENERATE settings (not to be modified)."""
    root = tmp_path_factory.mktemp("made")
    write_images(root / "images")
    gv.main(["--images", str(root / "images"), "--model", str(model), "--output", str(root / "bags"), *GENERATE])
    return root


# -----------------------------------------------------------------------------
# Flags
# -----------------------------------------------------------------------------

GENERATE_FLAGS = [("--steps", "-5"), ("--steps", "0"), ("--guidance", "-1.5"), ("--guidance", "nan"),
                  ("--views", "0"), ("--views", "101"), ("--jpeg-quality", "0"), ("--jpeg-quality", "500"),
                  ("--batch-size", "0"), ("--workers", "-1"), ("--shard", "2/2"), ("--shard", "x")]
METRICS_FLAGS = [("--num-pairs", "0"), ("--knn", "0"), ("--knn-pool", "1"), ("--frame-gap", "0"),
                 ("--input-size", "0"), ("--batch-size", "0"), ("--workers", "-1"), ("--seed", "-1")]


@pytest.mark.parametrize("script,flag,value", [("generate", *f) for f in GENERATE_FLAGS]
                         + [("convert", "--cond-image-size", "0")] + [("metrics", *f) for f in METRICS_FLAGS])
def test_a_flag_out_of_its_range_is_one_argparse_error_naming_it(tmp_path, capsys, script, flag, value):
    out = tmp_path / "out"
    if script == "generate":
        main, argv = gv.main, ["--images", tmp_path, "--model", tmp_path, "--output", out, flag, value]
    elif script == "convert":
        main, argv = gv.main, ["convert", "--ldm-checkpoint", "x", "--ldm-config", "x", "--dino", "x",
                               "--output", out, flag, value]
    else:
        main, argv = metrics.main, ["--checkpoint", "x", "--images", tmp_path, "--csv", out, flag, value]
    status, err, message = cli(main, argv, capsys)
    assert status == 2 and "Traceback" not in err
    assert_one_line_naming(message, f"argument {flag}", value)
    assert not out.exists()


def test_a_flag_that_depends_on_the_model_is_checked_once_the_model_is_known(tmp_path, capsys, made, model):
    # the tiny model's scheduler was trained with 1000 timesteps; the tiny ViT has 8-pixel patches
    out = tmp_path / "bags"
    status, err, message = cli(gv.main, ["--images", made / "images", "--model", model, "--output", out,
                                         *GENERATE, "--steps", "1001"], capsys)
    assert status == 1 and "Traceback" not in err
    assert_one_line_naming(message, "--steps 1001", "1000")
    assert not out.exists()  # refused before the output was created

    torch.save({"model": tiny_sldm().conditioner.vit.state_dict()}, tmp_path / "vit.pth")
    status, err, message = cli(metrics.main, ["--checkpoint", tmp_path / "vit.pth", "--images", made / "images",
                                              "--input-size", "30", "--csv", tmp_path / "t.csv"], capsys)
    assert status == 1 and "Traceback" not in err
    assert_one_line_naming(message, "--input-size 30", "patch size 8", tmp_path / "vit.pth")
    assert not (tmp_path / "t.csv").exists()


# -----------------------------------------------------------------------------
# Settings of an output folder
# -----------------------------------------------------------------------------

def test_adding_bags_made_with_other_settings_is_refused_and_the_bags_stay(tmp_path, capsys, made, model):
    bags = tmp_path / "bags"
    shutil.copytree(made / "bags", bags)
    before = tree_bytes(bags)
    other_model = tmp_path / "other-model"
    gv.save_sldm(other_model, tiny_sldm(seed=5))
    args = ["--images", made / "images", "--output", bags, *GENERATE]
    for change, key in [(["--seed", "1"], "seed"), (["--guidance", "3"], "guidance"), (["--steps", "2"], "steps"),
                        (["--views", "3"], "views"), (["--jpeg-quality", "80"], "jpeg_quality"),
                        (["--precision", "bf16"], "precision")]:
        status, err, message = cli(gv.main, [*args, "--model", model, *change], capsys)
        assert status == 1 and "Traceback" not in err
        assert_one_line_naming(message, bags / gv.RECORD_NAME, key, "--output")
        assert tree_bytes(bags) == before
    status, err, message = cli(gv.main, [*args, "--model", other_model], capsys)
    assert status == 1
    assert_one_line_naming(message, "model_sha256")
    assert tree_bytes(bags) == before

    # the same settings resume (nothing to do), also from a copy of the model at another path
    shutil.copytree(model, tmp_path / "moved-model")
    summary = gv.main([str(a) for a in [*args, "--model", tmp_path / "moved-model"]])
    assert (summary["complete_before"], summary["generated"]) == (3, 0)
    assert tree_bytes(bags) == before


def test_bags_made_in_another_guidance_convention_are_refused_with_the_convention_named(tmp_path, capsys, made,
                                                                                       model):
    """A record without guidance_convention is from before the S-LDM's --guidance became Ho & Salimans'
    w, when --guidance g meant eps_u + g (eps_c - eps_u): same number, other views."""
    bags = tmp_path / "bags"
    shutil.copytree(made / "bags", bags)
    record = json.loads((bags / gv.RECORD_NAME).read_text())
    assert record["guidance_convention"] == "(1 + w) eps_c - w eps_u" and record["guidance"] == 6.0
    for recorded in [None, "eps_u + s (eps_c - eps_u), eps_c alone for s <= 1"]:
        old = {k: v for k, v in record.items() if k != "guidance_convention"}
        if recorded is not None:
            old["guidance_convention"] = recorded
        (bags / gv.RECORD_NAME).write_text(json.dumps(old))
        before = tree_bytes(bags)
        status, err, message = cli(gv.main, ["--images", made / "images", "--model", model, "--output", bags,
                                             *GENERATE], capsys)
        assert status == 1 and "Traceback" not in err
        assert_one_line_naming(message, bags / gv.RECORD_NAME, "guidance_convention",
                               "not recorded" if recorded is None else recorded, "(1 + w) eps_c - w eps_u")
        assert "guidance 6.0" not in message  # the number is the same; only its meaning differs
        assert "--guidance g - 1" in message  # how the old number reads in the new convention
        assert tree_bytes(bags) == before


def test_an_output_of_unknown_settings_is_refused(tmp_path, capsys, made, model):
    cases = {}
    cases["no record"] = tmp_path / "no-record"       # bags of an older run, or of another tool
    shutil.copytree(made / "bags", cases["no record"])
    (cases["no record"] / gv.RECORD_NAME).unlink()
    cases["broken record"] = tmp_path / "broken"
    shutil.copytree(made / "bags", cases["broken record"])
    (cases["broken record"] / gv.RECORD_NAME).write_text('{"views": 2')
    cases["a file"] = tmp_path / "file"
    cases["a file"].write_text("not a folder")
    for what, out in cases.items():
        before = tree_bytes(out) if out.is_dir() else out.read_bytes()
        status, err, message = cli(gv.main, ["--images", made / "images", "--model", model, "--output", out,
                                             *GENERATE], capsys)
        assert status == 1 and "Traceback" not in err, what
        assert_one_line_naming(message, out)
        assert (tree_bytes(out) if out.is_dir() else out.read_bytes()) == before, what


def claim(output, settings):
    try:
        gv.claim_output(output, settings)
    except ValueError:
        os._exit(1)
    os._exit(0)


def test_processes_starting_at_once_on_a_fresh_output_agree_on_one_record(tmp_path):
    settings = [{"seed": 0, "steps": 50}, {"seed": 1, "steps": 50}]
    context = multiprocessing.get_context("fork")
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        procs = [context.Process(target=claim, args=(out, settings[i % 2])) for i in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        winner = json.loads((out / gv.RECORD_NAME).read_text())
        assert winner in settings
        # exactly the processes with the recorded settings go on; no temporary is left
        assert [p.exitcode for p in procs] == [0 if settings[i % 2] == winner else 1 for i in range(8)]
        assert os.listdir(out) == [gv.RECORD_NAME]


# -----------------------------------------------------------------------------
# Model folders
# -----------------------------------------------------------------------------

def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


SD_INDEX = '{"_class_name": "StableDiffusionImageVariationPipeline", "unet": ["diffusers", "UNet2DConditionModel"], ' \
           '"image_encoder": ["transformers", "CLIPVisionModelWithProjection"], "safety_checker": [null, null]}'
MODEL_FAULTS = {  # fault: (damage, what the message must name, --backend)
    "no folder": (lambda m: shutil.rmtree(m), "", "sldm"),
    "no unet": (lambda m: shutil.rmtree(m / "unet"), "unet/config.json", "sldm"),
    "no vae": (lambda m: shutil.rmtree(m / "vae"), "vae/config.json", "sldm"),
    "no scheduler": (lambda m: shutil.rmtree(m / "scheduler"), "scheduler/scheduler_config.json", "sldm"),
    "no conditioner": (lambda m: (m / "conditioner" / "projection.pth").unlink(), "conditioner/projection.pth",
                       "sldm"),
    "truncated unet weights": (lambda m: truncate(m / "unet" / "diffusion_pytorch_model.safetensors"), "unet", "sldm"),
    "broken vae config": (lambda m: (m / "vae" / "config.json").write_text("{"), "vae", "sldm"),
    "broken sldm.json": (lambda m: (m / "sldm.json").write_text("[1, 2"), "sldm.json", "sldm"),
    "truncated vit": (lambda m: truncate(m / "conditioner" / "vit.pth"), "conditioner/vit.pth", "sldm"),
    "truncated projection": (lambda m: truncate(m / "conditioner" / "projection.pth"), "projection.pth", "sldm"),
    "no pipeline index": (lambda m: None, "model_index.json", "sd-image-variation"),
    "pipeline piece missing": (lambda m: (m / "model_index.json").write_text(SD_INDEX), "image_encoder",
                               "sd-image-variation"),
}


@pytest.mark.parametrize("fault", MODEL_FAULTS)
def test_a_missing_or_broken_model_piece_is_one_line_naming_it(tmp_path, capsys, made, model, fault):
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    damage, piece, backend = MODEL_FAULTS[fault]
    damage(broken)
    out = tmp_path / "bags"
    status, err, message = cli(gv.main, ["--images", made / "images", "--model", broken, "--output", out, *GENERATE,
                                         "--backend", backend], capsys)
    assert status == 1 and "Traceback" not in err
    assert_one_line_naming(message, broken, piece)
    assert not out.exists()  # no record of a model that does not load


# -----------------------------------------------------------------------------
# Inputs and outputs of generation
# -----------------------------------------------------------------------------

def test_bad_inputs_and_outputs_stop_before_any_work_with_the_path(tmp_path, capsys, made, model):
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (tmp_path / "missing.txt").write_text("n01/a.JPEG\nn01/nope.jpg\n")
    (tmp_path / "a-file").write_text("x")
    images = made / "images"
    cases = [  # (--images, --file-list, --output, extra, what the message must name)
        (tmp_path / "nowhere", None, tmp_path / "o1", [], tmp_path / "nowhere"),
        (tmp_path / "empty", None, tmp_path / "o2", [], tmp_path / "empty"),
        (images, tmp_path / "no-list.txt", tmp_path / "o3", [], tmp_path / "no-list.txt"),
        (images, tmp_path / "binary.txt", tmp_path / "o4", [], tmp_path / "binary.txt"),
        (images, tmp_path, tmp_path / "o5", [], tmp_path),                            # a folder as the list
        (images, tmp_path / "missing.txt", tmp_path / "o6", [], "nope.jpg"),
        (images, None, images / "bags", [], "--images"),                              # output inside the input
        (images, None, tmp_path / "a-file" / "bags", [], tmp_path / "a-file"),         # output under a file
        (images, None, tmp_path / "o9", ["--device", "gpu7"], "--device gpu7"),
    ]
    for image_root, file_list, out, extra, name in cases:
        argv = ["--images", image_root, "--model", model, "--output", out, *GENERATE, *extra]
        status, err, message = cli(gv.main, argv + (["--file-list", file_list] if file_list else []), capsys)
        assert status == 1 and "Traceback" not in err, name
        assert_one_line_naming(message, name)
        assert not out.exists()
    assert tree_bytes(images) == tree_bytes(made / "images")


def damaged_images(root):
    """Unreadable inputs beside the good ones: empty, truncated JPEG and PNG, not an image at all."""
    jpeg = (root / "n01" / "a.JPEG").read_bytes()
    png = (root / "n02" / "sub" / "c.png").read_bytes()
    bad = {"n01/empty.jpg": b"", "n01/truncated.jpg": jpeg[: len(jpeg) // 2],
           "n02/truncated.png": png[: len(png) // 2], "n02/text.png": b"hello, not a png\n"}
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    return sorted(bad)


def test_unreadable_images_are_skipped_listed_and_do_not_change_the_other_bags(tmp_path, capsys, made, model):
    shutil.copytree(made / "images", tmp_path / "images")
    bad = damaged_images(tmp_path / "images")
    argv = ["--images", tmp_path / "images", "--model", model, "--output", tmp_path / "bags", *GENERATE]
    status, err, _ = cli(gv.main, argv, capsys)
    assert status == 0 and "Traceback" not in err
    assert all(rel in err for rel in bad)  # each logged when skipped
    report = tmp_path / "bags" / "unreadable-shard000-of-001.txt"
    assert [line.split("\t")[0] for line in report.read_text().splitlines()] == bad
    written = tree_bytes(tmp_path / "bags")
    del written[report.name]
    assert written == tree_bytes(made / "bags")  # the good images' bags, byte for byte those of a clean run
    assert common.find_bags(tmp_path / "bags") == ["n01/a", "n01/b", "n02/sub/c"]


def test_a_full_disk_stops_with_one_line_and_a_rerun_completes_the_same_bags(tmp_path, capsys, made, model):
    # The second bag's first view is written through a temporary name that leads to /dev/full (ENOSPC).
    bag = tmp_path / "bags" / "n01" / "b"
    bag.mkdir(parents=True)
    shutil.copy(made / "bags" / gv.RECORD_NAME, tmp_path / "bags")  # the settings of this run
    os.symlink("/dev/full", common.temporary_path(bag / "view_00.jpg"))
    argv = ["--images", made / "images", "--model", model, "--output", tmp_path / "bags", *GENERATE,
            "--batch-size", "1"]
    status, err, message = cli(gv.main, argv, capsys)
    assert status == 1 and "Traceback" not in err
    assert_one_line_naming(message, tmp_path / "bags", "No space left on device")
    assert common.find_bags(tmp_path / "bags") == ["n01/a"]
    assert os.listdir(bag) == []  # no partial file under a final or a temporary name

    status, err, _ = cli(gv.main, argv, capsys)  # space is back: the run resumes
    assert status == 0
    # byte for byte a clean run's bags, at the same batch size (another batch shape sums in another order)
    cli(gv.main, [*argv[:5], tmp_path / "clean", *argv[6:]], capsys)
    assert tree_bytes(tmp_path / "bags") == tree_bytes(tmp_path / "clean")


def test_two_processes_on_one_output_both_finish_with_the_bags_of_one_run(tmp_path, made, model):
    shutil.copytree(made / "images", tmp_path / "images")
    rng = np.random.default_rng(1)
    for i in range(9):  # 12 images, so that the two runs overlap while writing
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "images" / f"x{i}.png")
    # 8 steps, one image per batch: each run writes for a few seconds, so the two runs' writes interleave
    argv = ["--images", str(tmp_path / "images"), "--model", str(model), *GENERATE, "--steps", "8", "--batch-size", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses: the thread count may change float sums, hence rounding
    try:
        gv.main(argv + ["--output", str(tmp_path / "one-run")])
    finally:
        torch.set_num_threads(threads)
    command = [sys.executable, "generate_views.py", *argv, "--output", str(tmp_path / "bags")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    print(*[e.strip().splitlines()[-1] for e in errs], sep="\n")  # how many bags each run wrote
    assert [p.returncode for p in procs] == [0, 0], errs
    assert all("Traceback" not in e for e in errs)
    # every bag complete, no temporary left, each file byte for byte that of one run
    assert tree_bytes(tmp_path / "bags") == tree_bytes(tmp_path / "one-run")


def test_convert_refuses_an_existing_folder_and_unreadable_inputs(tmp_path, capsys, model):
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    unet_config: {}\n")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00not a checkpoint")
    before = tree_bytes(model)
    cases = [  # (checkpoint, config, output, what the message must name)
        (tmp_path / "garbage.ckpt", tmp_path / "model.yaml", model, model),             # would overwrite a model
        (tmp_path / "garbage.ckpt", tmp_path / "missing.yaml", tmp_path / "o1", tmp_path / "missing.yaml"),
        (tmp_path / "garbage.ckpt", tmp_path / "bad.yaml", tmp_path / "o2", tmp_path / "bad.yaml"),
        (tmp_path / "garbage.ckpt", tmp_path / "model.yaml", tmp_path / "o3", tmp_path / "garbage.ckpt"),
        (tmp_path / "missing.ckpt", tmp_path / "model.yaml", tmp_path / "o4", tmp_path / "missing.ckpt"),
    ]
    for checkpoint, config, out, name in cases:
        status, err, message = cli(gv.main, ["convert", "--ldm-checkpoint", checkpoint, "--ldm-config", config,
                                             "--dino", tmp_path / "dino.pth", "--output", out], capsys)
        assert status == 1 and "Traceback" not in err, name
        assert_one_line_naming(message, name)
        assert out == model or not out.exists()
    assert tree_bytes(model) == before


# CompVis options that the conversion does not map, each set in the yaml of compvis_checkpoint:
# (the entry under model.params, its value, what the message must say)
UNCONVERTED_OPTIONS = [
    ("conditioning_key", "concat", "conditioning_key 'concat' is not supported, only 'crossattn'"),
    ("unet_config.params.use_spatial_transformer", False, "no cross-attention to one context"),
    ("unet_config.params.resblock_updown", True, "resblock_updown: True is not supported, only False"),
    ("unet_config.params.num_classes", 1000, "num_classes: 1000 is not supported, only None"),
    ("unet_config.params.num_res_blocks", [1, 1], "per-level num_res_blocks [1, 1] is not supported"),
    ("unet_config.params.transformer_depth", [1, 2], "per-level transformer_depth [1, 2] is not supported"),
    ("unet_config.params.num_head_channels", -1, "neither num_heads nor num_head_channels"),
    ("first_stage_config.params.ddconfig.attn_resolutions", [8], "attn_resolutions: [8] is not supported"),
    ("first_stage_config.params.ddconfig.double_z", True, "a VQ first stage with double_z True"),
    ("first_stage_config.target", "ldm.models.autoencoder.AutoencoderKL", "a KL first stage needs double_z True"),
    ("first_stage_config.target", "taming.models.vqgan.GumbelVQ", "first stage taming.models.vqgan.GumbelVQ is "
                                                                  "not supported"),
    ("beta_schedule", "cosine", "beta_schedule 'cosine' is not supported"),
    ("parameterization", "score", "parameterization 'score' is not one of ['eps', 'v', 'x0']"),
]


@pytest.mark.parametrize("entry, value, words", UNCONVERTED_OPTIONS,
                         ids=[f"{e}={v}" for e, v, _ in UNCONVERTED_OPTIONS])
def test_convert_refuses_the_options_it_does_not_map_naming_the_yaml(tmp_path, capsys, compvis_checkpoint, entry,
                                                                    value, words):
    root = compvis_checkpoint["folder"].parent
    config = yaml.safe_load((root / "model.yaml").read_text())
    *path, last = entry.split(".")
    section = config["model"]["params"]
    for name in path:
        section = section[name]
    section[last] = value
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(config))
    status, err, message = cli(gv.main, ["convert", "--ldm-checkpoint", root / "model.ckpt", "--ldm-config",
                                         tmp_path / "other.yaml", "--dino", root / "dino.pth", "--output",
                                         tmp_path / "sldm", "--cond-image-size", "32"], capsys)
    assert status == 1 and "Traceback" not in err and message.startswith(f"{tmp_path / 'other.yaml'}: ")
    assert_one_line_naming(message, words)
    assert not (tmp_path / "sldm").exists()


# -----------------------------------------------------------------------------
# metrics.py
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def metric_inputs(tmp_path_factory):
    """A ViT checkpoint (32 px, patch 8), bags, a DAVIS-layout video and an image folder."""
    root = tmp_path_factory.mktemp("metrics")
    torch.manual_seed(0)
    vit = cdgmae.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.save({"model": vit.state_dict(), "args": {"num_heads": 2}}, root / "vit.pth")
    rng = np.random.default_rng(0)

    def save(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    for b in range(3):
        save(root / "bags" / f"img{b}" / "real.jpg")
        save(root / "bags" / f"img{b}" / "view_00.jpg")
    for t in range(4):
        save(root / "davis" / "JPEGImages" / "480p" / "seq" / f"{t:05d}.jpg")
    for i in range(6):
        save(root / "images" / f"{i}.png")
    return root


def metrics_argv(root, **change):
    args = {"--checkpoint": root / "vit.pth", "--bags": root / "bags", "--video": root / "davis",
            "--images": root / "images", "--csv": root / "out" / "table.csv", "--frame-gap": 1, "--knn": 2,
            "--num-pairs": 2, "--input-size": 32, "--workers": 0, "--batch-size": 2, "--device": "cpu", **change}
    return [str(x) for k, v in args.items() for x in (k, v)]


def test_metrics_bad_inputs_are_one_line_naming_the_file_and_write_no_csv(tmp_path, capsys, metric_inputs):
    root = tmp_path / "in"
    shutil.copytree(metric_inputs, root)
    (root / "out").mkdir()
    (root / "empty").mkdir()
    (root / "one").mkdir()
    shutil.copy(root / "images" / "0.png", root / "one")
    (root / "garbage.pth").write_bytes(b"\x00\x01 not a checkpoint")
    torch.save({"model": {"weight": torch.zeros(3)}}, root / "not-vit.pth")
    truncated = root / "bags" / "img1" / "view_00.jpg"
    cases = [  # (flag changes, damage, what the message must name)
        ({"--bags": root / "nowhere"}, None, root / "nowhere"),
        ({"--bags": root / "empty"}, None, root / "empty"),
        ({"--video": root / "nowhere"}, None, root / "nowhere"),
        ({"--video": root / "empty"}, None, root / "empty"),
        ({"--images": root / "one"}, None, root / "one"),
        ({"--images": root / "nowhere"}, None, root / "nowhere"),
        ({"--checkpoint": root / "nowhere.pth"}, None, root / "nowhere.pth"),
        ({"--checkpoint": root / "garbage.pth"}, None, root / "garbage.pth"),
        ({"--checkpoint": root / "not-vit.pth"}, None, root / "not-vit.pth"),
        ({"--csv": root / "no-folder" / "t.csv"}, None, root / "no-folder"),
        ({"--device": "gpu7"}, None, "gpu7"),
        ({"--knn": "6"}, None, "--knn 6"),                   # a pool of all 6 images holds no 6 others
        ({}, lambda: truncated.write_bytes(truncated.read_bytes()[:200]), truncated),
        ({}, lambda: (root / "davis" / "JPEGImages" / "480p" / "seq" / "00002.jpg").write_bytes(b""), "00002.jpg"),
    ]
    for change, damage, name in cases:
        if damage:
            damage()
        status, err, message = cli(metrics.main, metrics_argv(root, **change), capsys)
        assert status == 1 and "Traceback" not in err, name
        assert_one_line_naming(message, name)
        assert os.listdir(root / "out") == []


def test_metrics_never_overwrites_a_csv_unless_told_to(tmp_path, capsys, metric_inputs):
    (tmp_path / "out").mkdir()
    csv_path = tmp_path / "out" / "table.csv"
    csv_path.write_text("pairs,num_pairs,gs\nanother run,500,0.9\n")
    status, err, message = cli(metrics.main, metrics_argv(metric_inputs, **{"--csv": csv_path}), capsys)
    assert status == 1 and "Traceback" not in err
    assert_one_line_naming(message, csv_path, "--overwrite")
    assert csv_path.read_text() == "pairs,num_pairs,gs\nanother run,500,0.9\n"
    assert os.listdir(tmp_path / "out") == ["table.csv"]

    rows = metrics.main(metrics_argv(metric_inputs, **{"--csv": csv_path}) + ["--overwrite"])
    assert csv_path.read_text().splitlines()[0].startswith("pairs,num_pairs,gs,gs_std")
    assert len(csv_path.read_text().splitlines()) == 1 + len(rows) == 1 + 4

    # a CSV that appears while the run computes (another run) is kept, not replaced
    with pytest.raises(FileExistsError):
        metrics.write_table(rows, csv_path, overwrite=False)
    assert len(csv_path.read_text().splitlines()) == 5
