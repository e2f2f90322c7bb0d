"""Exact rewrites of an exported loss graph: the work that only recording put there, removed.

:func:`torch.export.export` records a Pyro loss as the ATen ops its eager run calls, for one set
of argument shapes. Many of them compute nothing that the loss needs, or compute a value that
is already there:

* ops whose result no one uses (Pyro computes every site's log-density, the analytic-KL
  estimator then uses only some; ``arange`` for a plate's indices);
* ``expand`` / ``reshape`` / ``view`` to a tensor's own shape, and ``broadcast_tensors`` of
  tensors that already share one shape;
* arithmetic with tensors filled with 0 or 1: a N(0, 1) prior is ``Normal(zeros, ones)``, so
  its log-density and KL divide by ones, subtract zeros, take ``ones ** 2`` and ``log(ones)``;
* a log-density negated element by element before it is summed (Bernoulli's
  ``-binary_cross_entropy_with_logits``), where negating the sum is one pass fewer over the
  largest tensor of the graph.

:func:`lean` removes them with public :mod:`torch.fx` graph edits. Every rewrite is exact in
IEEE arithmetic: ``a / 1``, ``a * 1``, ``a - 0`` and ``1 ** p`` are ``a``, ``a`` and 1 bit for bit
(``a + 0`` is not: ``-0.0 + 0.0`` is ``+0.0``, so it stays), and rounding to nearest is
symmetric in sign, so ``sum(-a)`` is ``-sum(a)`` for the same additions in the same order.
The gradients are the same too (each removed op's derivative is 1 or the identity, and
``neg`` commutes with ``sum``'s backward, a broadcast). Losses and gradients therefore stay
the eager estimator's bit for bit (tested in ``tests/inference/test_estimators.py``).

A graph that writes into a tensor in place, other than a fresh ``empty`` tensor filled with
noise (``empty(...).normal_()``, how a Normal draws), gets only dead-code elimination: an
alias rerouted past an in-place write could read the value before or after the write.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

__all__ = ["call_public_functions", "count_ops", "lean", "split_invariant"]

aten = torch.ops.aten

#: Ops that return their input's values (a view or a copy) in the shape they are given.
_RESHAPES = {aten.expand.default, aten.reshape.default, aten.view.default, aten.alias.default}

#: Factories of tensors filled with one value: the value, or the position of the fill argument.
_FILLS: dict[Any, float | int] = {
    aten.zeros.default: 0.0,
    aten.zeros_like.default: 0.0,
    aten.new_zeros.default: 0.0,
    aten.ones.default: 1.0,
    aten.ones_like.default: 1.0,
    aten.new_ones.default: 1.0,
}
_FULLS = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2}

#: In-place ops that change no value (autograd metadata only): ``torch.tensor(...)`` inside a
#: recorded function becomes a lifted constant, copied and detached in place.
_METADATA_ONLY = {aten.detach_.default}

#: Fresh tensors that an in-place random op may fill without making the graph "mutating".
_EMPTY = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default}

#: Assertions that export records and that check nothing the graph's key does not guarantee.
_ASSERTIONS = {"aten::_assert_tensor_metadata"}


def _is_assertion(node: fx.Node) -> bool:
    name = getattr(node.target, "name", None)
    return node.op == "call_function" and callable(name) and name() in _ASSERTIONS


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _tensor(node: Any) -> torch.Tensor | None:
    value = _val(node)
    return value if isinstance(value, torch.Tensor) else None


def _same_tensor(a: Any, b: Any) -> bool:
    """Whether node ``a`` can stand for node ``b``: the same shape, strides, dtype and device."""
    ta, tb = _tensor(a), _tensor(b)
    return (
        ta is not None
        and tb is not None
        and ta.shape == tb.shape
        and ta.stride() == tb.stride()
        and ta.dtype == tb.dtype
        and ta.device == tb.device
    )


def _same_values(a: Any, b: Any) -> bool:
    """Whether ``a`` holds ``b``'s elements in ``b``'s shape (strides may differ: a reshape
    to the own shape returns a view of the same memory)."""
    ta, tb = _tensor(a), _tensor(b)
    return (
        ta is not None
        and tb is not None
        and ta.shape == tb.shape
        and ta.dtype == tb.dtype
        and ta.device == tb.device
    )


def _floating(node: Any) -> bool:
    t = _tensor(node)
    return t is not None and t.dtype.is_floating_point


def fill_value(node: Any) -> float | int | None:
    """The one value every element of ``node`` holds, when a factory filled it (possibly
    expanded, reshaped or broadcast since), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in _FILLS:
        return _FILLS[node.target]
    if node.target in _FULLS:
        position = _FULLS[node.target]
        value = node.args[position] if len(node.args) > position else None
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if node.target in _RESHAPES:
        return fill_value(node.args[0])
    if node.target is operator.getitem and _is_broadcast(node.args[0]):
        return fill_value(node.args[0].args[0][node.args[1]])
    return None


