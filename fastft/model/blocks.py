"""Progressive unfreezing: find a network's stack of blocks, make its top blocks trainable,
and give them learning rates that decay going down.

A *block* is a child of an ``nn.Sequential`` or ``nn.ModuleList`` that holds parameters and
has at least one sibling of the same class (``encoder.layer.5`` of a BERT, ``layer4.2`` of a
ResNet, ``blocks.11`` of a ViT, the Linear layers of an MLP written as one Sequential).
Blocks are listed in registration order, which is the order they run in those containers;
the *top* blocks are the last ones. Modules added by surgery (the new head) are never blocks.

Unfrozen blocks are marked on the module objects (like new modules, see
``fastft.model.status``), so the marks survive later surgery and the trainer can tell each
parameter's block depth for :func:`param_groups`.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from fastft.errors import FastFTValueError, SurgeryError
from fastft.model.status import FROZEN_STATS_ATTR, is_marked_new

__all__ = ["find_blocks", "unfreeze_blocks", "unfrozen_blocks", "trained_blocks", "param_groups"]

#: Mark of a block made trainable by :func:`unfreeze_blocks`: its depth from the top (1 = top).
DEPTH_ATTR = "_fastft_block_depth"
#: Mark of a block that has been unfrozen at some point (kept when it is frozen again): its
#: weights may differ from the pretrained ones, so a saved tuner must keep them.
TRAINED_ATTR = "_fastft_block_trained"

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _stack_members(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(key, child)`` of the children of container ``m`` that are blocks there: they hold
    parameters and have at least one sibling of the same class."""
    if not isinstance(m, _CONTAINERS):
        return []
    kids = [(k, c) for k, c in m.named_children() if not is_marked_new(c) and _has_params(c)]
    return [(k, c) for k, c in kids if sum(type(o) is type(c) for _, o in kids) >= 2]


def _is_stage(m: nn.Module) -> bool:
    """A plain Sequential/ModuleList made only of blocks (besides parameterless modules)."""
    if type(m) not in _CONTAINERS:
        return False
    members = _stack_members(m)
    return bool(members) and len(members) == sum(
        1 for c in m.children() if not is_marked_new(c) and _has_params(c)
    )


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every block of ``model``, bottom to top.

    A block that is itself a *stage* (a plain ``nn.Sequential``/``nn.ModuleList`` made only of
    blocks: torchvision's ConvNeXt, Swin and EfficientNet keep ``features`` as a Sequential of
    stage Sequentials) is not one block: its blocks are listed in its place, so that
    ``blocks=1`` means the top residual block there too, not the whole last stage.
    """
    found: list[tuple[str, nn.Module]] = []

    def add(name: str, block: nn.Module) -> None:
        if _is_stage(block):
            for key, child in _stack_members(block):
                add(f"{name}.{key}", child)
        else:
            found.append((name, block))  # a block: its insides are not blocks of their own

    def visit(prefix: str, m: nn.Module) -> None:
        members = {id(c) for _, c in _stack_members(m)}
        for key, child in m.named_children():
            name = f"{prefix}.{key}" if prefix else key
            if is_marked_new(child):
                continue
            if id(child) in members:
                add(name, child)
            else:
                visit(name, child)

    visit("", model)
    return found


def unfrozen_blocks(model: nn.Module) -> Iterator[tuple[nn.Module, int]]:
    """``(module, depth from the top)`` of every block unfrozen by :func:`unfreeze_blocks`."""
    for m in model.modules():
        depth = m.__dict__.get(DEPTH_ATTR)
        if depth is not None:
            yield m, depth


def trained_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Every block unfrozen by :func:`unfreeze_blocks` at some point, frozen again or not
    (``fit(unfreeze=[(2, 2), (4, 1)])`` trains a block and freezes it again; so does
    ``ft.unfreeze(0)`` after a fit): their weights are no longer the pretrained ones."""
    for m in model.modules():
        if m.__dict__.get(TRAINED_ATTR):
            yield m


def unfreeze_blocks(model: nn.Module, n: int, *, train_bn: bool = False) -> list[str]:
    """Make exactly the top ``n`` blocks of ``model`` trainable; return their names.

    Blocks unfrozen by an earlier call that are not among the top ``n`` now are frozen again
    (``n=0`` undoes every unfreezing); other parameters keep their ``requires_grad``.
    BatchNorm layers inside the unfrozen blocks train their affine weights but keep their
    running statistics (they run in eval mode) unless ``train_bn=True``: statistics of small
    fine-tuning batches would overwrite the pretrained ones.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise FastFTValueError(f"blocks must be a non-negative integer, got {n!r}.")
    blocks = find_blocks(model)
    if n > 0 and not blocks:
        raise SurgeryError(
            f"{type(model).__name__} has no stack of blocks (children of a Sequential/ModuleList "
            "with siblings of the same class) to unfreeze; unfreeze layers by name with "
            "fastft.surgery.unfreeze(model, names=[...]) instead."
        )
    if n > len(blocks):
        raise FastFTValueError(
            f"blocks={n} but the model has {len(blocks)} blocks ({blocks[0][0]} … {blocks[-1][0]})."
        )
    top = blocks[len(blocks) - n :]
    for m, _ in list(unfrozen_blocks(model)):  # blocks of an earlier call go back to frozen
        if all(m is not t for _, t in top):
            m.requires_grad_(False)
        _clear_marks(m)
    for depth, (_, block) in enumerate(reversed(top), start=1):
        block.requires_grad_(True)
        block.__dict__[DEPTH_ATTR] = depth
        block.__dict__[TRAINED_ATTR] = True
        for sub in block.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not train_bn:
                sub.__dict__[FROZEN_STATS_ATTR] = True
    return [name for name, _ in top]


def _clear_marks(block: nn.Module) -> None:
    block.__dict__.pop(DEPTH_ATTR, None)
    for sub in block.modules():
        sub.__dict__.pop(FROZEN_STATS_ATTR, None)


def param_groups(
    module: nn.Module, lr: float, lr_decay: float | None, weight_decay: float
) -> list[dict]:
    """Optimizer groups of ``module``'s trainable parameters with discriminative learning rates.

    The first group holds every trainable parameter outside the unfrozen blocks (the new
    layers) at ``lr``; then one group per unfrozen block, top first, at
    ``lr * lr_decay ** depth``. With ``lr_decay=None`` all parameters form one group at ``lr``.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if lr_decay is None:
        return [{"params": trainable, "lr": lr, "weight_decay": weight_decay}]
    depth_of: dict[int, int] = {}
    for block, depth in unfrozen_blocks(module):
        for p in block.parameters():
            depth_of[id(p)] = depth
    groups: dict[int, list] = {}
    for p in trainable:
        groups.setdefault(depth_of.get(id(p), 0), []).append(p)
    return [
        {"params": groups[d], "lr": lr * lr_decay**d, "weight_decay": weight_decay}
        for d in sorted(groups)
    ]
