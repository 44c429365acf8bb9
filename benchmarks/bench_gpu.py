"""The GPU run: training, generation and propagation measured on one CUDA GPU in at most 8 minutes.

Each stage runs in its own process under its own time cap (a stage that overruns is stopped and
the next one starts) and writes every row as soon as it is measured into OUTPUT/results.json and
OUTPUT/results.md; all that is printed also goes to OUTPUT/console.txt. A run cut short keeps what
it measured. The stages, in order of value (`STAGES` gives each one's cap in seconds):

  peak         a bf16 8192^3 matmul: the device's practical peak, the denominator of the ratios
  model        training steps of a1 and a3 (per-GPU batch 256, bf16 autocast, fused AdamW) on tensors
               already on the GPU: samples/s, training FLOP/s as a fraction of the peak, peak memory
  end_to_end   `torchrun --nproc_per_node 1 cdgmae.py` (a3) on 16,384 synthetic ImageNet-shaped bags
               written here, --decode cpu and gpu: samples/s after warm-up, next to a loader-only
               pass of the same loader, and which side is the bottleneck
  exactness    a run stopped and resumed against an uninterrupted one, and a repeat of that one
  generation   the S-LDM sampler at the paper's size, random weights: images/s at three batch sizes
  propagation  ViT-S/16 and ViT-S/8 on 480x880 frames, random weights: frames/s of the features and
               of the k-NN step (propagate.label_propagation_fast), peak memory
  compiled     the model stage with torch.compile, in the time that is left

--dry-run runs every stage at tiny sizes (tests/test_gpu_benchmark.py, on the CPU). On a CPU,
float32 replaces bf16, AdamW is not fused (as cdgmae.py trains there), --decode gpu is skipped
and torch.compile only traces (backend "eager": Inductor's C++ build takes minutes there).

    bash benchmarks/gpu.sh OUT_DIR            # installs .whl/*.whl (diffusers) first, if present
    python benchmarks/bench_gpu.py OUT_DIR --dry-run
    python benchmarks/bench_gpu.py OUT_DIR --stages generation propagation --cap generation=200
"""
import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import bench_data  # noqa: E402
import bench_propagate  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
import cdgmae  # noqa: E402

BUDGET = 470          # seconds for the whole run (8 minutes with the installation of the wheels)
STAGES = {"peak": 20, "model": 60, "end_to_end": 150, "exactness": 60, "generation": 90, "propagation": 40,
          "compiled": 150}  # each stage's cap; "compiled" gets at most what is left of the budget
MIN_STAGE = 10        # a stage is not started with less of the budget left
STAGE_FAILED = 3      # exit code of a stage process that recorded its own failure
A3 = ["--anchors", "3", "--anchor-mask", "0.25"]
TARGETS = {"a3": "target: >= 4,000 samples/s on one H100/H200 (about 30% of bf16 peak); the paper's 8 A100: "
                 "about 317 per GPU (100 epochs in 14 h)"}
PAPER_GENERATION = "the paper: about 0.93 images/s per A100 (48 h on 8 A100 for 1.28M images)"

TINY_MODEL = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                  decoder_depth=1, decoder_num_heads=2, decoder_ffn_dim=64)
TINY_FLAGS = ["--input-size", "32", "--patch-size", "16", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
              "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--decoder-ffn-dim", "64"]
# The GPU run's sizes, and the dry run's. End to end: one epoch of 64 steps of 256 samples, timed after the
# first 28 (up to 14 workers x 2 prefetched batches, a burst that arrives together), so that the
# workers' steady pace is what is measured.
FULL = dict(matmul=8192, batch=256, steps=30, model={}, model_flags=[], workers=None, bag_processes=None,
            bags=16384, real_size=(500, 375), view_size=256, e2e_steps=64, log_every=4, warmup_steps=28,
            loader_warmup=28, exact_bags=256, exact_batch=64, exact_steps=6, exact_stop=3,
            gen_batches=(4, 16, 32), gen_steps=50, frames=30, frame_size=(480, 880), vit={})
DRY = dict(matmul=256, batch=4, steps=2, model=TINY_MODEL, model_flags=TINY_FLAGS, workers=2, bag_processes=2,
           bags=16, real_size=(80, 60), view_size=40, e2e_steps=4, log_every=1, warmup_steps=1,
           loader_warmup=1, exact_bags=12, exact_batch=4, exact_steps=5, exact_stop=2,
           gen_batches=(1, 2), gen_steps=3, frames=6, frame_size=(64, 96), vit=dict(embed_dim=32, depth=1, num_heads=2))


