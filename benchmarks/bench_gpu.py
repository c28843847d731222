"""GPU benchmarks of fastft: kernel bandwidth, CUDA-graph head step, end-to-end fine-tuning.

Run by benchmarks/gpu_check.sh, alone (``python benchmarks/bench_gpu.py --json out.json``;
default ``.benchmarks/results/bench_gpu.json``), or by ``pytest benchmarks`` (``test_gpu``,
which writes ``gpu.json`` into the results folder and is skipped without CUDA).

- **Bandwidth** of cache_gather / cache_write at B=16384, D=2048 (int8 <-> bf16, fp16 ->
  fp16, plus a few extra cases) as a fraction of the device's peak DRAM bandwidth (from
  its memory clock and bus width, else a measured device-to-device copy). The kernels are
  timed inside a CUDA graph, so the figure is the GPU's, not Python's; eager per-call
  latency is reported separately.
- **Head step**: ``FineTuner.fit`` of a small head on a device cache, eager vs
  ``cuda_graph=True`` (the step captured once and replayed), as time per epoch; the weights
  after the same steps must agree within 1e-5.
- **End to end**: 10 epochs of a torchvision-style ResNet-50 (random weights, synthetic
  224x224 data, 20k samples), naive frozen fine-tuning vs ``fastft.FineTuner``; skipped when
  fastft does not export FineTuner yet. Naive epochs are all alike (the frozen forward of
  every sample), so only ``--naive-epochs`` of them are timed and the rest extrapolated.

Every section records its own error instead of stopping the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fastft
import fastft.ops

B, D = 16384, 2048


# ------------------------------------------------------------------ timing helpers


def gpu_time(fn, iters: int = 20, reps: int = 5) -> float:
    """Median seconds per call of ``fn`` on the GPU, replayed from a CUDA graph when possible."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    outer = torch.cuda.current_stream()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        run = graph.replay
    except Exception:  # capture not possible: time eager calls (host overhead included)
        torch.cuda.set_stream(outer)  # a failed capture_end leaves the capture stream current

        def run():
            for _ in range(iters):
                fn()

    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def eager_latency(fn, iters: int = 50) -> float:
    """Wall seconds per eager call, synchronising at the end only."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def peak_bandwidth() -> dict:
    props = torch.cuda.get_device_properties(0)
    out = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
    }
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:  # double data rate
        out["peak_spec_gbps"] = round(2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, 1)
    x = torch.empty(2**30 // 4, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    t = gpu_time(lambda: y.copy_(x), iters=10)
    out["copy_measured_gbps"] = round(2 * x.numel() * 4 / t / 1e9, 1)
    out["peak_gbps"] = out.get("peak_spec_gbps", out["copy_measured_gbps"])
    out["peak_source"] = "memory clock x bus width" if "peak_spec_gbps" in out else "measured copy"
    x = y = None  # free the 2 GiB before the next benchmark
    return out


# ------------------------------------------------------------------ kernel bandwidth


def bench_bandwidth(peak: float) -> list[dict]:
    rows_out = []
    n = 4 * B  # a cache four times the batch: reads are scattered and not L2-resident
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = torch.randperm(n, device="cuda", generator=gen)[:B]

    def record(name, fn, nbytes, baseline=None):
        t = gpu_time(fn)
        row = {
            "case": name,
            "us": round(t * 1e6, 1),
            "gbps": round(nbytes / t / 1e9, 1),
            "fraction_of_peak": round(nbytes / t / 1e9 / peak, 3),
        }
        if baseline is not None:
            tb = gpu_time(baseline)
            row["torch_us"] = round(tb * 1e6, 1)
            row["speedup_vs_torch"] = round(tb / t, 2)
        rows_out.append(row)
        print(
            f"  {name:46s} {row['us']:9.1f} us {row['gbps']:8.1f} GB/s  "
            f"{row['fraction_of_peak']:.2f} of peak"
            + (f"  ({row['speedup_vs_torch']}x torch)" if baseline else ""),
            flush=True,
        )

    gather = torch.ops.fastft.cache_gather
    write = torch.ops.fastft.cache_write
    # gather int8 -> bf16 (dequantize) and fp16 -> fp16 (copy)
    q = torch.randint(-127, 128, (n, D), dtype=torch.int8, device="cuda")
    s = torch.rand(n, device="cuda")
    record(
        "gather int8->bf16 B=16384 D=2048",
        lambda: gather(q, s, rows, torch.bfloat16),
        B * D * (1 + 2) + B * (4 + 8),
        baseline=lambda: (q[rows].float() * s[rows].unsqueeze(1)).to(torch.bfloat16),
    )
    h = torch.randn(n, D, device="cuda").half()
    empty = torch.empty(0, device="cuda")
    record(
        "gather fp16->fp16 B=16384 D=2048",
        lambda: gather(h, empty, rows, torch.float16),
        B * D * (2 + 2) + B * 8,
        baseline=lambda: h[rows],
    )
    record(
        "gather int8->fp32 B=16384 D=2048",
        lambda: gather(q, s, rows, torch.float32),
        B * D * (1 + 4) + B * (4 + 8),
    )
    # write fp16 -> fp16 and bf16 -> int8 (quantize), one position per sample
    x16 = torch.randn(B, 1, D, device="cuda").half()
    dst16 = torch.empty(n, D, dtype=torch.float16, device="cuda")

    def torch_write():
        dst16[rows] = x16[:, 0]

    record(
        "write fp16->fp16 B=16384 D=2048",
        lambda: write(x16, rows, dst16, empty, "none"),
        B * D * (2 + 2) + B * 8,
        baseline=torch_write,
    )
    xb = x16.to(torch.bfloat16)
    dst8 = torch.empty(n, D, dtype=torch.int8, device="cuda")
    record(
        "write bf16->int8 B=16384 D=2048",
        lambda: write(xb, rows, dst8, s, "none"),
        B * D * (2 + 1) + B * (4 + 8),
    )
    # a ResNet-50 frontier: NCHW [256, 2048, 7, 7] fp32 seen as [B, 49, 2048], mean pool
    fmap = torch.randn(256, D, 7, 7, device="cuda").flatten(2).transpose(1, 2)
    r256 = rows[:256]
    record(
        "write mean NCHW fp32->fp16 [256,49,2048]",
        lambda: write(fmap, r256, dst16, empty, "mean"),
        256 * 49 * D * 4 + 256 * D * 2,
    )
    q = h = dst16 = dst8 = None  # free them before the next cases
    # pinned host cache: bounded by the host link, not DRAM (fraction is of DRAM peak)
    hq = torch.randint(-127, 128, (n, D), dtype=torch.int8).pin_memory()
    hs = torch.rand(n).pin_memory()
    record(
        "gather pinned-host int8->bf16 B=16384 D=2048",
        lambda: gather(hq, hs, rows, torch.bfloat16),
        B * D * 1 + B * 4,
    )
    return rows_out


def bench_eager_latency() -> dict:
    """Per-call wall time of a small gather, with row checks read at once vs deferred."""
    from fastft.ops import cuda as fastft_cuda

    src = torch.randn(100_000, 256, device="cuda").half()
    rows = torch.randint(0, 100_000, (256,), device="cuda")
    empty = torch.empty(0, device="cuda")
    fn = lambda: torch.ops.fastft.cache_gather(src, empty, rows, torch.float32)  # noqa: E731
    out = {"sync_checks_us": round(eager_latency(fn) * 1e6, 1)}
    old = fastft_cuda.set_sync_checks(False)
    try:
        out["deferred_checks_us"] = round(eager_latency(fn) * 1e6, 1)
        fastft_cuda.raise_pending_errors()
    finally:
        fastft_cuda.set_sync_checks(old)
    out["torch_index_us"] = round(eager_latency(lambda: src[rows].float()) * 1e6, 1)
    print(f"  eager B=256 D=256 gather: {out}", flush=True)
    return out


# ------------------------------------------------------------------ head step: graph vs eager


def bench_head_step(epochs: int = 4) -> dict:
    """``FineTuner.fit`` on a device cache, eager vs ``cuda_graph=True``: time per epoch.

    20k cached rows of 2048 fp16 features, a 2048→256→10 head, batch 256 (79 steps an
    epoch), AdamW. The fits start from the same weights and see the same batches; the first
    epoch (warm-up and capture) is left out of the time. A graph needs Adam's step counters
    on the device (``capturable``), which rounds its bias correction differently from the
    default; so the weights are compared with an eager fit that uses the same capturable
    AdamW (must agree within 1e-5), and the difference to the default eager fit is reported
    beside it (a few hundred steps of Adam can amplify last-bit differences).
    """
    n, d, classes, batch = 20_000, 2048, 10, 256
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    y = (x @ torch.randn(d, classes, generator=gen)).argmax(1)  # a learnable task
    runs = {}
    for name, graph, capturable in (
        ("eager", False, False),
        ("eager_capturable", False, True),
        ("graph", True, True),
    ):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Linear(d, classes)
        )  # the frozen part: Linear+ReLU
        ft = fastft.FineTuner(
            model,
            num_classes=classes,
            hidden=[256],
            cache="device",
            cache_dtype="fp16",
            device="cuda",
            seed=0,
            verbose=False,
        )
        with _adam_capturable(capturable), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ft.fit((x, y), epochs=epochs, batch_size=batch, lr=1e-3, cuda_graph=graph)
        torch.cuda.synchronize()
        runs[name] = (statistics.median(ft.history.column("seconds")[1:]), ft)
        fallbacks = [str(w.message) for w in caught if "could not capture" in str(w.message)]

    def diff(a, b):
        return max(
            (p - q).abs().max().item()
            for p, q in zip(runs[a][1].tail.parameters(), runs[b][1].tail.parameters())
        )

    steps = math.ceil(n / batch)
    eager_s, graph_s = runs["eager"][0], runs["graph"][0]
    same_optimizer = diff("eager_capturable", "graph")
    out = {
        "rows": n,
        "features": d,
        "batch_size": batch,
        "steps_per_epoch": steps,
        "epochs_timed": epochs - 1,
        "eager_epoch_ms": round(eager_s * 1e3, 2),
        "graph_epoch_ms": round(graph_s * 1e3, 2),
        "eager_capturable_epoch_ms": round(runs["eager_capturable"][0] * 1e3, 2),
        "eager_step_us": round(eager_s / steps * 1e6, 1),
        "graph_step_us": round(graph_s / steps * 1e6, 1),
        "speedup": round(eager_s / graph_s, 2),
        "max_abs_weight_diff_same_optimizer": same_optimizer,
        "equal_within_1e-5": same_optimizer <= 1e-5,
        "max_abs_weight_diff_vs_default_eager": diff("eager", "graph"),
        "captured": not fallbacks,
        "fallback": fallbacks[0] if fallbacks else None,
    }
    print(f"  head step: {out}", flush=True)
    return out


@contextlib.contextmanager
def _adam_capturable(enabled: bool):
    """Make the trainer's Adam capturable even for an eager fit (what a graphed fit uses)."""
    from fastft.train import engine

    make = engine.make_optimizer
    engine.make_optimizer = lambda cfg, groups, capturable=False: make(
        cfg, groups, capturable=capturable or enabled
    )
    try:
        yield
    finally:
        engine.make_optimizer = make


