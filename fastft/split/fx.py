"""The torch.fx split: trace the edited model and cut its graph at the frozen frontier.

Modules that are wholly frozen, wholly trainable or new are traced as *leaves* (one
``call_module`` node each): fx only has to trace through the containers that mix frozen and
trainable parts, so a frozen Hugging Face encoder under a new head traces fine even though
fx could not trace the encoder itself.

A node is frozen when its module (if any) is frozen and all its inputs are frozen or model
inputs. The frontier is the set of frozen nodes read by non-frozen ones: the *taps*. A tap
must be a per-sample tensor (batch in dim 0) that depends on the input; frontier values
that are not (a shape, a dtype, a frozen parameter, a batch statistic) are recomputed in
the tail from the taps they come from, which moves the frontier down until it holds only
per-sample tensors.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx
from torch import nn

from fastft.model.calling import logits_of, structured_output, takes_keywords
from fastft.model.status import FROZEN, NEW, TRAINABLE, all_eval
from fastft.split._common import CannotSplit, batch_size


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, status: dict[int, str]):
        super().__init__()
        self.status = status

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.status.get(id(m)) in (FROZEN, NEW, TRAINABLE):
            return True
        return super().is_leaf_module(m, qualname)


class _Recorder(torch.fx.Interpreter):
    """Runs the traced graph and keeps every node's value (to check taps on real data)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n] = value
        return value


def trace(
    model: nn.Module, status: dict[int, str], keys: list[str] | None = None
) -> torch.fx.Graph:
    """Trace ``model`` (one input argument, or the keyword arguments ``keys`` of a dict input;
    other arguments fixed to their defaults)."""
    params = list(inspect.signature(model.forward).parameters.values())
    if not params:
        raise CannotSplit("forward() takes no input")
    concrete = {}
    inputs = {params[0].name} if keys is None else set(keys)
    for p in params:
        if p.name in inputs or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise CannotSplit(f"forward() needs the argument {p.name!r} besides the input")
        concrete[p.name] = p.default
    try:
        with all_eval(model):  # branches on self.training are baked in their eval form
            return _LeafTracer(status).trace(model, concrete_args=concrete or None)
    except Exception as exc:  # any tracing failure means: use the hook fallback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CannotSplit(
            f"torch.fx cannot trace it ({type(exc).__name__}: {first[:300]})"
        ) from exc


def _tap_name(n: torch.fx.Node) -> str:
    return (
        str(n.target) if n.op == "call_module" else ("input" if n.op == "placeholder" else n.name)
    )


def build(model: nn.Module, example: Any, status: dict[int, str]):
    """Return ``(prefix GraphModule, tail GraphModule, tap names, signature text)``."""
    keys = list(example) if takes_keywords(model, example) else None
    graph = trace(model, status, keys)
    full = torch.fx.GraphModule(model, graph)
    rec = _Recorder(full)
    placeholders = [str(n.target) for n in graph.nodes if n.op == "placeholder"]
    if keys is not None and not set(placeholders) <= set(keys):
        raise CannotSplit(f"the traced graph takes {placeholders}, not the input keys {keys}")
    try:
        with torch.no_grad(), all_eval(model):
            rec.run(*([example] if keys is None else [example[k] for k in placeholders]))
    except Exception as exc:
        raise CannotSplit(
            f"the traced graph does not run on the example ({type(exc).__name__}: {exc})"
        ) from exc
    values = rec.values
    _keep_logits(graph, values)

    frozen: dict[torch.fx.Node, bool] = {}
    depends: dict[torch.fx.Node, bool] = {}  # on a model input
    for n in graph.nodes:
        inputs = n.all_input_nodes
        depends[n] = n.op == "placeholder" or any(depends[a] for a in inputs)
        if n.op == "placeholder":
            frozen[n] = True
        elif n.op == "get_attr":
            frozen[n] = _attr_frozen(model, str(n.target), status)
        elif n.op == "call_module":
            frozen[n] = status.get(id(model.get_submodule(str(n.target)))) == FROZEN and all(
                frozen[a] for a in inputs
            )
        elif n.op in ("call_function", "call_method"):
            frozen[n] = all(frozen[a] for a in inputs)
        else:  # output
            frozen[n] = False

    output = next(n for n in graph.nodes if n.op == "output")
    if all(frozen[a] for a in output.all_input_nodes):
        raise CannotSplit("the model's output does not depend on any trainable module")

    batch = batch_size(example)
    while True:
        frontier = [n for n in graph.nodes if frozen[n] and any(not frozen[u] for u in n.users)]
        # Not a per-sample activation: recompute it in the tail from what it is made of.
        movable = [
            n
            for n in frontier
            if n.op != "placeholder" and not _per_sample(values.get(n), batch, depends[n])
        ]
        if not movable:
            break
        for n in movable:
            if n.op == "call_module" and any(
                True for _ in model.get_submodule(str(n.target)).parameters()
            ):
                raise CannotSplit(
                    f"the frozen module {n.target!r} returns {type(values.get(n)).__name__}, "
                    "not a per-sample tensor the cut could cache, and the trainable part "
                    "would have to run it again"
                )
            frozen[n] = False
    for n in frontier:
        if not isinstance(values.get(n), torch.Tensor):
            raise CannotSplit(
                f"the model input itself ({type(values.get(n)).__name__}) reaches a trainable "
                f"module ({', '.join(str(u.target) for u in n.users if not frozen[u])}) with "
                "nothing frozen before it"
            )
    if not any(n.op != "placeholder" for n in frontier) and not any(
        frozen[n] and n.op not in ("placeholder", "output") for n in graph.nodes
    ):
        raise CannotSplit(
            "no frozen computation runs before the trainable modules: nothing to cache"
        )

    prefix_graph = _prefix_graph(graph, frontier)
    tail_graph = _tail_graph(graph, frontier, frozen)
    prefix = torch.fx.GraphModule(model, prefix_graph, class_name="FrozenPrefixGraph")
    tail = torch.fx.GraphModule(model, tail_graph, class_name="TrainableTailGraph")
    names = _unique([_tap_name(n) for n in frontier])
    body = prefix if keys is None else KeywordInputs(prefix, placeholders)
    return body, tail, names, _signature(prefix, names)


