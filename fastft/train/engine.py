"""The training loop on a cache: one tail (``fit``) or several sharing every batch (``fit_many``).

Each epoch draws ``torch.randperm(N, generator=g)`` on a CPU generator seeded by the tuner's
seed (the same order on every device, so the naive oracle and resumed runs see the same
batches), gathers each batch of rows from the cache once and trains every tail on it.

Dropout in the tails draws from torch's global generator, which fastft neither seeds nor
forks. With several tails (a sweep), each tail with dropout draws from its own copy of that
stream, taken when the engine is made (:class:`TailStreams`): its masks are those its own
``fit`` would draw, not masks drawn after the other heads'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastft import distributed as fdist
from fastft.cache.store import Store
from fastft.model.blocks import param_groups
from fastft.model.status import float_dtype_of
from fastft.train.config import FitConfig
from fastft.train.graph_step import GraphedStep
from fastft.train.objectives import make_loss, prepare_targets

#: Runs every tail on one batch of cached taps; returns one output per tail.
ForwardAll = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def make_optimizer(
    cfg: FitConfig, groups: list[dict], *, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ``groups``. ``capturable``: Adam's step counters on
    the device, so that a CUDA graph can replay the step."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=capturable
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            groups, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=capturable
        )
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: FitConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The per-step learning-rate schedule ``cfg`` names (None for a constant rate)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total
        )
    return None


class TailStreams:
    """Torch's global random stream, one copy per tail with active dropout (see the module
    docstring): hooks put a tail's copy in place before its forward and keep where it got to
    after. Only with two or more such tails (one alone draws what its own fit draws), and not
    under a CUDA graph (a captured step cannot set the generator's state)."""

    def __init__(self, tails: Sequence[nn.Module], device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        drawing = [t for t in tails if any(_drops(m) for m in t.modules())]
        self.states: dict[int, tuple] = {}
        self.handles: list = []
        if len(drawing) < 2:
            return
        start = self._get()
        for t in drawing:
            self.states[id(t)] = start
            self.handles.append(t.register_forward_pre_hook(self._enter))
            self.handles.append(t.register_forward_hook(self._leave))

    def _get(self) -> tuple:
        return (
            torch.get_rng_state(),
            None if self.cuda is None else torch.cuda.get_rng_state(self.cuda),
        )

    def _set(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if self.cuda is not None:
            torch.cuda.set_rng_state(state[1], self.cuda)  # pragma: cuda

    def _enter(self, module: nn.Module, args) -> None:
        self._set(self.states[id(module)])

    def _leave(self, module: nn.Module, args, out) -> None:
        self.states[id(module)] = self._get()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def tap_dtype(tail: nn.Module) -> torch.dtype:
    """The dtype cached features are read in for ``tail``: its parameters' (fp32 without)."""
    return float_dtype_of(tail) or torch.float32


def _drops(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0


class Engine:
    """Optimizer, schedule, batch order and the training step of one or several tails.

    Args:
        cfg: the fit's settings.
        tails: the modules trained; each gets its own parameter group(s).
        device: where training runs.
        seed: seeds the batch order.
        n_rows: rows of the cache trained on.
        per_tail: per-tail ``lr`` / ``weight_decay`` overriding ``cfg``'s (a sweep).
        forward_all: runs all tails on a batch (default: one call per tail; a sweep passes
            a vectorized forward over heads of the same shape).
    """

    def __init__(
        self,
        cfg: FitConfig,
        tails: list[nn.Module],
        *,
        device: torch.device,
        seed: int,
        n_rows: int,
        per_tail: list[dict] | None = None,
        forward_all: ForwardAll | None = None,
    ):
        self.cfg, self.tails, self.device, self.n_rows = cfg, tails, device, n_rows
        per_tail = per_tail or [{} for _ in tails]
        self.loss_fn = make_loss(
            cfg.loss, label_smoothing=cfg.label_smoothing, class_weights=cfg.class_weights
        ).to(device)
        groups = []
        for tail, extra in zip(tails, per_tail):
            # One group per tail, or with lr_decay one per unfrozen block besides the new layers.
            groups += param_groups(
                tail,
                extra.get("lr", cfg.lr),
                cfg.lr_decay,
                extra.get("weight_decay", cfg.weight_decay),
            )
        self.optimizer = make_optimizer(cfg, groups, capturable=cfg.cuda_graph)
        self.steps_per_epoch = math.ceil(n_rows / cfg.batch_size)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.generator = torch.Generator().manual_seed(seed)
        # Under torch.distributed each tail trains inside DistributedDataParallel.
        self.modules = [fdist.wrap(t, device) for t in tails]
        self.forward_all = forward_all or (lambda taps: [m(*taps) for m in self.modules])
        self.world = fdist.rank_and_world()[1]
        self.share = 1.0  # this rank's share of the current global batch (see run_epoch)
        self.graphed = GraphedStep(self.step, device) if cfg.cuda_graph else None
        self.streams = None if cfg.cuda_graph else TailStreams(tails, device)

    def release_graph(self) -> None:
        """Let a CUDA graph's memory pool go: the graph and the .grad tensors captured in it;
        and take the per-tail random streams' hooks off the tails."""
        if self.streams is not None:
            self.streams.remove()
        if self.graphed is not None:
            self.graphed = None
            self.optimizer.zero_grad(set_to_none=True)

    def current_lrs(self) -> list[float]:
        """The learning rate of each parameter group now."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def run_epoch(self, cache: Store, labels: torch.Tensor) -> list[float]:
        """One epoch over the cache; returns the mean training loss of each tail."""
        cfg = self.cfg
        order = torch.randperm(self.n_rows, generator=self.generator)
        view = None
        if cache.num_views > 1:  # one augmented view per sample per epoch
            view = torch.randint(cache.num_views, (self.n_rows,), generator=self.generator)
        # The order goes where the cache is read (the device; the CPU for a disk cache) and
        # where the labels are, each once per epoch: no index copy and no host
        # synchronisation per step.
        where = cache.index_device(self.device)
        perm = order.to(where, non_blocking=True)
        view = None if view is None else view.to(where, non_blocking=True)
        label_perm = (
            perm if labels.device == perm.device else order.to(labels.device, non_blocking=True)
        )
        for t in self.tails:
            t.train()
        totals = torch.zeros(len(self.tails), dtype=torch.float64, device=self.device)
        # The tails' own dtype (a .half() model trains fp16 layers); bf16 under amp.
        out_dtype = torch.bfloat16 if cfg.amp == "bf16" else tap_dtype(self.tails[0])
        # The rows are a permutation of the cache's own: their range checks would only cost
        # a host synchronisation per step on CUDA (the kernels still check what they read).
        with cache.deferred_checks():
            for start in range(0, self.n_rows, cfg.batch_size):
                global_rows = perm[start : start + cfg.batch_size]
                rows = fdist.local_rows(global_rows)  # all of them on a single process
                taps = cache.gather_shaped(
                    rows,
                    view=None if view is None else view[rows],
                    out_dtype=out_dtype,
                    check_rows=False,
                )
                taps = [t.to(self.device, non_blocking=True) for t in taps]
                y = labels[fdist.local_rows(label_perm[start : start + cfg.batch_size])]
                # Each rank's mean is weighted by its share of the global batch; DDP then averages
                # over ranks, which gives exactly the gradient of the global batch mean.
                self.share = rows.numel() * self.world / global_rows.numel()
                step_losses = (
                    self.graphed(taps, y) if self.graphed is not None else self.step(taps, y)
                )
                if self.scheduler is not None:
                    self.scheduler.step()
                totals += step_losses.double() * rows.numel()
        return (fdist.all_reduce_sum(totals) / self.n_rows).cpu().tolist()

    def step(self, taps: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns each tail's loss (detached, fp32).

        No host synchronisation, so that it can be captured as a CUDA graph.
        """
        self.optimizer.zero_grad(set_to_none=True)
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture.
        with torch.autocast(
            self.device.type,
            dtype=torch.bfloat16,
            enabled=self.cfg.amp == "bf16",
            cache_enabled=False,
        ):
            step_losses = [self.loss(out, y) for out in self.forward_all(taps)]
        total = torch.stack(step_losses).sum() if len(step_losses) > 1 else step_losses[0]
        (total * self.share if self.world > 1 else total).backward()
        self.optimizer.step()
        return torch.stack([loss.detach().float() for loss in step_losses])

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = out.float()
        return self.loss_fn(out, prepare_targets(y, self.cfg.loss, out))

    def state_dict(self) -> dict:
        """Optimizer, schedule and batch-order state: what a checkpoint needs to go on exactly."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "capturable" in self.optimizer.defaults:
            # The groups come back as they were saved: make them what this fit needs (a fit
            # resumed with or without cuda_graph), Adam's step counters on the matching side.
            capturable = self.cfg.cuda_graph
            for group in self.optimizer.param_groups:
                group["capturable"] = capturable
                for p in group["params"]:
                    st = self.optimizer.state.get(p, {})
                    if "step" in st:
                        st["step"] = st["step"].to(
                            device=p.device if capturable else "cpu", dtype=torch.float32
                        )
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
