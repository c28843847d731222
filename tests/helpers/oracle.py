"""The correctness oracle: naive frozen fine-tuning in plain PyTorch.

Runs the whole edited model every step — the frozen layers in eval mode, the new ones in
train mode — with the batch order ``torch.randperm(N, generator=seed)`` per epoch and the
same optimizer FineTuner uses. No fastft code is involved.

``FIT`` holds the fit settings the unfreezing tests give both sides.
"""

from __future__ import annotations

import torch
from torch import nn

#: Fit settings of the progressive-unfreezing tests (FineTuner.fit and naive_finetune alike).
FIT = dict(batch_size=16, lr=0.01, optimizer="adamw", weight_decay=0.01)


def index(x, rows):
    if isinstance(x, dict):
        return {k: v[rows] for k, v in x.items()}
    return x[rows]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def set_modes(model: nn.Module) -> None:
    """Frozen modules in eval mode, modules with trainable parameters in train mode."""
    model.eval()
    for m in model.modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            m.train()
            for child in m.modules():
                child.train()


def naive_finetune(
    model,
    X,
    y,
    *,
    epochs,
    batch_size,
    lr,
    optimizer="adamw",
    weight_decay=0.0,
    momentum=0.9,
    seed=0,
    loss_fn=None,
    param_groups=None,
    train_modules=(),
    keep_eval=(),
):
    """``param_groups``: optimizer groups (default: every trainable parameter at ``lr``);
    ``train_modules``: modules trained whole, in train mode with everything inside them
    (unfrozen blocks: their dropout too); ``keep_eval``: modules kept in eval mode although
    they hold trainable parameters (BatchNorm layers whose running statistics stay frozen)."""
    params = param_groups or [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    set_modes(model)
    for m in train_modules:
        m.train()
    for m in keep_eval:
        m.eval()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            rows = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(index(X, rows)), y[rows])
            loss.backward()
            opt.step()
    return model
