"""The traced-graph pass: conv chains written inside a module's ``forward()`` (a ResNet's stem and
blocks, inverted residuals, squeeze-excite, plain ``nn.Sequential``s), found with torch.fx and
rewritten to call ``conv.run_conv_chain``.

For every module the walk visits that runs a conv, ``forward()`` is traced with each submodule a leaf,
except containers that only run their children in order: ``nn.Sequential`` without a forward of its
own, and a conv unit (a module whose children are one conv plus norms, activations and drops, such as
timm's ``ConvNormAct``). So a chain crossing into them is seen whole: a block's last conv -> BN inside
a Sequential, then the block's own add and ReLU. In the graph a chain is conv -> (norm) -> (drops) ->
(+ residual) -> (activation), each value used only by the next; its nodes become one
``run_conv_chain`` call.

The module keeps its class, attributes and submodules (same Parameters, same state_dict); only
``forward`` becomes an instance attribute (``common.wrap_forward``) running the rewritten graph
(:class:`TracedForward`). It is traced once per mode: a forward that branches on ``self.training``
runs the graph of its current mode, and the stock forward runs while a traced-through submodule is
in the other mode. A module whose forward torch.fx
cannot trace, or whose arguments have defaults (tracing would fix their values), is left as it is
and reported with why; its children are visited on their own.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import types

import torch

from vkernels.patch.common import wrap_forward, wrapped_forward
from vkernels.patch.conv import (
    activation_of_call,
    activation_of_module,
    is_conv,
    is_drop,
    is_residual_add,
    is_norm,
    norm_activation,
    run_conv_chain,
)


def _is_conv_unit(module) -> bool:
    children = list(module.children())
    convs = sum(is_conv(c) for c in children)
    return convs == 1 and all(is_conv(c) or is_norm(c) or activation_of_module(c) or is_drop(c) for c in children)


def _traced_through(module, conv_units: bool) -> bool:
    if isinstance(module, torch.nn.Sequential) and type(module).forward is torch.nn.Sequential.forward:
        return True
    return conv_units and _is_conv_unit(module)


def _graph_leaves(module, conv_units: bool):
    """The submodules that will be leaves of the module's traced graph (children, and the children of
    traced-through ones)."""
    for child in module.children():
        if _traced_through(child, conv_units):
            yield from _graph_leaves(child, conv_units)
        else:
            yield child


def _may_chain(leaves) -> bool:
    """A conv among the leaves and a norm or an activation module: then a failed trace may leave chains
    unfused, worth a line in the report (functional activations show only in a traced graph)."""
    return any(map(is_conv, leaves)) and any(is_norm(m) or activation_of_module(m) for m in leaves)


def _timm_autowrap_functions() -> tuple:
    """Functions timm registers for torch.fx not to trace into (shape asserts, padding helpers)."""
    registry = sys.modules.get("timm.layers._fx")
    return tuple(f for f in getattr(registry, "_autowrap_functions", ()) if callable(f))


class _ChainTracer(torch.fx.Tracer):
    def __init__(self, conv_units: bool) -> None:
        super().__init__(autowrap_functions=_timm_autowrap_functions())
        self.conv_units = conv_units
        self.traced_through: list[str] = []

    def is_leaf_module(self, module, qualified_name) -> bool:
        if _traced_through(module, self.conv_units):
            self.traced_through.append(qualified_name)
            return False
        return True


def _trace(module, training: bool, conv_units: bool):
    """(graph, paths of the submodules traced through) of module.forward in the given mode; every
    module's own mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    tracer = _ChainTracer(conv_units)
    try:
        module.train(training)
        graph = tracer.trace(module)
    finally:
        for m, mode in modes:
            m.training = mode
    return graph, tracer.traced_through


def _sole_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _called_on(node, value, modules, recognise) -> bool:
    """node is a call of a submodule that ``recognise`` accepts, on ``value`` alone."""
    return (node is not None and node.op == "call_module" and node.args == (value,) and not node.kwargs
            and bool(recognise(modules.get(node.target))))