# ------------------------------------------------------------------ end to end (ResNet-50)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout and attribute names (conv1 ... layer4, avgpool, fc).

    Takes uint8 images and scales them itself, so 20k synthetic images stay 3 GB.
    """

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            mods = []
            for i in range(blocks):
                mods.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        if x.dtype == torch.uint8:
            x = x.float().div(255.0)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def bench_end_to_end(samples: int, epochs: int, naive_epochs: int, batch: int) -> dict:
    finetuner = getattr(fastft, "FineTuner", None)
    if finetuner is None:
        print("  end-to-end: skipped (fastft.FineTuner not exported yet)", flush=True)
        return {"skipped": "fastft.FineTuner is not exported yet"}
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (samples, 3, 224, 224), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    out = {"samples": samples, "epochs": epochs, "batch_size": batch}

    # naive: frozen backbone in eval mode, every epoch runs it on every sample
    torch.manual_seed(0)
    model = ResNet50().cuda().eval()
    model.fc = nn.Linear(2048, 10).cuda()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.fc.parameters():
        p.requires_grad_(True)
    backbone = nn.Sequential(*[m for name, m in model.named_children() if name != "fc"])
    opt = torch.optim.AdamW(model.fc.parameters(), lr=1e-3)
    xd, yd = x.cuda(), y.cuda()
    # Warm-up outside the timing: cudnn.benchmark tunes each batch shape (full and last) once,
    # and fastft, which runs after, finds them tuned.
    for idx in (
        torch.arange(batch, device="cuda"),
        torch.arange(samples % batch or batch, device="cuda"),
    ):
        with torch.no_grad():
            feats = torch.flatten(backbone(xd[idx]), 1)
        loss = nn.functional.cross_entropy(model.fc(feats), yd[idx])
        loss.backward()
    opt.zero_grad()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(naive_epochs):
        perm = torch.randperm(samples, device="cuda")
        for i in range(0, samples, batch):
            idx = perm[i : i + batch]
            with torch.no_grad():
                feats = torch.flatten(backbone(xd[idx]), 1)
            loss = nn.functional.cross_entropy(model.fc(feats), yd[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.cuda.synchronize()
    per_epoch = (time.perf_counter() - t0) / naive_epochs
    out["naive_epochs_timed"] = naive_epochs
    out["naive_s"] = round(per_epoch * epochs, 2)
    del xd, yd, backbone, opt, model
    torch.cuda.empty_cache()

    # fastft: the frozen part runs once, the head trains on the cache
    torch.manual_seed(0)
    model = ResNet50()
    t0 = time.perf_counter()
    ft = finetuner(
        model, num_classes=10, cache="device", cache_dtype="fp16", device="cuda", verbose=False
    )
    ft.fit((x, y), epochs=epochs, batch_size=batch, lr=1e-3)
    torch.cuda.synchronize()
    out["fastft_s"] = round(time.perf_counter() - t0, 2)
    out["speedup"] = round(out["naive_s"] / out["fastft_s"], 2)
    print(f"  end-to-end: {out}", flush=True)
    return out


# ------------------------------------------------------------------ main


def section(results: dict, path: str, name: str, fn, *args):
    """Run one benchmark; record its result or its error, and save the JSON so far."""
    t0 = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as exc:  # keep the other sections; the JSON says what failed
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
    save(results, path)


def save(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:  # after every section: a timeout keeps what was measured
        json.dump(results, f, indent=2)


def usable() -> str | None:
    """Why the GPU benchmarks cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    if not fastft.has_cuda():
        return f"fastft has no usable CUDA kernels: {fastft.build_info().get('cuda_problem')}"
    return None