def _is_broadcast(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target is aten.broadcast_tensors.default
    )


def _mutates(graph: fx.Graph) -> bool:
    """Whether an op writes into a tensor in place, other than noise drawn into a fresh
    ``empty`` tensor that nothing else reads (``empty(...).normal_()``)."""
    for node in graph.nodes:
        if node.op != "call_function" or _is_assertion(node):
            continue
        if not node.is_impure(impure_random=False) or node.target in _METADATA_ONLY:
            continue
        target = node.args[0] if node.args else None
        fresh = (
            isinstance(target, fx.Node)
            and target.op == "call_function"
            and target.target in _EMPTY
            and len(target.users) == 1
            and torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
        )
        if not fresh:
            return True
    return False


def _reroute(node: fx.Node, replacement: Any) -> None:
    node.replace_all_uses_with(replacement)


def drop_identities(graph: fx.Graph) -> None:
    """Reroute the uses of an expand / reshape / view to its own shape, and of the parts of a
    ``broadcast_tensors`` that keep their shape, to the tensor itself."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _RESHAPES and _same_values(node.args[0], node):
            _reroute(node, node.args[0])
        elif node.target is operator.getitem and _is_broadcast(node.args[0]):
            source = node.args[0].args[0][node.args[1]]
            if _same_values(source, node):
                _reroute(node, source)


def drop_fill_arithmetic(graph: fx.Graph) -> None:
    """``a / ones``, ``a * ones``, ``ones * a``, ``a - zeros`` (alpha 1), ``a / 1``, ``a * 1``
    and ``ones ** p`` are ``a`` (or ones), where the result has ``a``'s shape, dtype and
    layout; ``log(ones)`` is a tensor of zeros."""
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        target, args = node.target, node.args
        keep = None
        if target in (aten.div.Tensor, aten.mul.Tensor) and not node.kwargs:
            a, b = args[0], args[1]
            if _one(b):
                keep = a
            elif target is aten.mul.Tensor and _one(a):
                keep = b
        elif target is aten.sub.Tensor and node.kwargs.get("alpha", 1) == 1 and len(args) == 2:
            if fill_value(args[1]) == 0 or _scalar(args[1]) == 0:
                keep = args[0]
        elif target is aten.pow.Tensor_Scalar and fill_value(args[0]) == 1:
            keep = args[0]
        elif target is aten.log.default and fill_value(args[0]) == 1:
            if _same_tensor(args[0], node):
                with graph.inserting_before(node):
                    zeros = graph.call_function(aten.zeros_like.default, (args[0],))
                zeros.meta["val"] = node.meta.get("val")
                _reroute(node, zeros)
            continue
        if keep is not None and _same_tensor(keep, node):
            _reroute(node, keep)


def _scalar(value: Any) -> float | int | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _one(value: Any) -> bool:
    return _scalar(value) == 1 or fill_value(value) == 1


def _single_use(node: Any, target: Any) -> bool:
    """Whether ``node`` is a keyword-free call of ``target`` whose value one node uses."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target is target
        and len(node.users) == 1
        and not node.kwargs
    )