# -----------------------------------------------------------------------------
# Results: OUTPUT/results.json (the rows) and OUTPUT/results.md (the same, as a table)
# -----------------------------------------------------------------------------

def load_results(output):
    path = Path(output) / "results.json"
    return json.loads(path.read_text()) if path.exists() else {"environment": {}, "plan": {}, "rows": []}


def save_results(output, results):
    """Write results.json and results.md, each atomically (a run killed mid-write leaves the last whole file)."""
    common.atomic_write(Path(output) / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    common.atomic_write(Path(output) / "results.md", lambda tmp: Path(tmp).write_text(markdown(results)))


def record(output, row, say=print):
    """Append one row {stage, case, status, result, note, values} to the results, rewrite both files
    and print it."""
    results = load_results(output)
    results["rows"].append(row)
    save_results(output, results)
    say(f"[{row['stage']}] {row['case']}: {row['status']}" + "".join(f"; {row[k]}" for k in ("result", "note")
                                                                     if row.get(k)))


def markdown(results):
    lines = ["# The GPU run (benchmarks/gpu.sh)", ""]
    lines += [f"- {key}: {value}" for key, value in results["environment"].items()]
    if results["plan"]:
        lines.append("- stage caps (s): " + ", ".join(f"{k} {v}" for k, v in results["plan"].items()))
    lines += ["", "| stage | case | status | result | note |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        cells = [row["stage"], row["case"], row["status"], row.get("result", ""), row.get("note", "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# What a stage's function gets: its sizes, device, folders, time left, and record()
# -----------------------------------------------------------------------------

class Stage:
    def __init__(self, args):
        self.name, self.output, self.scratch = args.stage, Path(args.output), Path(args.scratch)
        self.dry_run = args.dry_run
        self.size = argparse.Namespace(**(DRY if args.dry_run else FULL))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.end = time.monotonic() + args.seconds - 5  # 5 s to write the last row before the hard stop

    def left(self):
        return self.end - time.monotonic()

    def record(self, case, status, result="", note="", **values):
        record(self.output, {"stage": self.name, "case": case, "status": status, "result": result, "note": note,
                             "values": values})

    def attempt(self, case, measure, needs=0):
        """measure() (which records its own row) unless less than `needs` seconds are left; an error
        becomes a 'failed' row and the stage goes on with its next case. Returns measure()'s value."""
        if self.left() < needs:
            self.record(case, "skipped", note=f"needs about {needs:.0f} s, {max(self.left(), 0):.0f} s of the "
                                              f"stage's cap left")
            return None
        try:
            return measure()
        except Exception as e:  # noqa: BLE001 -- recorded, and the next case may still work
            traceback.print_exc()
            self.record(case, "failed", note=f"{type(e).__name__}: {common.one_line(e)[:400]}")
            if self.cuda:
                torch.cuda.empty_cache()
            return None

    def value(self, stage, key, case=None):
        """A value recorded earlier in this run by another stage (in its row `case`, or its first row
        that has `key`), or None."""
        for row in load_results(self.output)["rows"]:
            if row["stage"] == stage and case in (None, row["case"]) and row["values"].get(key) is not None:
                return row["values"][key]
        return None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def memory_start(self):
        """Start measuring peak memory: the GPU's allocated bytes, or on a CPU the process's resident set."""
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return 0.0
        bench_propagate.reset_peak_memory()
        return bench_propagate.memory_mb("VmRSS") or 0.0

    def memory_peak(self, start):
        """GiB at the peak since memory_start (on a CPU: above the resident set at the start)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2 ** 30
        return max(0.0, (bench_propagate.memory_mb("VmHWM") or start) - start) / 1024


def rate_text(flops):
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e11 else f"{flops / 1e9:.1f} GFLOP/s"


# -----------------------------------------------------------------------------
# The stages
# -----------------------------------------------------------------------------

def peak(stage):
    """The practical peak: the best rate of a square matmul, bf16 8192^3 (a dry run on a CPU: float32)."""
    dtype = torch.bfloat16 if stage.cuda else torch.float32
    n = stage.size.matmul
    if stage.cuda:
        props = torch.cuda.get_device_properties(stage.device)
        results = load_results(stage.output)
        results["environment"]["device (torch)"] = (f"{props.name}, compute capability {props.major}.{props.minor}, "
                                                   f"{props.multi_processor_count} SMs, "
                                                   f"{props.total_memory / 2 ** 30:.1f} GiB")
        save_results(stage.output, results)
    rate = bench_train.matmul_rate(stage.device, dtype, sizes=(n,), seconds=0.2 if stage.dry_run else 2.0)
    stage.record(f"{str(dtype).removeprefix('torch.')} matmul {n}^3", "measured", rate_text(rate),
                 "best rate over repeated products, synchronised after each", flops=rate)


def model_step(stage, compiled=False):
    """Full training steps (forward, backward, AdamW) of a1 and a3 on random inputs on the device
    (benchmarks/bench_train.py's step_rate), bf16 autocast and fused AdamW on CUDA."""
    peak_flops = stage.value("peak", "flops")
    backend = "inductor" if stage.cuda else "eager"
    settings = ("a3", "a1") if compiled else ("a1", "a3")  # the compiled stage starts with the setting that matters
    spent = 0.0
    for setting in settings:
        case = f"{setting}, torch.compile ({backend})" if compiled else setting
        start = time.monotonic()
        stage.attempt(case, lambda: one_model_step(stage, setting, compiled, backend, peak_flops),
                      needs=1.2 * spent)  # the second setting is started only if the first one's time is left
        spent = time.monotonic() - start


def one_model_step(stage, setting, compiled, backend, peak_flops):
    size = stage.size
    num_anchors, anchor_mask = bench_train.SETTINGS[setting]
    counts = cdgmae.count_flops(cdgmae.CDGMAE(num_anchors=num_anchors, anchor_mask_ratio=anchor_mask, **size.model))
    flops = bench_train.training_flops(counts)
    memory = stage.memory_start()
    start = time.perf_counter()
    rate = bench_train.step_rate(setting, stage.device, size.batch, size.steps, bf16=stage.cuda,
                                 compile_model=compiled, compile_backend=backend, **size.model)
    warmup = time.perf_counter() - start - size.batch * size.steps / rate  # the 2 warm-up steps (and compiling)
    achieved, fraction = rate * flops, rate * flops / peak_flops if peak_flops else None
    share = f" = {fraction:.0%} of the matmul" if fraction else " (no peak measured)"
    how = "bf16 autocast, fused AdamW" if stage.cuda else "float32, AdamW (not fused, as on a CPU cdgmae.py trains)"
    stage.record(f"{setting}, torch.compile ({backend})" if compiled else setting, "measured",
                 f"{rate:,.0f} samples/s; {rate_text(achieved)}{share}; peak memory "
                 f"{stage.memory_peak(memory):.1f} GiB; warm-up{' and compile' if compiled else ''} {warmup:.1f} s",
                 " ".join([f"batch {size.batch}, {size.steps} timed steps, {how}; {flops / 1e9:.1f} GFLOP per sample.",
                           TARGETS.get(setting, "")]).strip(),
                 samples_per_s=rate, flops_per_sample=flops, fraction_of_peak=fraction, warmup_s=warmup)


def end_to_end(stage):
    """torchrun cdgmae.py (a3) on synthetic bags, --decode cpu and gpu, next to loader-only passes."""
    size = stage.size
    bags = stage.scratch / "bags"
    processes = size.bag_processes or os.cpu_count()
    start = time.monotonic()
    megabytes = write_bags(bags, size.bags, size.real_size, size.view_size, processes)
    stage.record("synthetic bags", "measured",
                 f"{size.bags} bags ({megabytes:.0f} MB) written in {time.monotonic() - start:.1f} s by {processes} "
                 f"processes", f"real {size.real_size[0]}x{size.real_size[1]} JPEG q90 + 4 views {size.view_size}^2 "
                 "q95, photo-like content (bench_data.photo); read back from the page cache")
    workers = size.workers or max(1, min(14, os.cpu_count() - 2))
    model_rate = stage.value("model", "samples_per_s", case="a3")
    spent = 0.0
    for decode in ("cpu", "gpu"):
        if decode == "gpu" and not (stage.cuda and has_module("torchvision")):
            stage.record("--decode gpu", "skipped", note="needs a CUDA device and torchvision (nvJPEG)")
            continue
        start = time.monotonic()
        loader_rate = stage.attempt(f"loader only, --decode {decode}",
                                    lambda: loader_only(stage, bags, decode, workers), needs=spent)
        stage.attempt(f"torchrun cdgmae.py, --decode {decode}",
                      lambda: training_run(stage, bags, decode, workers, loader_rate, model_rate), needs=spent / 2)
        spent = time.monotonic() - start


def train_flags(stage, data, decode, workers, batch):
    """cdgmae.py's flags for an a3 run on `data` (the dry run's model is tiny)."""
    return ["--data", str(data), "--decode", decode, "--workers", str(workers), "--batch-size", str(batch),
            "--vis-every", "0", "--verify-images", "none", *A3, *stage.size.model_flags]


def loader_only(stage, data, decode, workers):
    """cdgmae.py's own loader (scan, dataset, DataLoader, batch mover) for one epoch, without the model:
    samples/s, split into the time spent waiting for the workers and the time on the device."""
    size, output = stage.size, stage.scratch / f"loader-{decode}"
    output.mkdir()
    parser = cdgmae.get_args_parser()
    args = parser.parse_args(train_flags(stage, data, decode, workers, size.batch) + ["--output", str(output)])
    cdgmae.check_args(parser, args)
    bags, args.views = cdgmae.scan_bag_root(args, 0, 1, output)
    dataset = cdgmae.make_dataset(args, bags, (args.input_size // args.patch_size) ** 2, output)
    sampler = cdgmae.GlobalBatchSampler(len(bags), args.batch_size, 0, 1, seed=args.seed)
    loader = cdgmae.make_loader(args, dataset, sampler, args.batch_size, stage.device)
    move = cdgmae.batch_to_device(args, stage.device)
    batches, waited, moved, counted = iter(loader), 0.0, 0.0, 0
    for i in range(len(bags) // args.batch_size):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        move(batch)
        stage.sync()
        if i >= size.loader_warmup:
            waited, moved, counted = waited + fetched - start, moved + time.perf_counter() - fetched, counted + 1
    del batches, loader  # ends the workers before the training run
    rate = counted * args.batch_size / (waited + moved)
    on_device = "copy + normalise" if decode == "cpu" else "nvJPEG decode, crops, normalise"
    stage.record(f"loader only, --decode {decode}", "measured",
                 f"{rate:,.0f} samples/s; per batch {1000 * waited / counted:.0f} ms waiting for the workers, "
                 f"{1000 * moved / counted:.0f} ms on the device ({on_device})",
                 f"{workers} workers, batch {args.batch_size}, {counted} batches after {size.loader_warmup} of warm-up",
                 samples_per_s=rate, wait_ms_per_batch=1000 * waited / counted,
                 device_ms_per_batch=1000 * moved / counted)
    return rate


def training_run(stage, data, decode, workers, loader_rate, model_rate):
    """`torchrun --nproc_per_node 1 cdgmae.py` for a few steps; samples/s from log.jsonl after the warm-up."""
    size, output = stage.size, stage.scratch / f"run-{decode}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(ROOT / "cdgmae.py"), *train_flags(stage, data, decode, workers, size.batch), "--output", str(output),
               "--max-steps", str(size.e2e_steps), "--log-every", str(size.log_every)]
    start = time.monotonic()
    run_command(command, stage.left(), cwd=stage.scratch)
    rate, steps = rate_after_warmup(output / "log.jsonl", size.warmup_steps, size.batch)
    stage.record(f"torchrun cdgmae.py, --decode {decode}", "measured",
                 f"{rate:,.0f} samples/s over {steps} steps after {size.warmup_steps} of warm-up; bottleneck: "
                 f"{bottleneck(loader_rate, model_rate)}",
                 f"a3, batch {size.batch}, {workers} workers, whole run {time.monotonic() - start:.0f} s (start-up, "
                 "scan, checkpoints included). " + TARGETS["a3"], samples_per_s=rate)


def rate_after_warmup(log, warmup_steps, batch):
    """(samples/s, steps) over the log records whose interval starts after `warmup_steps` (each record's
    samples_per_s covers the steps since the previous record)."""
    previous, samples, seconds, steps = 0, 0, 0.0, 0
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if previous >= warmup_steps:
            steps += entry["step"] - previous
            samples += (entry["step"] - previous) * batch
            seconds += (entry["step"] - previous) * batch / entry["samples_per_s"]
        previous = entry["step"]
    if not steps:
        raise RuntimeError(f"{log}: no record after step {warmup_steps}")
    return samples / seconds, steps


def bottleneck(loader_rate, model_rate):
    if loader_rate is None or model_rate is None:
        return "not known (no loader-only or no model-only a3 figure)"
    if loader_rate < model_rate:
        return f"the loader ({loader_rate:,.0f} samples/s alone, the model {model_rate:,.0f})"
    return f"the model ({model_rate:,.0f} samples/s alone, the loader {loader_rate:,.0f})"


def exactness(stage):
    """An uninterrupted run, a repeat of it, and a run stopped after k steps and resumed (--resume auto):
    loss curves (log.jsonl) and final parameters compared. The repeat shows what the kernels alone change."""
    size = stage.size
    data, runs = stage.scratch / "exact-bags", stage.scratch / "exact"
    write_bags(data, size.exact_bags, size.real_size, size.view_size, size.bag_processes or os.cpu_count())
    common = [*train_flags(stage, data, "cpu", size.workers or 4, size.exact_batch), "--epochs", "2",
              "--warmup-epochs", "1", "--log-every", "1"]

    def train(name, steps, *extra):
        cdgmae.main([*common, "--output", str(runs / name), "--max-steps", str(steps), *extra])

    train("straight", size.exact_steps)
    train("repeat", size.exact_steps)
    train("resumed", size.exact_stop)
    train("resumed", size.exact_steps, "--resume", "auto")
    steps_per_epoch = size.exact_bags // size.exact_batch
    for case, other in (("repeat of an uninterrupted run", "repeat"),
                        (f"stopped after {size.exact_stop} steps, resumed", "resumed")):
        d = compare_runs(runs / "straight", runs / other)
        same = d["loss_max_diff"] == 0 and d["params_bitwise"]
        stage.record(case, "measured",
                     "loss curve and parameters bitwise equal" if same else
                     f"loss curves differ by at most {d['loss_max_diff']:.2e}; parameters by at most "
                     f"{d['params_max_diff']:.2e} (largest |p| {d['params_max_abs']:.2f}), not bitwise equal",
                     f"a3, batch {size.exact_batch}, {size.exact_steps} steps ({steps_per_epoch} per epoch), against "
                     f"an uninterrupted run{'' if stage.cuda else '; on a CPU the kernels are deterministic'}", **d)


def compare_runs(a, b):
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}
              for run in (a, b)]
    if list(losses[0]) != list(losses[1]):
        raise RuntimeError(f"{a} and {b} logged other steps: {list(losses[0])} and {list(losses[1])}")
    states = [cdgmae.load_checkpoint(run / "checkpoint-last.pth")["model"] for run in (a, b)]
    return {"steps": len(losses[0]),
            "loss_max_diff": max(abs(losses[0][s] - losses[1][s]) for s in losses[0]),
            "params_bitwise": all(torch.equal(states[0][k], states[1][k]) for k in states[0]),
            "params_max_diff": max((states[0][k].float() - states[1][k].float()).abs().max().item() for k in states[0]),
            "params_max_abs": max(v.float().abs().max().item() for v in states[0].values())}


def generation(stage):
    """The S-LDM sampler (generate_views.SLDMBackend: conditioner, 50 DDIM steps with both guidance
    branches in one UNet call, VQ-f4 decode, M = 4) at the paper's size with random weights
    (bench_generate.real_size_sldm; the dry run: bench_generate.tiny_sldm): images/s per GPU."""
    import bench_generate
    import generate_views as gv

    size = stage.size
    torch.backends.cuda.matmul.allow_tf32 = True  # as generate_views.py runs
    unet_dtype = torch.bfloat16 if stage.cuda else torch.float32
    if stage.dry_run:
        sldm = bench_generate.tiny_sldm()
        sldm.unet.to(stage.device, unet_dtype)
        sldm.vae.to(stage.device)
        sldm.conditioner.to(stage.device)
    else:
        sldm = bench_generate.real_size_sldm(stage.device, unet_dtype)
    backend = gv.SLDMBackend(sldm, steps=size.gen_steps)
    views, image_size = gv.PAPER_VIEWS, sldm.conditioner.image_size
    flops = sldm_flops_per_image(sldm, size.gen_steps, views, bench_generate.count_macs, bench_generate.Decode)
    peak_flops = stage.value("peak", "flops")
    backend.steps = 2  # warm-up: the first calls set up the kernels
    backend.generate([torch.randn(3, image_size, image_size)], torch.randn(1, views, *backend.latent_shape()))
    backend.steps = size.gen_steps
    seconds_per_image = 0.0
    for batch in size.gen_batches:
        def measure():
            prepared = [torch.randn(3, image_size, image_size) for _ in range(batch)]
            noise = torch.randn(batch, views, *backend.latent_shape())
            memory = stage.memory_start()
            start = time.perf_counter()
            backend.generate(prepared, noise)  # returns PIL images: the device has finished
            seconds = time.perf_counter() - start
            rate = batch / seconds
            share = f" = {rate * flops / peak_flops:.0%} of the matmul" if peak_flops else ""
            stage.record(f"{batch} real images per call", "measured",
                         f"{rate:.2f} images/s; {rate_text(rate * flops)}{share}; peak memory "
                         f"{stage.memory_peak(memory):.1f} GiB",
                         f"{2 * batch * views} UNet rows per call, {size.gen_steps} DDIM steps, M = {views}; UNet "
                         f"{str(unet_dtype).removeprefix('torch.')}, VQ-f4 and ViT float32; "
                         f"{flops / 1e12:.2f} TFLOP per real image. " + PAPER_GENERATION,
                         images_per_s=rate, flops_per_image=flops)
            return seconds / batch
        seconds_per_image = stage.attempt(f"{batch} real images per call", measure,
                                          needs=1.2 * seconds_per_image * batch) or seconds_per_image


def sldm_flops_per_image(sldm, steps, views, count_macs, decode_module):
    """FLOPs (2 per multiply-add) per real image: 2 branches x steps x M UNet evaluations, M decodes, 1 ViT."""
    unet, device = sldm.unet, sldm.unet.device
    latent = torch.randn(1, *sldm.latent_shape(), device=device)
    context = torch.randn(1, 1, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    unet_macs, _ = count_macs(unet, latent.to(unet.dtype), 500, encoder_hidden_states=context)
    decode_macs, _ = count_macs(decode_module(sldm.vae), latent)
    size = sldm.conditioner.image_size
    vit_macs, _ = count_macs(sldm.conditioner.vit, torch.randn(1, 3, size, size, device=device))
    return 2 * (2 * steps * views * unet_macs + views * decode_macs + vit_macs)


def propagation(stage):
    """ViT-S/16 and ViT-S/8, random weights, random frames at 480x880 already on the device (no file
    decoding): frames/s of propagate.extract_features (8 frames a batch, as propagate.py) and of
    propagate.label_propagation_fast with Table 7's DAVIS settings, and the peak memory of each."""
    import propagate

    settings = {k: v for k, v in propagate.PROTOCOL["davis"].items() if k != "input_size"}
    for patch in (16, 8):
        stage.attempt(f"ViT-S/{patch}", lambda: propagate_video(stage, propagate, patch, settings))


def propagate_video(stage, propagate, patch, settings):
    size = stage.size
    (height, width), frames_count = size.frame_size, size.frames
    torch.manual_seed(0)
    encoder = cdgmae.vit_small(patch_size=patch, **size.vit).to(stage.device).eval()
    frames = torch.randn(frames_count, 3, height, width, device=stage.device)
    propagate.extract_features(encoder, frames[:2])  # warm-up
    memory = stage.memory_start()
    start = time.perf_counter()
    features = torch.cat([propagate.extract_features(encoder, frames[i:i + 8]) for i in range(0, frames_count, 8)])
    stage.sync()
    seconds = time.perf_counter() - start
    where = f"{height}x{width}, {frames_count} frames, float32 as propagate.py runs"
    stage.record(f"ViT-S/{patch} features", "measured",
                 f"{frames_count / seconds:.1f} frames/s; peak memory {stage.memory_peak(memory):.2f} GiB",
                 f"{where}; grid {features.shape[2]}x{features.shape[3]}", frames_per_s=frames_count / seconds)
    first = torch.softmax(torch.randn(5, *features.shape[2:], generator=torch.Generator().manual_seed(0)), 0)
    first = first.to(stage.device)  # 5 labels: background and 4 objects
    propagate.label_propagation_fast(features[:3], first, **settings)  # warm-up
    memory = stage.memory_start()
    start = time.perf_counter()
    propagate.label_propagation_fast(features, first, **settings)
    stage.sync()
    seconds = time.perf_counter() - start
    stage.record(f"ViT-S/{patch} k-NN propagation", "measured",
                 f"{(frames_count - 1) / seconds:.1f} frames/s; peak memory {stage.memory_peak(memory):.2f} GiB",
                 f"{where}; top-k {settings['topk']}, queue {settings['queue_length']}, radius {settings['radius']}",
                 frames_per_s=(frames_count - 1) / seconds)


STAGE_FUNCTIONS = {"peak": peak, "model": model_step, "end_to_end": end_to_end, "exactness": exactness,
                   "generation": generation, "propagation": propagation,
                   "compiled": lambda stage: model_step(stage, compiled=True)}


# -----------------------------------------------------------------------------
# Plumbing: synthetic bags, child processes, the environment, the command line
# -----------------------------------------------------------------------------

def write_bags(root, count, real_size, view_size, processes):
    """`count` bags ROOT/n00XX/img000NNN/ (16 class folders): real.jpg (quality 90) and view_00..03.jpg
    (quality 95) of photo-like content; each process encodes a small pool of photos and writes its share
    of the bags from it. Returns the megabytes written."""
    jobs = [(root, range(p, count, processes), real_size, view_size, p) for p in range(processes)]
    if processes == 1:
        return sum(map(write_bag_share, jobs)) / 1e6
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(processes) as pool:  # before this process touches CUDA
        return sum(pool.map(write_bag_share, jobs)) / 1e6


def write_bag_share(job):
    import io

    root, indices, real_size, view_size, seed = job
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)

    def jpeg(width, height, quality):
        buffer = io.BytesIO()
        bench_data.photo(rng, width, height).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()
    reals = [jpeg(*real_size, 90) for _ in range(min(8, len(indices)))]
    views = [jpeg(view_size, view_size, 95) for _ in range(2 * len(reals))]
    written = 0
    for i in indices:
        bag = Path(root) / f"n{i % 16:04d}" / f"img{i:06d}"
        bag.mkdir(parents=True)
        files = {"real.jpg": reals[rng.integers(len(reals))]}
        files.update({f"view_{k:02d}.jpg": views[rng.integers(len(views))] for k in range(4)})
        for name, data in files.items():
            (bag / name).write_bytes(data)
            written += len(data)
    return written


def run_command(command, timeout, cwd):
    """Run a command (in this stage's process group, so that stopping the stage stops it too); on
    failure raise with the end of its output (also printed). At the timeout it gets SIGTERM first,
    which torchrun passes on to its workers (they run in process groups of their own)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", cwd=cwd)
    try:
        output, _ = process.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        print(output[-4000:])
        raise TimeoutError(f"stopped after {timeout:.0f} s (the stage's cap)") from None
    if process.returncode:
        print(output[-4000:])
        last = [line for line in output.splitlines() if line.strip()][-1:] or [""]
        raise RuntimeError(f"exit code {process.returncode}: {last[0][-300:]}")
    return output


def run_stage_process(args, name, seconds, scratch, say):
    """Run one stage in a child process (its own process group) for at most `seconds`, echoing its
    output; a stage that overruns or dies without recording why gets a row that says so."""
    command = [sys.executable, str(Path(__file__).resolve()), str(args.output), "--stage", name,
               "--seconds", str(seconds), "--scratch", str(scratch)] + (["--dry-run"] if args.dry_run else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.dry_run:  # tiny sizes: one thread each (on a busy CPU, more threads only wait for each other)
        env["OMP_NUM_THREADS"] = "1"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                               start_new_session=True, env=env)
    tail = deque(maxlen=5)

    def echo():
        for line in process.stdout:
            say(line.rstrip("\n"))
            if line.strip():
                tail.append(line.strip())
    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:  # stop the stage and what it started (torchrun passes SIGTERM on)
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        process.wait()
        code = None
    reader.join(timeout=10)
    last = f"; last output: {tail[-1][-300:]}" if tail else ""
    if code is None:
        record(args.output, {"stage": name, "case": "(stage)", "status": "timed out",
                             "note": f"stopped at its cap of {seconds:.0f} s{last}", "values": {}}, say)
    elif code not in (0, STAGE_FAILED):
        record(args.output, {"stage": name, "case": "(stage)", "status": "failed",
                             "note": f"exit code {code}{last}", "values": {}}, say)


def children_cpu_seconds():
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # of the finished child processes, and theirs
    return usage.ru_utime + usage.ru_stime


def has_module(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def environment(dry_run):
    """What the run ran on, without starting CUDA in this process (nvidia-smi names the GPU and driver)."""
    env = {"mode": "dry run (tiny sizes)" if dry_run else "GPU run", "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        env["device"] = "; ".join(query.stdout.strip().splitlines()) or "nvidia-smi answered nothing"
    except (OSError, subprocess.TimeoutExpired):
        env["device"] = "no nvidia-smi (no NVIDIA driver found)"
    env["torch"] = f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    versions = []
    for package in ("torchvision", "diffusers", "numpy", "pillow"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    env["packages"] = f"Python {platform.python_version()}, " + ", ".join(versions)
    env["CPUs"] = os.cpu_count()
    import resource
    shm = shutil.disk_usage("/dev/shm").total / 2 ** 30 if os.path.isdir("/dev/shm") else 0
    env["loader limits"] = (f"/dev/shm {shm:.0f} GiB (the workers' batches), "
                            f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]} open files per process")
    return env


def parse_cap(text):
    name, _, seconds = text.partition("=")
    if name not in STAGES:
        raise argparse.ArgumentTypeError(f"{text!r}: no stage {name!r} (stages: {', '.join(STAGES)})")
    return name, common.checked(float, 0, low_open=True)(seconds)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="folder for results.json, results.md and console.txt (created; must not hold "
                                  "another run's results.json)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, every stage (what the tests run on a CPU)")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="the stages to run")
    p.add_argument("--cap", type=parse_cap, nargs="+", default=[], metavar="STAGE=SECONDS",
                   help="another time cap for a stage")
    p.add_argument("--budget", type=common.checked(float, 0, low_open=True), default=BUDGET,
                   help="seconds for the whole run: a stage's cap is cut to what is left")
    p.add_argument("--scratch", default=None, help="folder for the temporary bags and runs (default: the system's)")
    p.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # in the process of one stage
    p.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    start = time.monotonic()
    args = get_args_parser().parse_args(argv)
    if args.stage:  # one stage, in the child process that run_stage_process started
        stage = Stage(args)
        try:
            STAGE_FUNCTIONS[args.stage](stage)
        except Exception as e:  # noqa: BLE001 -- recorded; the runner goes on with the next stage
            traceback.print_exc()
            stage.record("(stage)", "failed", note=f"{type(e).__name__}: {common.one_line(e)[:400]}")
            sys.exit(STAGE_FAILED)
        return

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise SystemExit(f"{output}: is a file (give a folder for the results)")
    if (output / "results.json").exists():
        raise SystemExit(f"{output}: holds the results of another run (results.json) (choose another folder)")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: the GPU run needs one "
                         "(--dry-run runs every stage at tiny sizes on a CPU)")
    output.mkdir(parents=True, exist_ok=True)
    console = open(output / "console.txt", "a")
    lock = threading.Lock()

    def say(text):
        with lock:
            print(text, flush=True)
            console.write(text + "\n")
            console.flush()

    caps = {**STAGES, **dict(args.cap)}
    plan = {name: caps[name] for name in STAGES if name in args.stages}
    scratch = Path(tempfile.mkdtemp(prefix="cdgmae-gpu-run-", dir=args.scratch))
    free = shutil.disk_usage(scratch).free / 2 ** 30
    env = {**environment(args.dry_run), "scratch": f"{scratch} ({free:.0f} GiB free; the GPU run writes about 10 GiB)"}
    save_results(output, {"environment": env, "plan": plan, "rows": []})
    for key, value in env.items():
        say(f"{key}: {value}")
    say(f"plan: {', '.join(f'{k} {v:g} s' for k, v in plan.items())}; at most {args.budget:g} s in all")
    try:
        for name, cap in plan.items():
            left = args.budget - (time.monotonic() - start)
            if left < MIN_STAGE:
                record(output, {"stage": name, "case": "(stage)", "status": "skipped",
                                "note": f"{left:.0f} s of the {args.budget:g} s budget left", "values": {}}, say)
                continue
            say(f"== {name} (at most {min(cap, left):.0f} s)")
            began, cpu = time.monotonic(), children_cpu_seconds()
            run_stage_process(args, name, min(cap, left), scratch, say)
            say(f"== {name}: {time.monotonic() - began:.0f} s ({children_cpu_seconds() - cpu:.0f} s of CPU)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    say(f"done in {time.monotonic() - start:.0f} s: {output / 'results.md'}")
    console.close()


if __name__ == "__main__":
    main()