def kernels_serve() -> str | None:
    """None when one small cache_write and cache_gather on CUDA tensors ran fastft's CUDA
    kernels; else which implementations served them (never time the reference as fastft)."""
    dev = torch.device("cuda")
    fastft.ops.backend_calls(reset=True)
    dst, scales = torch.zeros(4, 8, dtype=torch.int8, device=dev), torch.zeros(4, device=dev)
    rows = torch.arange(2, device=dev)
    fastft.ops.cache_write(torch.randn(2, 3, 8, device=dev), rows, dst, scales, "mean")
    fastft.ops.cache_gather(dst, scales, rows)
    torch.cuda.synchronize()
    served = fastft.ops.backend_calls(reset=True)
    if served == {("cache_write", "cuda"): 1, ("cache_gather", "cuda"): 1}:
        return None
    return f"the fastft ops on CUDA tensors were served by {served}, not fastft's CUDA kernels"


def reference_calls() -> dict:
    """Calls the reference served since the last reset (none may happen while timing)."""
    return {
        op: n for (op, backend), n in fastft.ops.backend_calls().items() if backend == "reference"
    }


def run(
    path: str,
    *,
    samples: int = 20_000,
    epochs: int = 10,
    naive_epochs: int = 2,
    batch_size: int = 256,
    skip_e2e: bool = False,
) -> dict:
    """Every section, each saved to the JSON at ``path`` as soon as it is measured."""
    results: dict = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "fastft_build": fastft.build_info(),
        "has_cuda": fastft.has_cuda(),
    }
    problem = usable() or kernels_serve()
    if problem:
        results["error"] = problem
    else:
        section(results, path, "device", peak_bandwidth)
        peak = results["device"].get("peak_gbps", math.nan)
        section(results, path, "bandwidth", bench_bandwidth, peak)
        section(results, path, "eager_latency", bench_eager_latency)
        section(results, path, "head_step", bench_head_step)
        if not skip_e2e:
            section(
                results,
                path,
                "end_to_end",
                bench_end_to_end,
                samples,
                epochs,
                naive_epochs,
                batch_size,
            )
        fell_back = reference_calls()
        results["reference_calls"] = fell_back
        if fell_back:
            results["error"] = f"the reference served {fell_back} during the benchmarks"
    save(results, path)
    return results


# ------------------------------------------------------------------ under pytest


@pytest.mark.cuda
@pytest.mark.skipif(usable() is not None, reason=usable() or "")
def test_gpu(benchmark, results_dir):
    """All sections, as one benchmark of ``pytest benchmarks``: writes ``gpu.json`` into
    the results folder; skipped without a CUDA device and fastft's CUDA kernels."""
    results = {}
    benchmark.group = "gpu"
    benchmark.pedantic(
        lambda: results.update(run(str(results_dir / "gpu.json"))), rounds=1, iterations=1
    )
    failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not failed, failed


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=".benchmarks/results/bench_gpu.json")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--naive-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    results = run(
        args.json,
        samples=args.samples,
        epochs=args.epochs,
        naive_epochs=args.naive_epochs,
        batch_size=args.batch_size,
        skip_e2e=args.skip_e2e,
    )
    print(f"wrote {args.json}", flush=True)
    return 0 if "error" not in results else 2


if __name__ == "__main__":
    raise SystemExit(main())