def sum_before_negation(graph: fx.Graph) -> None:
    """``sum(-a, dims)`` as ``-sum(a, dims)`` where ``-a`` has no other use and ``a``'s layout
    (so the order of the additions) is ``-a``'s."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (
            aten.sum.dim_IntList,
            aten.sum.default,
        ):
            continue
        negated = node.args[0]
        if not _single_use(negated, aten.neg.default):
            continue
        source = negated.args[0]
        if not (_floating(source) and _same_tensor(source, negated)):
            continue  # integers wrap; another memory layout sums in another order
        with graph.inserting_before(node):
            summed = graph.call_function(node.target, (source, *node.args[1:]), node.kwargs)
            flipped = graph.call_function(aten.neg.default, (summed,))
        summed.meta["val"] = node.meta.get("val")
        flipped.meta["val"] = node.meta.get("val")
        _reroute(node, flipped)


def fold_negations(graph: fx.Graph) -> None:
    """``(-a) * c`` as ``a * (-c)`` for a number ``c`` (negation is exact and rounding symmetric
    in sign), and a particle's loss ``-((0 - kl) + log_lik)``, as the analytic-KL estimator
    adds it up, as ``kl - log_lik`` (the same value, but for the sign of a zero loss; the
    same gradient, +1 and -1)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target is aten.mul.Tensor and len(node.args) == 2:
            negated, factor = node.args
            if _scalar(factor) is not None and _single_use(negated, aten.neg.default):
                source = negated.args[0]
                if _floating(source) and _same_tensor(source, node):
                    with graph.inserting_before(node):
                        scaled = graph.call_function(aten.mul.Tensor, (source, -factor))
                    scaled.meta["val"] = node.meta.get("val")
                    _reroute(node, scaled)
        elif node.target is aten.neg.default and _single_use(node.args[0], aten.add.Tensor):
            total = node.args[0]
            first, second = total.args
            if not (
                _single_use(first, aten.rsub.Scalar)
                and len(first.args) == 2
                and _scalar(first.args[1]) == 0
                and all(_same_tensor(v, node) for v in (first.args[0], second))
            ):
                continue
            with graph.inserting_before(node):
                difference = graph.call_function(aten.sub.Tensor, (first.args[0], second))
            difference.meta["val"] = node.meta.get("val")
            _reroute(node, difference)


def draw_in_one_call(graph: fx.Graph) -> None:
    """``empty(size).normal_(mean, std)`` as ``normal(mean, std, size)``: ATen's
    ``normal`` is that empty tensor filled by the same kernel from the same random stream."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.normal_.default:
            continue
        empty = node.args[0]
        if not (
            isinstance(empty, fx.Node)
            and empty.op == "call_function"
            and empty.target is aten.empty.memory_format
            and len(empty.users) == 1
            and len(empty.args) == 1
            and empty.kwargs.get("memory_format") in (None, torch.contiguous_format)
            and set(empty.kwargs) <= {"dtype", "device", "layout", "pin_memory", "memory_format"}
        ):
            continue
        mean = node.args[1] if len(node.args) > 1 else node.kwargs.get("mean", 0.0)
        std = node.args[2] if len(node.args) > 2 else node.kwargs.get("std", 1.0)
        options = {k: v for k, v in empty.kwargs.items() if k != "memory_format"}
        if "generator" in node.kwargs:
            options["generator"] = node.kwargs["generator"]
        with graph.inserting_before(node):
            draw = graph.call_function(
                aten.normal.float_float, (float(mean), float(std), empty.args[0]), options
            )
        draw.meta["val"] = node.meta.get("val")
        _reroute(node, draw)
        graph.erase_node(node)
        graph.erase_node(empty)


def drop_assertions(graph: fx.Graph) -> None:
    """Remove the metadata assertions export records (the graph is only ever run on
    arguments of the shapes, dtypes and devices it was recorded for)."""
    for node in list(graph.nodes):
        if _is_assertion(node):
            graph.erase_node(node)


def eliminate_common_subexpressions(graph: fx.Graph) -> None:
    """Compute a pure op once for the same inputs (an encoder run once per particle on the
    same x). For graphs run without gradients: with them, autograd would add the particles'
    contributions before the shared part instead of after, another rounding."""
    seen: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or not _pure(node):
            continue
        try:
            key = (node.target, _hashable(node.args), _hashable(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            _reroute(node, seen[key])
        else:
            seen[key] = node


def _pure(node: fx.Node) -> bool:
    """Whether ``node`` computes its value from its inputs alone, so that one computation may
    stand for several, or be kept across calls: no random draw, no in-place write, and not a
    fresh buffer (``empty``) that a later op fills in place."""
    if node.is_impure(impure_random=True) or node.target in _EMPTY:
        return False
    if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
        return False
    return not any(user.is_impure(impure_random=False) for user in node.users)


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return (type(value).__name__, *(_hashable(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor constant")
    return value


#: ATen ops and the public torch functions that dispatch to them for the same arguments.
_BINDINGS: dict[str, Any] = {
    "aten::linear": torch.nn.functional.linear,
    "aten::softplus": torch.nn.functional.softplus,
    "aten::binary_cross_entropy_with_logits": torch.binary_cross_entropy_with_logits,
    "aten::empty.memory_format": torch.empty,
    "aten::normal.float_float": torch.normal,
    "aten::normal_": torch.Tensor.normal_,
    "aten::expand": torch.Tensor.expand,
    "aten::view": torch.Tensor.view,
    "aten::reshape": torch.reshape,
    "aten::sum": torch.sum,
    "aten::sum.dim_IntList": torch.sum,
    "aten::mean": torch.mean,
    "aten::mean.dim": torch.mean,
    "aten::pow.Tensor_Scalar": torch.pow,
    "aten::pow.Tensor_Tensor": torch.pow,
    "aten::rsub.Scalar": torch.rsub,
    "aten::rsub.Tensor": torch.rsub,
    "aten::mm": torch.mm,
    "aten::matmul": torch.matmul,
    "aten::t": torch.t,
    "aten::unsqueeze": torch.unsqueeze,
    "aten::squeeze.dim": torch.squeeze,
    "aten::transpose.int": torch.transpose,
    "aten::select.int": torch.select,
    "aten::logsumexp": torch.logsumexp,
    "aten::clamp": torch.clamp,
    "aten::where.self": torch.where,
}
for _name in ("mul", "add", "sub", "div"):
    _BINDINGS[f"aten::{_name}.Tensor"] = getattr(torch, _name)
for _name in (
    "exp", "log", "neg", "log1p", "expm1", "sigmoid", "tanh", "relu", "sqrt", "abs",
    "reciprocal", "square", "lgamma", "digamma",
):  # fmt: skip
    _BINDINGS[f"aten::{_name}"] = getattr(torch, _name)


def call_public_functions(module: fx.GraphModule) -> fx.GraphModule:
    """``module`` (edited in place) calling each ATen op through its public torch function
    (``torch.mul`` for ``aten.mul.Tensor``): the same kernel and derivative, about 2 us less
    per call than the operator overload's Python wrapper. The last edit: the other rewrites
    read the operator overloads' schemas and tags."""
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "name", None)
        binding = _BINDINGS.get(name()) if callable(name) else None
        if binding is not None:
            node.target = binding
    module.recompile()
    return module


