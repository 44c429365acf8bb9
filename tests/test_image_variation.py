"""The public view generator (generate_views.py --backend sd-image-variation): diffusers'
StableDiffusionImageVariationPipeline, built tiny and random here, saved to a local folder and run
through the same command line as the S-LDM backend (layout, resumability, shards, seeds, guidance,
steps, and the one-line errors for a missing piece)."""
import functools
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common  # noqa: E402
import cdgmae  # noqa: E402
import generate_views as gv  # noqa: E402
from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionImageVariationPipeline,  # noqa: E402
                       UNet2DConditionModel)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

VIEWS = 2
STEPS = 2
VIEW_SIZE = 16   # UNet latents 8x8, the VAE's two levels upsample by 2


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one thread is as fast as two and does not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pipeline():
    """CLIP vision tower (32x32 input, 32-d projection = the UNet's context width), 8x8x4 latents,
    a two-level KL autoencoder, and the scheduler the Lambda Labs weights ship (PNDM, SD's schedule)."""
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        latent_channels=4, sample_size=VIEW_SIZE)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionImageVariationPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                                 safety_checker=None, feature_extractor=processor,
                                                 requires_safety_checker=False)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgvar") / "pipeline"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three images in two folders, two formats and two aspect ratios."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for rel, (h, w) in {"cat/a.jpg": (40, 48), "cat/b.png": (48, 40), "dog/c.jpg": (36, 36)}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel)
    return root


def generate(images, folder, output, *flags):
    """The command line of the S-LDM backend with --backend sd-image-variation."""
    return gv.main(["--images", str(images), "--model", str(folder), "--output", str(output),
                    "--backend", "sd-image-variation", "--views", str(VIEWS), "--steps", str(STEPS),
                    "--batch-size", "1", "--workers", "0", "--device", "cpu", "--no-progress", *map(str, flags)])


def tree_bytes(root):
    """{relative path: sha256} of every bag file under root (not the run's generation.json record)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.parent != Path(root)}


def exit_message(argv):
    """The message of main's SystemExit; it must be one line (no traceback, nothing after it)."""
    with pytest.raises(SystemExit) as exit_info:
        gv.main(argv)
    message = str(exit_info.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def whole(tmp_path_factory, images, pipeline_folder):
    """One run over the three images: (output folder, summary)."""
    output = tmp_path_factory.mktemp("whole") / "bags"
    return output, generate(images, pipeline_folder, output)


# -----------------------------------------------------------------------------
# Bags: layout, resumability, shards, seeds
# -----------------------------------------------------------------------------

def test_the_command_line_writes_complete_bags_of_m_views(images, whole):
    output, summary = whole
    assert (summary["generated"], summary["complete_before"], summary["unreadable"]) == (3, 0, [])
    assert common.find_bags(output) == ["cat/a", "cat/b", "dog/c"]
    assert common.check_bags(output, common.find_bags(output), num_views=VIEWS, min_views=VIEWS + 1) == {}
    for rel in ("cat/a.jpg", "cat/b.png", "dog/c.jpg"):
        bag = output / Path(rel).parent / Path(rel).stem
        assert sorted(p.name for p in bag.iterdir()) == ["real" + Path(rel).suffix, "view_00.jpg", "view_01.jpg"]
        assert (bag / ("real" + Path(rel).suffix)).read_bytes() == (images / rel).read_bytes()
        for k in range(VIEWS):
            with Image.open(bag / f"view_{k:02d}.jpg") as view:
                assert (view.format, view.mode, view.size) == ("JPEG", "RGB", (VIEW_SIZE, VIEW_SIZE))


def test_a_rerun_generates_nothing_and_leaves_every_byte(images, pipeline_folder, whole):
    output, _ = whole
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in output.rglob("*") if p.is_file()}
    summary = generate(images, pipeline_folder, output)
    assert (summary["complete_before"], summary["generated"], summary["unet_calls"]) == (3, 0, 0)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in output.rglob("*") if p.is_file()} == before


def test_two_shards_split_the_images_disjointly_and_write_what_one_run_writes(tmp_path, images, pipeline_folder,
                                                                               whole):
    first = generate(images, pipeline_folder, tmp_path / "first", "--shard", "0/2")
    assert common.find_bags(tmp_path / "first") == ["cat/a", "dog/c"]  # round-robin over the sorted list
    second = generate(images, pipeline_folder, tmp_path / "sharded", "--shard", "1/2")
    assert common.find_bags(tmp_path / "sharded") == ["cat/b"]
    generate(images, pipeline_folder, tmp_path / "sharded", "--shard", "0/2")
    assert (first["generated"], second["generated"]) == (2, 1)
    assert tree_bytes(tmp_path / "sharded") == tree_bytes(whole[0])


