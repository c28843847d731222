"""The GPU path of cache building and training: staged input copies, bf16 autocast for the
frozen pass, the batch order on the device. CUDA tests skip cleanly without a GPU; the CPU
halves check the same code paths' results where they can run."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fastft import FeatureCache, FineTuner
from fastft.cache import clear_registry
from fastft.cache.staging import staged
from fastft.errors import FastFTValueError

from helpers.data import labelled
from helpers.native import needs_cuda_kernels as needs_cuda

# needs_cuda skips without a GPU and fails where a GPU and nvcc exist but fastft._C was built
# without its CUDA kernels: this GPU path is meant to run them.


def _prefix(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 32)).eval()


def _data(n: int = 300, seed: int = 1):
    return labelled(n, 24, classes=4, seed=seed)


def test_staging_passes_cpu_chunks_through_in_order():
    class Chunk:
        def __init__(self, i):
            self.i = i

    chunks = [Chunk(i) for i in range(5)]
    assert [c.i for c in staged(iter(chunks), torch.device("cpu"))] == list(range(5))


def test_bf16_autocast_prefix_is_close_to_fp32_and_keyed_apart(tmp_path):
    X, y = _data()
    exact = FeatureCache.build(
        _prefix(), (X, y), dtype="fp32", tier="host", cache_dir=tmp_path, progress=False
    )
    fast = FeatureCache.build(
        _prefix(), (X, y), dtype="fp32", tier="host", cache_dir=tmp_path, progress=False, amp="bf16"
    )
    assert fast.fingerprint != exact.fingerprint
    assert "autocast" in fast.parts["dtype"] and "autocast" not in exact.parts["dtype"]
    a, b = exact.gather(torch.arange(len(y)))[0], fast.gather(torch.arange(len(y)))[0]
    assert not torch.equal(a, b)  # the prefix really ran in bf16
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)  # bf16 rounding, nothing worse


def test_amp_must_be_bf16_or_none(tmp_path):
    X, y = _data(10)
    with pytest.raises(FastFTValueError, match="bf16"):
        FeatureCache.build(
            _prefix(), (X, y), tier="host", cache_dir=tmp_path, progress=False, amp="fp16"
        )
    with pytest.raises(FastFTValueError, match="extract_amp"):
        FineTuner(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), num_classes=2, extract_amp="fp8")


def test_finetuner_with_bf16_extraction_trains(tmp_path):
    X, y = _data()
    model = nn.Sequential(_prefix(), nn.ReLU(), nn.Linear(32, 3))
    ft = FineTuner(
        model,
        num_classes=4,
        cache_dtype="fp32",
        extract_amp="bf16",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    history = ft.fit((X, y), epochs=3, lr=1e-2)
    assert "autocast" in ft.cache.parts["dtype"]
    assert history[-1]["loss"] < history[0]["loss"]


@needs_cuda
@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_staged_gpu_build_equals_the_cpu_build(tier, tmp_path):
    X, y = _data(1000)
    cpu = FeatureCache.build(
        _prefix(),
        (X, y),
        dtype="fp32",
        tier="host",
        cache_dir=tmp_path / "cpu",
        batch_size=128,
        progress=False,
    )
    clear_registry()  # else the same key is found in this process instead of built on the GPU
    gpu = FeatureCache.build(
        _prefix().cuda(),
        (X, y),
        dtype="fp32",
        tier=tier,
        cache_dir=tmp_path / "gpu",
        batch_size=128,
        progress=False,
        device="cuda",
    )
    rows = torch.arange(len(y))
    torch.testing.assert_close(
        gpu.gather(rows.cuda() if tier == "device" else rows)[0].cpu(),
        cpu.gather(rows)[0],
        rtol=1e-4,
        atol=1e-5,
    )
    assert torch.equal(gpu.labels.cpu(), cpu.labels)


@needs_cuda
def test_staged_chunks_arrive_on_the_device_in_order():
    from fastft.data.source_base import Chunk

    def load(i):
        return lambda: (torch.full((4, 3), float(i)), torch.tensor([i] * 4))

    got = []
    for c in staged(iter([Chunk(0, 4 * i, 4, load(i)) for i in range(6)]), torch.device("cuda")):
        inputs, labels = c.load()
        assert inputs.is_cuda and c.start == 4 * int(labels[0])
        got.append(int(inputs[0, 0].item()))
    assert got == list(range(6))


@needs_cuda
def test_training_on_the_gpu_equals_training_on_the_cpu(tmp_path):
    X, y = _data()
    runs = []
    for device in ("cpu", "cuda"):
        model = nn.Sequential(_prefix(), nn.ReLU(), nn.Linear(32, 3))
        ft = FineTuner(
            model,
            num_classes=4,
            hidden=[16],
            cache_dtype="fp32",
            cache="device",
            device=device,
            cache_dir=str(tmp_path / device),
            seed=3,
            verbose=False,
        )
        ft.fit((X, y), epochs=2, lr=1e-2, batch_size=64)
        runs.append({k: v.detach().cpu() for k, v in ft.export().state_dict().items()})
    for name, want in runs[0].items():
        torch.testing.assert_close(runs[1][name], want, rtol=1e-4, atol=1e-5, msg=name)


def _graph_fit(
    tmp_path, cuda_graph: bool, *, head: nn.Module | None = None, dropout: float = 0.0, **kw
) -> FineTuner:
    X, y = _data()  # 300 rows at batch 64: four full batches and a partial one per epoch
    model = nn.Sequential(_prefix(), nn.ReLU(), nn.Linear(32, 3))
    torch.manual_seed(5)
    ft = FineTuner(
        model,
        num_classes=None if head is not None else 4,
        hidden=None if head is not None else [16],
        head=head,
        dropout=dropout,
        cache_dtype="fp32",
        cache="device",
        device="cuda",
        cache_dir=str(tmp_path),
        seed=3,
        verbose=False,
    )
    ft.fit((X, y), epochs=3, lr=1e-2, batch_size=64, cuda_graph=cuda_graph, **kw)
    return ft


@pytest.fixture
def replays(monkeypatch):
    """Counts CUDA graph replays (patched before any capture binds ``graph.replay``)."""
    count = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(
        torch.cuda.CUDAGraph, "replay", lambda graph: (count.append(1), replay(graph))[1]
    )
    return count


def _assert_same_tail(got: FineTuner, want: FineTuner, tol: float) -> None:
    for (name, w), g in zip(want.tail.state_dict().items(), got.tail.state_dict().values()):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=name)
    assert got.history.column("loss") == pytest.approx(want.history.column("loss"), rel=tol)


@needs_cuda
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_cuda_graph_training_equals_eager_training(tmp_path, replays, optimizer):
    eager = _graph_fit(tmp_path, False, optimizer=optimizer, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture would fall back
        graphed = _graph_fit(tmp_path, True, optimizer=optimizer, weight_decay=0.01)
    assert len(replays) == 3 * 4 - 3  # every full batch after the three warm-up steps
    _assert_same_tail(graphed, eager, 1e-5)


@needs_cuda
@pytest.mark.parametrize("options", [{"amp": "bf16"}, {"dropout": 0.3}], ids=["bf16", "dropout"])
def test_cuda_graph_training_with_autocast_or_dropout_matches_eager(
    tmp_path, replays, monkeypatch, options
):
    # Replays draw fresh dropout masks from the same Philox stream, in eager order. The eager
    # fit uses the capturable AdamW too, so that both run the same kernels: otherwise a bf16
    # rounding flip seeded by Adam's last-bit difference could exceed any tight tolerance.
    from fastft.train import engine

    make = engine.make_optimizer
    monkeypatch.setattr(
        engine,
        "make_optimizer",
        lambda cfg, groups, capturable=False: make(cfg, groups, capturable=True),
    )
    eager = _graph_fit(tmp_path, False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        graphed = _graph_fit(tmp_path, True, **options)
    assert len(replays) == 9
    _assert_same_tail(graphed, eager, 1e-3)


class SyncingHead(nn.Module):
    """A head whose forward reads a value back to the host: it cannot be captured."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        if x.abs().max().item() > 1e6:  # a host synchronisation
            x = x.clamp(-1e6, 1e6)
        return self.fc(x)