def lean(module: fx.GraphModule, differentiable: bool = True) -> fx.GraphModule:
    """``module`` (an exported loss graph, edited in place) without the work that only
    recording put there; see the module docstring. ``differentiable=False`` (for graphs only
    ever run without gradients) also merges common subexpressions."""
    graph = module.graph
    drop_assertions(graph)
    graph.eliminate_dead_code()
    if not _mutates(graph):
        drop_identities(graph)
        drop_fill_arithmetic(graph)
        drop_identities(graph)
        graph.eliminate_dead_code()
        if not differentiable:
            eliminate_common_subexpressions(graph)
        sum_before_negation(graph)
        fold_negations(graph)
        graph.eliminate_dead_code()
    draw_in_one_call(graph)
    graph.lint()
    module.recompile()
    return module


def count_ops(module: fx.GraphModule) -> dict[str, int]:
    """How many times each op is called in ``module``'s graph, by name (``"aten.linear"``)."""
    counts: dict[str, int] = {}
    for node in module.graph.nodes:
        if node.op == "call_function":
            name = (
                str(node.target).rsplit(".", 1)[0]
                if "aten" in str(node.target)
                else str(getattr(node.target, "__name__", node.target))
            )
            counts[name] = counts.get(name, 0) + 1
    return counts


def split_invariant(module: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule] | None:
    """``(prefix, rest)``: ``prefix(*inputs)`` computes the tensors of ``module`` that draw no
    noise and depend only on its inputs (an encoder's output for fixed data), and
    ``rest(*inputs, *prefix(*inputs))`` computes the rest, ``module``'s output: the same ops on
    the same values. None when nothing is worth splitting off, or when the graph writes into a
    tensor in place (a kept value must not change between calls)."""
    graph = module.graph
    if _mutates(graph):
        return None
    invariant: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            invariant.add(node)
        elif node.op == "call_function" and _pure(node):
            if all(arg in invariant for arg in node.all_input_nodes):
                invariant.add(node)
    boundary = [
        node
        for node in graph.nodes
        if node in invariant
        and node.op == "call_function"
        and isinstance(_val(node), torch.Tensor)
        and any(user not in invariant for user in node.users)
    ]
    if not boundary:
        return None
    prefix = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in invariant:
            mapping[node] = prefix.node_copy(node, lambda n: mapping[n])
    prefix.output(tuple(mapping[node] for node in boundary))
    prefix.eliminate_dead_code()
    last_input = [node for node in graph.nodes if node.op == "placeholder"][-1]
    kept, anchor = [], last_input
    for i in range(len(boundary)):
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"kept_{i}")
        kept.append(anchor)
    for node, placeholder in zip(boundary, kept, strict=True):
        placeholder.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(placeholder)
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    return fx.GraphModule(module, prefix), module