def decoded_views(backend, images, output, batch_size, num_views, seed=0):
    """{(image path, view index): the decoded view [3, H, W] before its rounding to 8 bits} of one
    generate_bags run over the three images (the pipeline's postprocess rounds it)."""
    decoded, postprocess = [], backend.pipe.image_processor.postprocess

    def recording_postprocess(image, **kwargs):  # image [B * M, 3, H, W] in [-1, 1], image-major
        decoded.append(image)
        return postprocess(image, **kwargs)

    backend.pipe.image_processor.postprocess = recording_postprocess
    paths = gv.list_images(images)
    gv.generate_bags(backend, images, paths, output, num_views, batch_size=batch_size, seed=seed, workers=0,
                     progress=False)
    backend.pipe.image_processor.postprocess = postprocess
    return dict(zip([(p, k) for p in paths for k in range(num_views)], torch.cat(decoded)))


@pytest.mark.float_kernels
def test_a_view_depends_only_on_seed_image_path_and_view_index(tmp_path, images, pipeline_folder, whole):
    # Exact in exact arithmetic; in floats another batch shape sums in another order. So the pipeline
    # runs in float64 and the views are compared before their rounding to 8 bits (after it, a value
    # next to a rounding boundary could land on either side, and the JPEG would spread that change).
    backend = gv.ImageVariationBackend(pipeline_folder, "cpu", torch.float64, steps=STEPS, guidance=6.0)
    reference = decoded_views(backend, images, tmp_path / "reference", batch_size=1, num_views=VIEWS)
    batched = decoded_views(backend, images, tmp_path / "batched", batch_size=3, num_views=VIEWS)
    one_view = decoded_views(backend, images, tmp_path / "one_view", batch_size=1, num_views=1)
    seed1 = decoded_views(backend, images, tmp_path / "seed1", batch_size=1, num_views=VIEWS, seed=1)
    # float64 roundoff: each layer's sums of K terms differ by <= K eps max|term| (eps = 1.1e-16), 5e8 times
    # below float32's, whose views differ by a few 1e-6 here; through the network and 2 steps that stays far
    # below 1e-9, while a view that depended on its batch or on M would move by about 1 (as views do).
    for key, view in reference.items():
        torch.testing.assert_close(batched[key], view, rtol=0, atol=1e-9)       # other batches
        if key[1] == 0:
            torch.testing.assert_close(one_view[key], view, rtol=0, atol=1e-9)  # view 0 does not depend on M
        assert (seed1[key] - view).abs().max() > 0.1                             # another seed, another view
    views = list(reference.values())
    assert all((a - b).abs().max() > 0.1 for i, a in enumerate(views) for b in views[i + 1:])  # all differ
    # the float32 command line's views: every view of every image differs
    files = tree_bytes(whole[0])
    assert len({files[k] for k in files if "/view_" in k}) == len(reference)


# -----------------------------------------------------------------------------
# Sampling: scheduler, steps, guidance as the pipeline defines it
# -----------------------------------------------------------------------------

@pytest.mark.float_kernels
def test_sampling_is_ddim_without_clipping_on_the_models_schedule_for_the_asked_steps(tmp_path, images,
                                                                                      pipeline_folder):
    backend = gv.ImageVariationBackend(pipeline_folder, "cpu", torch.float32, steps=3, guidance=6.0)
    scheduler = backend.pipe.scheduler
    assert isinstance(scheduler, DDIMScheduler) and not scheduler.config.clip_sample  # the folder holds PNDM
    scheduler.set_timesteps(3)
    assert scheduler.timesteps.tolist() == [667, 334, 1]  # CompVis: range(0, 1000, 333) + 1, reversed
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # SD's "scaled_linear", from the folder
    # float32 products of up to 1000 factors: <= 1000 eps = 6e-5 relative
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-4)
    summary = gv.generate_bags(backend, images, gv.list_images(images), tmp_path / "bags", VIEWS, batch_size=2,
                               workers=0, progress=False)
    assert summary["unet_calls"] == 3 * 2  # 3 steps for each of the batches of 2 and 1 images


def record_guidance(backend):
    """Hooks that record each UNet call's context and output and the noise the scheduler is given."""
    calls, steps = [], []
    backend.pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((kwargs["encoder_hidden_states"], out.sample)), with_kwargs=True)
    step = backend.pipe.scheduler.step

    @functools.wraps(step)  # the pipeline reads step's signature to pass eta
    def recording_step(eps, *args, **kwargs):
        steps.append(eps)
        return step(eps, *args, **kwargs)

    backend.pipe.scheduler.step = recording_step
    return calls, steps


