"""Training-step throughput of CDG-MAE for the paper's a1 and a3 settings.

For each setting it reports samples/s of a full training step (forward, backward, AdamW)
on synthetic inputs (no data loading), the model's FLOPs per sample and the achieved
FLOP/s as a fraction of a large matmul measured on the same device in the same run.

FLOP accounting: a training step is counted as 3x the forward pass (backward = 2x forward),
2 FLOPs per multiply-add, with every Linear/Conv multiply-add *and* the attention products
(q.k and attn.v) counted -- unlike Table 8's fvcore convention, which leaves the
attention products out. LayerNorm and elementwise work are not counted.

    python benchmarks/bench_train.py                       # CPU: float32, batch 4
    python benchmarks/bench_train.py --batch-size 256      # GPU: float32 (TF32 off) and bf16
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdgmae import CDGMAE, count_flops, param_groups  # noqa: E402

SETTINGS = {"a1": (1, 0.0), "a3": (3, 0.25)}  # (N anchors, r_a), Table 5


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, sizes=(1024, 2048, 4096), seconds=1.0):
    """FLOP/s of the fastest square matmul among `sizes`: the device's practical peak for dtype."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        repeats, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            a @ b
            sync(device)
            repeats += 1
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t))
    return best


def training_flops(counts):
    """FLOPs of one training sample from count_flops' per-sample counts: 3x the forward (backward =
    2x forward), 2 FLOPs per multiply-add, Linear, Conv and the attention products."""
    return 3 * 2 * (counts["linear"] + counts["conv"] + counts["attention"])


def step_rate(setting, device, batch_size, steps, bf16, compile_model, compile_backend="inductor", **model_kwargs):
    """samples/s of full training steps of CDGMAE(setting, **model_kwargs) on random inputs already on
    `device`, after two warm-up steps (which also compile, with torch.compile's `compile_backend`)."""
    num_anchors, anchor_mask = SETTINGS[setting]
    torch.manual_seed(0)
    model = CDGMAE(num_anchors=num_anchors, anchor_mask_ratio=anchor_mask, **model_kwargs).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                                  fused=device.type == "cuda" or None)  # as cdgmae.py trains
    run = torch.compile(model, backend=compile_backend) if compile_model else model
    size = model.img_size
    target = torch.randn(batch_size, 3, size, size, device=device)
    anchors = torch.randn(batch_size, num_anchors, 3, size, size, device=device)

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = run(target, anchors)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (and compilation)
        one_step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync(device)
    return batch_size * steps / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=None, help="per step (default: 4 on CPU, 256 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 4)
    steps = args.steps or (20 if device.type == "cuda" else 3)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {batch_size}; {steps} timed steps; torch {torch.__version__}")

    modes = [("float32", torch.float32, False)]
    if device.type == "cuda":
        modes.append(("bf16 autocast", torch.bfloat16, True))
    peak = {label: matmul_rate(device, dtype) for label, dtype, _ in modes}
    for label in peak:
        print(f"measured {label} matmul (best of 1024^3, 2048^3, 4096^3): {peak[label] / 1e9:.1f} GFLOP/s")

    print("\n| setting | Table 8 GFLOPs (fvcore) | train GFLOP/sample | precision | samples/s | achieved GFLOP/s | of matmul |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        n, r = SETTINGS[setting]
        counts = count_flops(CDGMAE(num_anchors=n, anchor_mask_ratio=r))
        train_flops = training_flops(counts)
        for label, _, bf16 in modes:
            rate = step_rate(setting, device, batch_size, steps, bf16, args.compile)
            achieved = rate * train_flops
            print(f"| {setting} (N={n}, r_a={r:g}) | {counts['fvcore'] / 1e9:.2f} | {train_flops / 1e9:.1f} | "
                  f"{label} | {rate:.2f} | {achieved / 1e9:.1f} | {achieved / peak[label]:.0%} |")


if __name__ == "__main__":
    main()