def _conv_cost(conv) -> int:
    """Multiply-adds per output element."""
    return conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]


def _pending_conv_cost(node, modules) -> int:
    """The cost of the conv whose chain, not fused yet, ends at ``node`` (through drops and a norm), or
    0: when both operands of an add end conv chains (a ResNet block and its downsample, RepVGG's
    3x3 and 1x1 branches), the costlier conv takes the add, whichever runs first."""
    while (node.op == "call_module" and node.args and isinstance(node.args[0], torch.fx.Node)
           and (is_drop(modules.get(node.target)) or is_norm(modules.get(node.target)))):
        node = node.args[0]
    module = modules.get(node.target) if node.op == "call_module" else None
    return _conv_cost(module) if is_conv(module) else 0


def _match_chain(conv_node, modules):
    """The chain starting at a conv node: dict of its nodes and what it computes, or None when nothing
    follows the conv that it can fuse."""
    chain = dict(conv=conv_node, norm=None, drops=[], add=None, residual=None, act=None, activation=None,
                 activation_in_norm=False)
    last = conv_node
    user = _sole_user(last)
    if _called_on(user, last, modules, is_norm):
        chain["norm"], last = user, user
        chain["activation"] = norm_activation(modules[user.target])
        chain["activation_in_norm"] = chain["activation"] is not None
        user = _sole_user(last)
    if not chain["activation_in_norm"]:
        drops, end = [], last
        while _called_on(user, end, modules, is_drop):
            drops.append(user)
            end = user
            user = _sole_user(end)
        if user is not None and is_residual_add(user) and end in user.args and user.args[0] is not user.args[1]:
            residual = user.args[1] if user.args[0] is end else user.args[0]
            if _pending_conv_cost(residual, modules) <= _conv_cost(modules[conv_node.target]):
                chain["add"], chain["residual"] = user, residual
                end = user
                user = _sole_user(end)
        module_activation = _called_on(user, end, modules, activation_of_module)
        call_activation = user is not None and user.args[:1] == (end,) and activation_of_call(user)
        if module_activation or call_activation:
            chain["act"] = user
            chain["activation"] = activation_of_module(modules[user.target]) if module_activation else call_activation
        if chain["add"] is not None or chain["act"] is not None:  # drops count only before what they lead to
            chain["drops"] = drops
    if chain["norm"] is None and chain["add"] is None and chain["activation"] is None:
        return None
    return chain


def _describe(chain) -> str:
    parts = [chain["conv"].target, *(n.target for n in (chain["norm"], *chain["drops"]) if n is not None)]
    if chain["add"] is not None:
        parts.append("residual")
    if chain["activation"] is not None and not chain["activation_in_norm"]:
        parts.append(chain["activation"][0])
    return "+".join(parts)


def _rewrite_chains(graph, modules, backend) -> list[str]:
    """Replaces each chain of the graph with a run_conv_chain call; returns their descriptions."""
    found = []
    for node in list(graph.nodes):
        if node.graph is not graph or node.op != "call_module" or not is_conv(modules.get(node.target)):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        chain = _match_chain(node, modules)
        if chain is None:
            continue
        nodes = [n for n in (chain["conv"], chain["norm"], *chain["drops"], chain["add"], chain["act"]) if n is not None]
        last = nodes[-1]
        activation, negative_slope = chain["activation"] or (None, 0.0)
        with graph.inserting_before(last):
            attribute = graph.get_attr
            fused = graph.call_function(
                run_conv_chain,
                (chain["conv"].args[0], chain["residual"], attribute(chain["conv"].target),
                 None if chain["norm"] is None else attribute(chain["norm"].target),
                 tuple(attribute(d.target) for d in chain["drops"])),
                dict(activation=activation, negative_slope=float(negative_slope),
                     activation_in_norm=chain["activation_in_norm"], backend=backend),
            )
        last.replace_all_uses_with(fused)
        for n in reversed(nodes):
            graph.erase_node(n)
        found.append(_describe(chain))
    return found


