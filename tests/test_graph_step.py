"""``fit(..., cuda_graph=True)``: the captured-and-replayed training step.

The CUDA graph itself needs a GPU: ``test_a_real_cuda_graph_trains_what_eager_training_does``
captures and replays one (and skips without a GPU; tests/test_gpu_pipeline.py has more).
The other tests replace the graph backend by one with the same contract, where ``capture``
records the step without running it and a replay runs it again on the static buffers, and
let Adam be ``capturable`` on the CPU. What that checks for real: the warm-up steps are
real training steps, every full batch after them reaches the static buffers the replay
reads, partial batches run eagerly, the capturable optimizer trains what the ordinary one
does, and a failed capture falls back without losing a step. What it cannot check is the
CUDA part: the side-stream warm-up, the capture, and kernels replayed on new inputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.optim.adam as torch_adam
from torch import nn

from fastft import FineTuner
from fastft.errors import FastFTValueError
from fastft.train import FitConfig, engine
from fastft.train import graph_step as _graph_step
from fastft.train.graph_step import GraphedStep, graph_unsupported

from helpers.data import labelled


class RecordingGraphs:
    """The backend contract of ``_CudaGraphs``: capture records, replay re-runs the step."""

    instances: list[RecordingGraphs] = []

    def __init__(self, device):
        self.warms = self.captures = 0
        RecordingGraphs.instances.append(self)

    def warm(self, fn):
        self.warms += 1
        return fn()

    def capture(self, fn):
        self.captures += 1
        return fn  # like a CUDA capture, this runs nothing now


class FailingGraphs(RecordingGraphs):
    def capture(self, fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    RecordingGraphs.instances = []
    monkeypatch.setattr(_graph_step, "_CudaGraphs", RecordingGraphs)
    monkeypatch.setattr(_graph_step, "graph_unsupported", lambda *args: None)
    # Let Adam keep its step counters as tensors on the CPU, as it does on a GPU when capturable.
    monkeypatch.setattr(
        torch_adam, "_get_capturable_supported_devices", lambda supports_xla=True: ["cuda", "cpu"]
    )
    return monkeypatch


def _data(n: int = 1000):
    return labelled(n, 32, classes=4, seed=0)


def _fit(
    cuda_graph: bool,
    *,
    optimizer: str = "adamw",
    epochs: int = 3,
    n: int = 1000,
    device: str = "cpu",
    cache: str = "host",
    **kw,
) -> FineTuner:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    ft = FineTuner(
        model,
        num_classes=4,
        hidden=[16],
        cache=cache,
        cache_dtype="fp32",
        device=device,
        verbose=False,
    )
    ft.fit(
        _data(n),
        epochs=epochs,
        batch_size=64,
        lr=1e-2,
        optimizer=optimizer,
        weight_decay=0.01,
        cuda_graph=cuda_graph,
        **kw,
    )
    return ft


def _max_diff(a: FineTuner, b: FineTuner) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.tail.parameters(), b.tail.parameters()))


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_replayed_steps_train_what_eager_steps_train(graphs_on_cpu, optimizer):
    made = []
    make = engine.make_optimizer
    graphs_on_cpu.setattr(
        engine, "make_optimizer", lambda *a, **kw: made.append(make(*a, **kw)) or made[-1]
    )
    eager = _fit(False, optimizer=optimizer)
    graphed = _fit(True, optimizer=optimizer)
    (backend,) = RecordingGraphs.instances
    assert backend.warms == 3 and backend.captures == 1
    # A graph replays Adam's step only when its step counters live on the device.
    assert [opt.defaults.get("capturable", False) for opt in made] == [False, optimizer != "sgd"]
    assert _max_diff(eager, graphed) <= 1e-5
    for want, got in zip(eager.history.column("loss"), graphed.history.column("loss")):
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: captures a CUDA graph")
@pytest.mark.parametrize("cache", ["device", "host"])
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_a_real_cuda_graph_trains_what_eager_training_does(monkeypatch, optimizer, cache):
    # No stand-in: _CudaGraphs warms up on its side stream, torch.cuda.graph captures the
    # step, and CUDAGraph.replay (counted, patched before any capture binds it) trains.
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(
        torch.cuda.CUDAGraph, "replay", lambda graph: (replays.append(1), replay(graph))[1]
    )
    eager = _fit(False, optimizer=optimizer, device="cuda", cache=cache)
    assert replays == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture would train eagerly
        graphed = _fit(True, optimizer=optimizer, device="cuda", cache=cache)
    # 1000 rows at batch 64: 15 full batches and a partial one per epoch; the first three
    # full batches are the eager warm-up, every later full one a replay.
    assert len(replays) == 3 * 15 - 3
    assert all(p.is_cuda for p in graphed.tail.parameters())
    assert _max_diff(eager, graphed) <= 1e-5
    for want, got in zip(eager.history.column("loss"), graphed.history.column("loss")):
        assert got == pytest.approx(want, rel=1e-5)


def test_full_batches_replay_and_partial_batches_run_eagerly(monkeypatch):
    calls = []

    def step(taps, y):
        calls.append(int(y.sum()))
        return taps[0].sum(dim=1, keepdim=True).mean(0)

    graphed = GraphedStep(step, torch.device("cpu"), warmup=2, backend=RecordingGraphs("cpu"))
    batches = [torch.full((4, 3), float(i)) for i in range(6)] + [torch.ones(2, 3)]
    for i, x in enumerate(batches):
        losses = graphed([x], torch.full((x.shape[0],), i))
        # Replays read the static buffers: each result is still this batch's own.
        assert losses.item() == pytest.approx(3.0 * float(x[0, 0]))
    assert graphed.eager_steps == 3  # two warm-up batches and the partial one
    assert graphed.replays == 4
    assert calls == [0, 4, 8, 12, 16, 20, 12]  # every batch trained once, in order


def test_a_failed_capture_warns_once_and_trains_on_eagerly(graphs_on_cpu):
    graphs_on_cpu.setattr(_graph_step, "_CudaGraphs", FailingGraphs)
    eager = _fit(False)
    with pytest.warns(RuntimeWarning, match="could not capture the training step") as caught:
        graphed = _fit(True)
    assert len([w for w in caught if "could not capture" in str(w.message)]) == 1
    assert _max_diff(eager, graphed) <= 1e-5


def test_a_graph_per_unfreeze_stage(graphs_on_cpu):
    def tuner():
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
        return FineTuner(
            model, num_classes=4, cache="host", cache_dtype="fp32", device="cpu", verbose=False
        )

    runs = []
    for cuda_graph in (False, True):
        ft = tuner()
        ft.fit(
            _data(500), epochs=3, batch_size=64, lr=1e-2, unfreeze=[(1, 1)], cuda_graph=cuda_graph
        )
        runs.append(ft)
    assert [b.captures for b in RecordingGraphs.instances] == [1, 1]
    assert _max_diff(*runs) <= 1e-5


def test_graphs_need_cuda_and_no_schedule_process_group_or_syncing_loss(monkeypatch):
    cuda = torch.device("cuda")
    assert "needs a CUDA device" in graph_unsupported(torch.device("cpu"), FitConfig(), 1)
    assert "scheduler='cosine'" in graph_unsupported(cuda, FitConfig(scheduler="cosine"), 1)
    assert "torch.distributed" in graph_unsupported(cuda, FitConfig(), 2)
    smoothed = FitConfig(label_smoothing=0.1, class_weights=[1.0, 2.0])
    assert "label_smoothing and class_weights" in graph_unsupported(cuda, smoothed, 1)
    with pytest.raises(FastFTValueError, match="cuda_graph=True needs a CUDA device"):
        _fit(True)
    # fit asks before any work is done, judging the fit as if it ran on a GPU:
    monkeypatch.setattr(
        _graph_step,
        "graph_unsupported",
        lambda device, cfg, world: graph_unsupported(cuda, cfg, world),
    )
    with pytest.raises(FastFTValueError, match="scheduler='onecycle'"):
        _fit(True, scheduler="onecycle")


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(FastFTValueError, match="no CUDA device"):
        FineTuner(nn.Sequential(nn.Linear(32, 10)), num_classes=4, device="cuda", verbose=False)


def test_checkpoints_of_graphed_fits_resume_to_the_same_weights(graphs_on_cpu, tmp_path):
    whole = _fit(True, epochs=3)
    ckpt = str(tmp_path / "ckpt.pt")
    _fit(True, epochs=3, checkpoint=ckpt, callbacks=[lambda ft, rec: rec["epoch"] < 2])
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    resumed = FineTuner(
        model,
        num_classes=4,
        hidden=[16],
        cache="host",
        cache_dtype="fp32",
        device="cpu",
        verbose=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        resumed.fit(
            _data(),
            epochs=3,
            batch_size=64,
            lr=1e-2,
            weight_decay=0.01,
            cuda_graph=True,
            checkpoint=ckpt,
            resume=True,
        )
    assert len(resumed.history) == 3
    assert _max_diff(whole, resumed) <= 1e-6


@pytest.mark.parametrize("first, then", [(False, True), (True, False)])
def test_a_checkpoint_resumes_with_or_without_graphs(graphs_on_cpu, tmp_path, first, then):
    """Adam's groups come back from a checkpoint as saved; the resumed fit sets them to its
    own needs."""
    ckpt = str(tmp_path / "ckpt.pt")
    whole = _fit(first, epochs=3)
    _fit(first, epochs=3, checkpoint=ckpt, callbacks=[lambda ft, rec: rec["epoch"] < 2])
    if not then:
        graphs_on_cpu.undo()  # a plain CPU Adam again: capturable groups would fail its step
    made = []
    make = engine.make_optimizer
    graphs_on_cpu.setattr(
        engine, "make_optimizer", lambda *a, **kw: made.append(make(*a, **kw)) or made[-1]
    )
    if then:
        graphs_on_cpu.setattr(_graph_step, "graph_unsupported", lambda *args: None)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    resumed = FineTuner(
        model,
        num_classes=4,
        hidden=[16],
        cache="host",
        cache_dtype="fp32",
        device="cpu",
        verbose=False,
    )
    resumed.fit(
        _data(),
        epochs=3,
        batch_size=64,
        lr=1e-2,
        weight_decay=0.01,
        cuda_graph=then,
        checkpoint=ckpt,
        resume=True,
    )
    (opt,) = made
    assert all(g["capturable"] is then for g in opt.param_groups)
    assert _max_diff(whole, resumed) <= 1e-5


def test_a_sweep_replays_all_heads_in_one_graph(graphs_on_cpu):
    def sweep(cuda_graph):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
        ft = FineTuner(
            model,
            num_classes=4,
            hidden=[16],
            cache="host",
            cache_dtype="fp32",
            device="cpu",
            verbose=False,
        )
        return ft.fit_many(
            [{"lr": 1e-2}, {"lr": 3e-3}, {"lr": 1e-2, "weight_decay": 0.1}],
            _data(),
            epochs=2,
            batch_size=64,
            cuda_graph=cuda_graph,
        )

    eager, graphed = sweep(False), sweep(True)
    (backend,) = RecordingGraphs.instances
    assert backend.captures == 1
    for a, b in zip(eager.heads, graphed.heads):
        for p, q in zip(a.parameters(), b.parameters()):
            assert (p - q).abs().max().item() <= 1e-5