@pytest.mark.float_kernels
@pytest.mark.parametrize("guidance", [gv.GUIDANCE_DEFAULT["sd-image-variation"], 1.0])
def test_guidance_is_the_pipelines_zero_embedding_rule(tmp_path, images, pipeline_folder, guidance):
    """diffusers' convention, which the pipeline's code defines: guidance_scale s gives
    eps_u + s (eps_c - eps_u) for s > 1 (the default s = 7 is the paper's w = 6 in Ho & Salimans'
    (1 + w) eps_c - w eps_u) and the conditional prediction alone for s = 1."""
    backend = gv.ImageVariationBackend(pipeline_folder, "cpu", torch.float32, steps=STEPS, guidance=guidance)
    calls, steps = record_guidance(backend)
    gv.generate_bags(backend, images, ["cat/a.jpg"], tmp_path / "bags", VIEWS, workers=0, progress=False)
    with Image.open(images / "cat/a.jpg") as img:
        pixels = backend.pipe.feature_extractor(images=img.convert("RGB"), return_tensors="pt").pixel_values
    embedding = backend.pipe.image_encoder(pixels).image_embeds        # [1, 32]: the CLIP image embedding
    assert len(calls) == len(steps) == STEPS
    for (context, eps), guided in zip(calls, steps):
        if guidance > 1:  # one call, unconditional branch first with a zero context
            assert context.shape == (2 * VIEWS, 1, 32)
            torch.testing.assert_close(context[:VIEWS], torch.zeros(VIEWS, 1, 32))
            torch.testing.assert_close(context[VIEWS:], embedding.expand(VIEWS, 1, 32))
            eps_uncond, eps_cond = eps[:VIEWS], eps[VIEWS:]
            # three float32 operations (difference, product, sum), each within u of the magnitudes it carries
            u = torch.finfo(torch.float32).eps / 2
            bound = 3 * u * (eps_uncond.abs() + guidance * (eps_cond.abs() + eps_uncond.abs()))
            assert ((guided - (eps_uncond + guidance * (eps_cond - eps_uncond))).abs() <= bound).all()
            assert ((guided - ((1 + guidance) * eps_cond - guidance * eps_uncond)).abs() > bound).any()
        else:  # w = 1: the conditional prediction alone, half the UNet batch
            torch.testing.assert_close(context, embedding.expand(VIEWS, 1, 32))
            torch.testing.assert_close(guided, eps)


def test_guidance_below_one_is_refused_before_loading(tmp_path, images, pipeline_folder):
    message = exit_message(["--images", str(images), "--model", str(pipeline_folder), "--output", str(tmp_path / "o"),
                            "--backend", "sd-image-variation", "--guidance", "0.5"])
    assert "--guidance 0.5" in message
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# Missing pieces: one line naming the folder and what to do
# -----------------------------------------------------------------------------

def test_a_folder_without_its_image_encoder_is_refused_in_one_line(tmp_path, images, pipeline_folder):
    broken = tmp_path / "broken"
    tiny_pipeline().save_pretrained(broken)
    for f in (broken / "image_encoder").iterdir():
        f.unlink()
    (broken / "image_encoder").rmdir()
    for model in (broken, images):  # no image_encoder/; not a pipeline folder at all
        message = exit_message(["--images", str(images), "--model", str(model), "--output", str(tmp_path / "o"),
                                "--backend", "sd-image-variation"])
        assert message.startswith(f"{model}: ") and "image_encoder/config.json" in message
        assert "download" in message
    assert not (tmp_path / "o").exists()


def test_a_folder_of_another_pipeline_is_refused_in_one_line(tmp_path, images, pipeline_folder):
    other = tmp_path / "other"
    shutil.copytree(pipeline_folder, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    message = exit_message(["--images", str(images), "--model", str(other), "--output", str(tmp_path / "o"),
                            "--backend", "sd-image-variation"])
    assert message.startswith(f"{other}/model_index.json: a StableDiffusionPipeline, not a ")
    (other / "model_index.json").write_text("{not json")
    message = exit_message(["--images", str(images), "--model", str(other), "--output", str(tmp_path / "o"),
                            "--backend", "sd-image-variation"])
    assert message.startswith(f"{other}/model_index.json: not JSON")
    assert not (tmp_path / "o").exists()


def test_without_transformers_the_command_says_how_to_install_it(tmp_path, images, pipeline_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # find_spec and import now see no transformers
    message = exit_message(["--images", str(images), "--model", str(pipeline_folder), "--output",
                            str(tmp_path / "o"), "--backend", "sd-image-variation"])
    assert message.startswith(f"{pipeline_folder}: ") and "transformers" in message
    assert "pip install -r requirements.txt" in message
    assert not (tmp_path / "o").exists()


def test_views_the_safety_checker_blacks_out_are_counted_and_reported(tmp_path, images, pipeline_folder, capsys):
    backend = gv.ImageVariationBackend(pipeline_folder, "cpu", torch.float32, steps=1, guidance=6.0)
    # A folder that ships a safety checker (the Lambda Labs one does) flags views; here the first of each image.
    backend.pipe.run_safety_checker = lambda image, device, dtype: (image, [k % VIEWS == 0 for k in range(len(image))])
    gv.generate_bags(backend, images, gv.list_images(images), tmp_path / "bags", VIEWS, batch_size=2, workers=0,
                     progress=False)
    assert backend.flagged_views == 3
    assert "safety checker blacked out 2 of 4 views" in capsys.readouterr().err