class TracedForward:
    """A module's forward rewritten from its torch.fx graphs, one per mode: the generated Python source,
    compiled once. The stock forward runs in a mode without a graph, or while a traced-through
    submodule is in the other mode. It holds no module (it gets it with each call), so deep copies
    share it; pickled as its source, with the modules among the source's globals by name, so a
    patched model can be saved whole."""

    def __init__(self, graphs: dict[bool, torch.fx.Graph], traced_through: list[str], chains: dict[bool, list[str]]):
        self.traced_through, self.chains = traced_through, chains
        self._sources = {}
        for training, graph in graphs.items():
            code = graph.python_code(root_module="self")
            self._sources[training] = (code.src, {name: _ModuleName(value.__name__) if isinstance(value, types.ModuleType)
                                                  else value for name, value in code.globals.items()})
        self._compile()

    def _compile(self) -> None:
        self._functions = {}
        for training, (source, names) in self._sources.items():
            namespace = {name: importlib.import_module(value) if isinstance(value, _ModuleName) else value
                         for name, value in names.items()}
            exec(compile(source, "<vkernels.patch rewritten forward>", "exec"), namespace)  # noqa: S102
            self._functions[training] = namespace["forward"]

    def __getstate__(self):
        return {name: value for name, value in self.__dict__.items() if name != "_functions"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compile()

    def __deepcopy__(self, memo):
        return self

    def __call__(self, module, backend, *args, **kwargs):  # backend: the graphs carry it
        traced = self._functions.get(module.training)
        if traced is None or any(module.get_submodule(path).training != module.training for path in self.traced_through):
            return type(module).forward(module, *args, **kwargs)
        return traced(module, *args, **kwargs)


class _ModuleName(str):
    """A Python module among a generated forward's globals, kept by name."""


def _signature_problem(module) -> str | None:
    if "forward" in module.__dict__:
        return "its forward was already replaced on the instance"
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or parameter.default is not parameter.empty:
            return f"forward() takes {parameter}: tracing would fix its value"
    return None


def fuse_conv_chains(module, prefix, backend, report) -> None:
    """Container rule: rewrites ``module.forward`` so that its conv chains run as one fused conv each."""
    if (type(module).forward is torch.nn.Module.forward  # containers without a forward (ModuleDict)
            or isinstance(wrapped_forward(module), TracedForward)):
        return
    leaves = list(_graph_leaves(module, conv_units=True))
    if not any(map(is_conv, leaves)):
        return
    path = prefix[:-1]
    problem, traced = _signature_problem(module), None
    if problem is None:
        # a conv unit whose forward torch.fx cannot trace must not cost its parent the parent's own
        # chains: a failed trace is retried with conv units as leaves
        for conv_units in (True, False):
            try:
                traced = {training: _trace(module, training, conv_units)
                          for training in (module.training, not module.training)}
                break
            except Exception as error:  # torch.fx raises many kinds: any failure leaves the module as it is
                reason = (str(error).strip().splitlines() or [""])[0]
                problem = problem or f"torch.fx cannot trace it ({type(error).__name__}: {reason[:160]})"
    if traced is None:
        if _may_chain(leaves):
            report.leave(path, f"conv chains in forward() not fused: {problem}")
        return
    modules = dict(module.named_modules())
    chains = {training: _rewrite_chains(graph, modules, backend) for training, (graph, _) in traced.items()}
    if not any(chains.values()):
        return
    graphs = {training: graph for training, (graph, _) in traced.items()}
    wrap_forward(module, TracedForward(graphs, traced[module.training][1], chains), backend)
    report.replaced(path, f"forward() with fused conv chains: {', '.join(chains[module.training])}")