@needs_cuda
def test_a_step_that_cannot_be_captured_trains_on_eagerly(tmp_path, replays):
    torch.manual_seed(7)
    eager = _graph_fit(tmp_path, False, head=SyncingHead())
    torch.manual_seed(7)
    with pytest.warns(RuntimeWarning, match="could not capture the training step"):
        graphed = _graph_fit(tmp_path, True, head=SyncingHead())
    assert replays == []
    # The thread is back on its own stream and the allocator is usable.
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.empty_cache()
    _assert_same_tail(graphed, eager, 1e-5)


@needs_cuda
def test_training_steps_do_not_synchronise_with_the_host(tmp_path):
    """The host synchronisations of an epoch stay the same however many steps it has."""
    X, y = _data()
    model = nn.Sequential(_prefix(), nn.ReLU(), nn.Linear(32, 3))
    ft = FineTuner(
        model,
        num_classes=4,
        hidden=[16],
        cache_dtype="fp16",
        cache="device",
        device="cuda",
        cache_dir=str(tmp_path),
        seed=3,
        verbose=False,
    )
    ft.fit((X, y), epochs=1, batch_size=64)  # builds the cache; warms everything up
    counts = []
    for batch_size in (64, 8):  # 5 and 38 steps
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ft.fit((X, y), epochs=1, batch_size=batch_size)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[1] == counts[0], counts


@needs_cuda
@pytest.mark.parametrize("tier", ["device", "host"])
def test_a_cache_built_in_this_process_for_the_cpu_is_copied_for_cuda(tier, tmp_path):
    X, y = _data()
    cpu = FeatureCache.build(
        _prefix(), (X, y), dtype="fp32", tier=tier, cache_dir=tmp_path, progress=False, device="cpu"
    )
    gpu = FeatureCache.build(
        _prefix().cuda(),
        (X, y),
        dtype="fp32",
        tier=tier,
        cache_dir=tmp_path,
        progress=False,
        device="cuda",
    )
    assert gpu.telemetry["reason"] == "hit: copied for this device"
    data = gpu.storages[0].data
    assert data.is_cuda if tier == "device" else data.is_pinned()
    rows = torch.arange(len(y), device="cuda")
    torch.testing.assert_close(gpu.gather(rows)[0].cpu(), cpu.gather(rows.cpu())[0], rtol=0, atol=0)
    again = FeatureCache.build(
        _prefix().cuda(),
        (X, y),
        dtype="fp32",
        tier=tier,
        cache_dir=tmp_path,
        progress=False,
        device="cuda",
    )
    assert again.storages[0].data.data_ptr() == data.data_ptr()  # now found as it is


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_reference_quantizes_alike_on_cuda_and_on_the_cpu():
    """The fallback on CUDA tensors gives the CPU reference's int8 scales bit for bit (a
    division by the number 127 would be a multiplication by 1/127 there)."""
    from fastft.ops import reference

    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    q, scales = reference.quantize_int8(x)
    q_cuda, scales_cuda = reference.quantize_int8(x.cuda())
    assert torch.equal(scales_cuda.cpu(), scales) and torch.equal(q_cuda.cpu(), q)