class KeywordInputs(nn.Module):
    """Calls a traced prefix, whose inputs are the model's keyword arguments, on a dict."""

    def __init__(self, graph_module: torch.fx.GraphModule, keys: list[str]):
        super().__init__()
        self.graph_module = graph_module
        self.keys = list(keys)

    def forward(self, x: Any) -> Any:
        return self.graph_module(*[x[k] for k in self.keys])


def _keep_logits(graph: torch.fx.Graph, values: dict[torch.fx.Node, Any]) -> None:
    """When the model returns its logits inside a structure (a ModelOutput traced into a dict,
    a tuple), make the graph return the logits alone: the other entries (hidden states, a
    frozen module's whole output) must not reach the trainable part, which would then have
    to recompute them."""
    output = next(n for n in graph.nodes if n.op == "output")
    value = values.get(output)
    if not structured_output(value):
        return
    target = logits_of(value)
    node = next((n for n in graph.nodes if n.op != "output" and values.get(n) is target), None)
    if node is None:
        return
    output.args = (node,)
    graph.eliminate_dead_code()


def _attr_frozen(model: nn.Module, target: str, status: dict[int, str]) -> bool:
    owner_name, _, attr = target.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if status.get(id(owner)) == NEW:
        return False
    value = getattr(owner, attr)
    return not (isinstance(value, torch.Tensor) and value.requires_grad)


def _per_sample(value: Any, batch: int, depends: bool) -> bool:
    return (
        depends and isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch
    )


def _prefix_graph(graph: torch.fx.Graph, frontier: list[torch.fx.Node]) -> torch.fx.Graph:
    """Placeholders, the frozen nodes the taps need, and ``return (tap, ...)``."""
    needed: set[torch.fx.Node] = set()
    stack = list(frontier)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder" or n in needed:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[n] for n in frontier))
    g.lint()
    return g


def _tail_graph(
    graph: torch.fx.Graph, frontier: list[torch.fx.Node], frozen: dict
) -> torch.fx.Graph:
    """One placeholder per tap, then every non-frozen node, then the model's output."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, n in enumerate(frontier):
        env[n] = g.placeholder(f"tap{i}")
    for n in graph.nodes:
        if n.op == "output":
            g.output(torch.fx.map_arg(n.args[0], lambda a: env[a]))
        elif n.op != "placeholder" and not frozen[n]:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.lint()
    return g


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n] - 1}")
    return out


def _signature(prefix: torch.fx.GraphModule, names: list[str]) -> str:
    """The prefix's code plus the repr (type and hyper-parameters) of each module it calls."""
    lines = ["method: fx", f"taps: {names}", prefix.code.strip()]
    for n in prefix.graph.nodes:
        if n.op == "call_module":
            lines.append(f"{n.target} = {prefix.get_submodule(str(n.target))!r}")
        elif n.op == "get_attr":
            owner, _, attr = str(n.target).rpartition(".")
            t = getattr(prefix.get_submodule(owner) if owner else prefix, attr, None)
            lines.append(
                f"{n.target}: {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
    return "\n".join(lines)
