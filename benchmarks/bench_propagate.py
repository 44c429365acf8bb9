"""Speed of label propagation (propagate.label_propagation_fast, the one propagate.py runs) on
a DAVIS-sized feature grid.

Feature extraction is excluded: random L2-normalised features [T, C, h, w] stand in for a
video's ViT features (DAVIS at 480x880 with ViT-S/16: a 30x55 grid, C = 384). Next to it the
script times, in the same run, the one step no implementation of the protocol can skip: the
affinity matmul of every frame's queries with its whole context (frame 0 + the queue),
[h*w, C] x [C, (queue + 1) * h*w] per frame -- the floor. Peak memory is the process's
resident-set high-water mark during propagation, above what it held before. --literal times
propagate.label_propagation (the rule as the protocol reads, the same result) instead.

Usage:
    python benchmarks/bench_propagate.py                      # 30x55, C 384, queue 20, 30 frames
    python benchmarks/bench_propagate.py --grid 60 110 --frames 10   # ViT-S/8 at 480x880
    python benchmarks/bench_propagate.py --literal            # the literal rule, for comparison
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from propagate import context_frames, label_propagation, label_propagation_fast  # noqa: E402


def memory_mb(field):
    """VmRSS / VmHWM of this process in MiB (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_memory():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frames", type=int, default=30, help="video length T")
    p.add_argument("--grid", type=int, nargs=2, default=(30, 55), help="feature grid h w")
    p.add_argument("--dim", type=int, default=384, help="feature channels C")
    p.add_argument("--labels", type=int, default=5, help="label channels K (background + objects)")
    p.add_argument("--queue-length", type=int, default=20)
    p.add_argument("--topk", type=int, default=7)
    p.add_argument("--radius", type=float, default=20)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of floor and propagation; best kept")
    p.add_argument("--literal", action="store_true",
                   help="time label_propagation (the literal rule) instead of label_propagation_fast")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    h, w = args.grid
    g = torch.Generator().manual_seed(args.seed)
    features = F.normalize(torch.randn(args.frames, args.dim, h, w, generator=g), dim=1).to(device)
    first = torch.softmax(torch.randn(args.labels, h, w, generator=g), dim=0).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    propagation = label_propagation if args.literal else label_propagation_fast
    settings = dict(topk=args.topk, queue_length=args.queue_length, radius=args.radius, temperature=args.temperature)

    # Warm-up (allocator, kernels) on a short prefix.
    propagation(features[:3], first, **settings)

    # Floor: the affinity matmul of each frame with its full context, same shapes as the protocol.
    feats = features.reshape(args.frames, args.dim, h * w)
    context = len(context_frames(1, args.queue_length))
    keys = feats[torch.arange(context) % args.frames].permute(1, 0, 2).reshape(args.dim, context * h * w).contiguous()
    affinity = torch.empty(h * w, context * h * w, device=device)  # reused, like propagation's buffers

    def time_floor():
        sync()
        start = time.perf_counter()
        for t in range(1, args.frames):
            torch.mm(feats[t].T, keys, out=affinity)
        sync()
        return time.perf_counter() - start

    def time_propagation():
        per_frame, last = [], [0.0]

        def on_frame(t):
            sync()
            now = time.perf_counter()
            per_frame.append(now - last[0])
            last[0] = now

        sync()
        start = last[0] = time.perf_counter()
        if args.literal:  # no per-frame callback: the whole video only
            label_propagation(features, first, **settings)
        else:
            label_propagation_fast(features, first, on_frame=on_frame, **settings)
        sync()
        return time.perf_counter() - start, per_frame

    # Alternate the two measurements and keep the best of each: other processes share the cores.
    floors, runs, extra_memory = [], [], []
    for _ in range(args.repeats):
        floors.append(time_floor())
        baseline = memory_mb("VmRSS")
        peak_ok = reset_peak_memory()
        runs.append(time_propagation())
        if peak_ok and baseline is not None:
            extra_memory.append(memory_mb("VmHWM") - baseline)
    if device.type == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated(device) / 2 ** 20
    floor = min(floors)
    total, per_frame = min(runs, key=lambda r: r[0])

    n = args.frames - 1
    steady = per_frame[args.queue_length:]  # frames whose context holds queue_length + 1 distinct frames
    gflop = 2 * h * w * args.dim * context * h * w / 1e9
    print(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, cpus {os.cpu_count()}")
    print(f"grid {h}x{w}, C {args.dim}, K {args.labels}, T {args.frames}, queue {args.queue_length}, "
          f"top-k {args.topk}, radius {args.radius}: context {context} frames = {context * h * w} keys per query")
    print(f"{'literal rule' if args.literal else 'propagation':<21}{n / total:8.2f} frames/s  ({1000 * total / n:7.1f} ms/frame, {total:.2f} s)")
    if steady:
        print(f"  from frame {args.queue_length + 1} on     {len(steady) / sum(steady):8.2f} frames/s "
              f"({1000 * sum(steady) / len(steady):7.1f} ms/frame; earlier frames share frame 0's product)")
    print(f"affinity matmul only {n / floor:8.2f} frames/s  ({1000 * floor / n:7.1f} ms/frame, "
          f"{gflop:.1f} GFLOP/frame, {gflop * n / floor:.0f} GFLOP/s)")
    print(f"propagation / floor  {total / floor:8.2f} x over the video"
          + (f", {(sum(steady) / len(steady)) / (floor / n):.2f} x from frame {args.queue_length + 1} on" if steady else "")
          + f" (best of {args.repeats})")
    if extra_memory:
        print(f"peak memory          {max(extra_memory):8.0f} MiB above what the process held before "
              f"(RSS high-water mark during propagation)")
    if device.type == "cuda":
        print(f"peak GPU memory      {peak_gpu:8.0f} MiB allocated")


if __name__ == "__main__":
    main()
