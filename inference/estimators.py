"""JIT-compiled ELBO estimators: Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO``, traced once.

The loss is exactly the plain estimator's (Kingma & Welling 2014, eq. 3):

    loss = -ELBO = -(1/S) sum_s [log p(x, z_s) - log q(z_s | x)],   z_s ~ q(z | x)

with the KL term in closed form for :class:`JitTraceMeanField_ELBO`. The whole loss (guide,
model replay, log-densities) is recorded once with :func:`torch.jit.trace` and then run as one
graph, which removes Pyro's per-step Python work.

Differences from ``pyro.infer.JitTrace_ELBO`` / ``JitTraceMeanField_ELBO`` (Pyro 1.9.2):

* a graph is traced once per model/guide pair, argument shapes and keyword values, so a
  ragged last mini-batch gets its own graph instead of reusing one traced at another size;
  Pyro's ``JitTraceMeanField_ELBO`` looks up ``_loss_and_surrogate_loss`` but stores
  ``_differentiable_loss`` and so re-traces on every call;
* model and guide are identified by the function and, for bound methods, the instance, so
  ``vae.model`` (a new bound-method object at each attribute access) finds its graph again;
* tracing runs under a forked random state, so the first call consumes the same noise as
  every later call and as the plain estimator: for shared noise the losses agree;
* a param-only ``poutine.trace`` around a call still sees the parameters;
* the graph is interpreted without the profiling executor's optimizations, so its backward
  runs ATen's own derivative kernels.

For the built-in models with their own guides (the defaults) the loss and gradients are
bit-identical to the eager estimator's for shared noise (tested with ``torch.equal``). In
general they agree to floating-point rounding, the last bits: where Pyro multiplies scales as
Python floats (``poutine.scale`` inside a subsampled plate), reads a constrained parameter more
than once, averages several particles' gradients, or inside ``MultivariateNormal.log_prob``, the
graph can round or add up in another order.

Like Pyro's JIT estimators they need models of static structure whose tensor inputs are
positional arguments and whose other inputs are keyword arguments.

Reference: D. P. Kingma and M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import is_identically_zero
from pyro.poutine.runtime import _PYRO_STACK

from models.structure import has_static_structure

__all__ = ["COMPILED", "JitTrace_ELBO", "JitTraceMeanField_ELBO", "TracedLoss", "is_static_pair"]

log = logging.getLogger(__name__)


def is_static_pair(model: Callable, guide: Callable) -> bool:
    """Whether a model and guide may be traced: both declared static
    (:func:`models.structure.static_structure`), a Pyro autoguide counting as static as the
    model it was built from."""
    if not has_static_structure(model):
        return False
    return has_static_structure(guide) or isinstance(guide, AutoGuide)


def _identity(fn: Callable) -> Hashable:
    """A key for ``fn`` that is stable across accesses of the same bound method."""
    owner = getattr(fn, "__self__", None)
    if owner is not None and hasattr(fn, "__func__"):
        return (id(owner), id(fn.__func__))
    return id(fn)


class RecentByFunction:
    """The values last computed for a few model/guide functions, most recently used kept.

    Keyed by the functions' identity (a bound method's owner and function, so ``vae.model``
    finds its entry again) and an extra hashable key. Each entry holds the functions, so their
    ids cannot be reused by other objects while it lives.
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: dict[Hashable, tuple[tuple[Callable, ...], Any]] = {}

    def get(self, fns: tuple[Callable, ...], key: Hashable, make: Callable[[], Any]) -> Any:
        """The value for ``fns`` and ``key``, computed by ``make()`` if absent."""
        full = (tuple(_identity(fn) for fn in fns), key)
        entry = self._entries.pop(full, None)
        if entry is None:
            entry = (fns, make())
        self._entries[full] = entry  # most recently used last
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))
        return entry[1]

    def values(self) -> list[Any]:
        return [value for _, value in self._entries.values()]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _freeze(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    hash(value)
    return value


class TracedLoss:
    """``fn(*args, **kwargs)`` run as a graph traced once per argument shapes and keywords.

    ``fn`` is a Pyro function returning a scalar tensor. Its parameters (``pyro.param`` and
    ``pyro.module`` sites) become inputs of the graph, so gradients flow to the param store.
    ``compilations`` counts the graphs traced so far. ``differentiable=False`` (for graphs only
    ever run without gradients) allows rewrites that keep every value but would accumulate a
    gradient in another order; ``hoist=True`` on top of it splits off the part of the graph
    that draws no random numbers, which :meth:`call` with a memo computes once for repeated
    calls on the same inputs.
    """

    def __init__(
        self, fn: Callable[..., torch.Tensor], differentiable: bool = True, hoist: bool = False
    ):
        if hoist and differentiable:
            raise ValueError("hoisting is for graphs run without gradients (differentiable=False)")
        self.fn = fn
        self.differentiable = differentiable
        self.hoist = hoist
        self.compilations = 0
        self._graphs: dict[Hashable, tuple[list[str], Any]] = {}

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.call(None, *args, **kwargs)

    def call(self, memo: dict | None, *args, **kwargs) -> torch.Tensor:
        """``fn(*args, **kwargs)``; with a ``memo`` (``hoist=True`` only), the values
        that do not depend on random draws are computed at the first call and kept in it. The
        caller promises that parameters and arguments stay the same while it uses the memo."""
        key = (_freeze(args), _freeze(kwargs))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._trace(args, kwargs)
        names, graph = entry
        if _PYRO_STACK:  # let enclosing handlers (e.g. a param-only trace) see the parameters
            params = [pyro.param(name).unconstrained() for name in names]
        else:
            store = dict(pyro.get_param_store().named_parameters())
            params = [store[name] for name in names]
        # Plain interpretation of the graph, every op recorded by eager autograd. The profiling
        # executor's optimization would replace backward kernels such as softplus_backward by
        # symbolic formulas of elementwise ops: about 1.5x slower on CPU at full batch.
        with torch.jit.optimized_execution(False):
            if isinstance(graph, _Hoisted):
                return graph((*params, *args), memo, key)
            return graph(*params, *args)

    def _trace(self, args: tuple, kwargs: dict) -> tuple[list[str], Any]:
        devices = sorted({a.device.index or 0 for a in args if _is_cuda(a)})
        with torch.random.fork_rng(devices=devices):
            # one eager run (validated if validation is on) creates and names the parameters
            with poutine.trace(param_only=True) as capture:
                self.fn(*args, **kwargs)
            names = sorted(capture.trace.nodes)
            params = tuple(pyro.param(name).unconstrained() for name in names)

            def replayed(*params_and_args):
                constrained = {name: pyro.param(name) for name in names}
                return poutine.replay(self.fn, params=constrained)(
                    *params_and_args[len(names) :], **kwargs
                )

            with (
                pyro.validation_enabled(False),
                warnings.catch_warnings(),
                _default_dtype(args),
            ):
                warnings.simplefilter("ignore")  # TracerWarnings on Python ints from shapes
                try:
                    traced = torch.jit.trace(replayed, params + tuple(args), check_trace=False)
                except (RuntimeError, TypeError, ValueError) as exc:  # cannot be recorded
                    log.warning("cannot trace the loss, running it eagerly: %s", exc)
                    self.compilations += 1
                    return names, _Eager(self.fn, len(names), kwargs)
                # constant propagation creates tensors at the default dtype, as tracing did
                try:
                    lean = _lean(traced.graph, self.differentiable)
                except RuntimeError as exc:  # a TorchScript pass that cannot handle an op
                    log.warning("running the traced graph unoptimized: %s", exc)
                    lean = traced.graph.copy()
        self.compilations += 1
        if self.hoist:
            return names, _Hoisted(lean)
        return names, torch._C._create_function_from_graph("elbo_loss", lean)


class _Eager:
    """Stands in for a graph that could not be traced: runs ``fn`` itself (same numbers)."""

    def __init__(self, fn: Callable[..., torch.Tensor], num_params: int, kwargs: dict):
        self.fn, self.num_params, self.kwargs = fn, num_params, kwargs

    def __call__(self, *params_and_args) -> torch.Tensor:
        return self.fn(*params_and_args[self.num_params :], **self.kwargs)


class _Hoisted:
    """A graph split into a prefix, the values that draw no random numbers (an encoder's output
    for fixed data, say), and the rest, which takes them as extra inputs. Without gradients the
    prefix's values are the same at every call on the same inputs, so a memo keeps them."""

    def __init__(self, graph: torch.Graph):
        try:
            split = _split_invariant(graph)
        except RuntimeError as exc:  # a TorchScript pass that cannot handle an op
            log.warning("not hoisting the invariant part of the graph: %s", exc)
            split = None
        if split is None:
            self.prefix, self.main = None, torch._C._create_function_from_graph("draw", graph)
        else:
            prefix, main = split
            self.prefix = torch._C._create_function_from_graph("invariant", prefix)
            self.main = torch._C._create_function_from_graph("draw", main)

    def __call__(self, inputs: tuple, memo: dict | None, key: Hashable) -> torch.Tensor:
        if self.prefix is None:
            return self.main(*inputs)
        values = memo.get(key) if memo is not None else None
        if values is None:
            values = self.prefix(*inputs)
            values = values if isinstance(values, tuple) else (values,)
            if memo is not None:
                memo[key] = values
        return self.main(*inputs, *values)


#: Structural nodes that compute nothing random.
_STRUCTURAL = {
    "prim::Constant",
    "prim::ListConstruct",
    "prim::ListUnpack",
    "prim::TupleConstruct",
    "prim::TupleUnpack",
    "prim::NumToTensor",
}

#: Words in the names of ATen's random ops (JIT's own list misses some, e.g. _standard_gamma).
_RANDOM_WORDS = (
    "rand",
    "normal",
    "bernoulli",
    "poisson",
    "multinomial",
    "gamma",
    "dirichlet",
    "binomial",
    "exponential",
    "geometric",
    "cauchy",
    "uniform",
    "dropout",
)


def _deterministic(node: torch.Node) -> bool:
    """Whether ``node`` certainly draws no random numbers: an ATen op outside the random ones,
    or a structural node. A Python autograd function (``prim::PythonOp``, e.g. the Beta's
    rsample) or anything else unknown counts as random."""
    kind = node.kind()
    if kind in _STRUCTURAL:
        return True
    if not kind.startswith("aten::") or node.isNondeterministic():
        return False
    return not any(word in kind for word in _RANDOM_WORDS)


def _split_invariant(graph: torch.Graph) -> tuple[torch.Graph, torch.Graph] | None:
    """(prefix, main) for :class:`_Hoisted`, or None when nothing is worth hoisting or the graph
    mutates a tensor in place (a kept value must not change between calls)."""
    main = graph.copy()
    nodes = list(main.nodes())
    if any(node.kind().endswith("_") or list(node.blocks()) for node in nodes):
        return None
    invariant = set(main.inputs())
    hoisted = []
    for node in nodes:
        if not _deterministic(node) or not all(v in invariant for v in node.inputs()):
            continue
        invariant.update(node.outputs())
        hoisted.append(node)
    inside = set(hoisted)
    boundary = []  # tensors computed by the prefix and used by the rest
    for node in hoisted:
        if node.kind() == "prim::Constant":
            continue
        for out in node.outputs():
            if not isinstance(out.type(), torch._C.TensorType):
                continue
            if any(use.user not in inside for use in out.uses()):  # the rest, or the return
                boundary.append(out)
    if not boundary:
        return None
    prefix = torch._C.Graph()
    mapping = {}
    for value in main.inputs():
        mapping[value] = prefix.addInput()
        mapping[value].setType(value.type())
    for node in hoisted:
        clone = prefix.createClone(node, lambda v: mapping[v])
        prefix.appendNode(clone)
        for old, new in zip(node.outputs(), clone.outputs(), strict=True):
            mapping[old] = new
    for value in boundary:
        prefix.registerOutput(mapping[value])
    prefix.makeMultiOutputIntoTuple()
    torch._C._jit_pass_dce(prefix)
    for value in boundary:
        replacement = main.addInput()
        replacement.setType(value.type())
        value.replaceAllUsesWith(replacement)
    torch._C._jit_pass_dce(main)
    return prefix, main


def _lean(graph: torch.Graph, differentiable: bool = True) -> torch.Graph:
    """A copy of a traced loss graph without the work that only tracing put there.

    A graph is traced (and looked up) for one set of argument shapes, so the shape arithmetic
    the tracer recorded (``x.shape[0]``, ``torch.arange(batch)``, the plate's N / B) folds to
    constants, and expand / reshape / broadcast_tensors to a tensor's own shape are identities.
    Distributions built on filled tensors (a N(0, 1) prior is ``Normal(zeros, ones)``) divide
    by ones and subtract zeros, which are identities in floating point too, and the tracer
    records ``torch.normal(zeros, ones)`` where the eager code draws ``empty().normal_()``.
    Removing all of these changes no value and no gradient (checked bit for bit in the tests
    against the plain estimators); it removes three quarters of the nodes.

    The hand-written rewrites reroute values to aliases, so a graph that mutates any tensor in
    place (``mask[0] = 0`` on a tensor of ones, say) gets only TorchScript's own passes.
    """
    graph = graph.copy()
    mutates = any(_in_place(node) for node in graph.nodes())
    torch._C._jit_pass_peephole(graph, False)  # aten::size of a tensor of known shape -> constant
    torch._C._jit_pass_constant_pooling(graph)
    _merge_lists(graph)  # one size list for zeros(size) and ones(size)
    if not mutates:
        _drop_identities(graph)
        _fold_fills(graph)
        _drop_fill_arithmetic(graph)  # before constant propagation folds the fills into tensors
        if not differentiable:  # same values; a gradient would add up in another order
            _negate_the_smaller_operand(graph)
            _elementwise_before_expand(graph)
        torch._C._jit_pass_dce(graph)
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_constant_pooling(graph)
    if not differentiable:
        # Common subexpressions (an encoder run once per particle on the same x) are computed
        # once: the same values. With gradients, autograd would then add the particles'
        # contributions before the shared part instead of after: another rounding.
        torch._C._jit_pass_cse(graph)
    if not mutates:
        _drop_identities(graph)
        torch._C._jit_pass_dce(graph)
        _sum_before_negation(graph)
    torch._C._jit_pass_dce(graph)
    return graph


def _merge_lists(graph: torch.Graph) -> None:
    """Give list constructions with the same inputs one value (after constant pooling, two
    ``[B, L]`` size lists are the same constants), without touching any tensor op."""
    seen: dict[tuple, torch.Value] = {}
    for node in graph.nodes():
        if node.kind() != "prim::ListConstruct":
            continue
        key = tuple(node.inputs())
        if key in seen and seen[key].type() == node.output().type():
            node.output().replaceAllUsesWith(seen[key])
        else:
            seen.setdefault(key, node.output())


def _in_place(node: torch.Node) -> bool:
    """An ATen op that writes into one of its inputs (``add_``, ``copy_``, ``fill_``...)."""
    kind = node.kind()
    return kind.endswith("_") and not kind.endswith("__")


def _sum_before_negation(graph: torch.Graph) -> None:
    """Rewrite ``sum(-a, dims)`` as ``-sum(a, dims)`` where ``-a`` has no other use.

    A log-density such as Bernoulli's, ``-binary_cross_entropy_with_logits(...)``, is negated
    element by element and then summed over its event dims; negating the sums instead saves a
    pass over the largest tensor of the graph. Rounding to nearest is symmetric in sign, so
    the same additions in the same order (same layout) give exactly the negated sum, and the
    gradient is the same -1 per element. (A sum of only -0.0 becomes -0.0 instead of +0.0.)
    """
    for node in graph.nodes():
        if node.kind() != "aten::sum" or node.inputsAt(0).node().kind() != "aten::neg":
            continue
        negated = node.inputsAt(0)
        if len(negated.uses()) != 1 or len(list(node.inputs())) != 4:
            continue
        source = negated.node().inputsAt(0)
        if not (_floating(source) and _same_tensor_type(source, negated)):
            continue  # integers wrap; another memory layout sums in another order
        summed = graph.create("aten::sum", [source, *list(node.inputs())[1:]])
        summed.insertBefore(node)
        summed.output().setType(node.output().type())
        flipped = graph.create("aten::neg", [summed.output()])
        flipped.insertBefore(node)
        flipped.output().setType(node.output().type())
        node.output().replaceAllUsesWith(flipped.output())


_FILLS = {
    "aten::zeros": 0.0,
    "aten::zeros_like": 0.0,
    "aten::new_zeros": 0.0,
    "aten::ones": 1.0,
    "aten::ones_like": 1.0,
    "aten::new_ones": 1.0,
}


def _fill(value: torch.Value) -> float | None:
    """0.0 or 1.0 if ``value`` is a tensor that a zeros / ones factory filled, else None."""
    return _FILLS.get(value.node().kind())


def _same_tensor_type(a: torch.Value, b: torch.Value) -> bool:
    """Whether ``a`` can stand for ``b``: same static shape, strides, dtype and device."""
    ta, tb = a.type(), b.type()
    return (
        isinstance(ta, torch._C.TensorType)
        and isinstance(tb, torch._C.TensorType)
        and _sizes(a) is not None
        and _sizes(a) == _sizes(b)
        and ta.strides() is not None
        and ta.strides() == tb.strides()
        and ta.dtype() is not None
        and ta.dtype() == tb.dtype()
        and ta.device() is not None
        and ta.device() == tb.device()
    )


def _floating(value: torch.Value) -> bool:
    kind = value.type()
    return (
        isinstance(kind, torch._C.TensorType)
        and kind.dtype() is not None
        and kind.dtype().is_floating_point
    )


def _is_one(value: Any) -> bool:
    return isinstance(value, int | float) and value == 1


def _constant(value: torch.Value) -> Any:
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None


def _drop_fill_arithmetic(graph: torch.Graph) -> None:
    """Reroute a / ones, a - zeros (alpha 1), a * ones, a / 1, a * 1 to ``a`` and turn
    ``normal(zeros, ones)`` into ``normal(0.0, 1.0, size)``, where shapes and dtypes agree."""
    for node in graph.nodes():
        kind = node.kind()
        inputs = list(node.inputs())
        if kind in ("aten::div", "aten::sub", "aten::add", "aten::mul") and len(inputs) >= 2:
            a, b = inputs[0], inputs[1]
            if kind == "aten::div" and len(inputs) != 2:
                continue  # rounding-mode variant
            if kind == "aten::add":  # -0.0 + 0.0 is +0.0: not an identity
                continue
            neutral = 1.0 if kind in ("aten::div", "aten::mul") else 0.0
            if kind == "aten::sub" and (len(inputs) != 3 or not _is_one(_constant(inputs[2]))):
                continue
            scalar = _constant(b)
            if kind in ("aten::div", "aten::mul") and isinstance(scalar, int | float):
                b_neutral = scalar == 1  # a / 1, a * 1
            else:
                b_neutral = _fill(b) == neutral
            if b_neutral and _same_tensor_type(a, node.output()):
                node.output().replaceAllUsesWith(a)
        elif kind == "aten::normal" and len(inputs) == 3:
            mean, std, generator = inputs
            zeros, ones = mean.node(), std.node()
            if not (
                zeros.kind() == "aten::zeros"
                and ones.kind() == "aten::ones"
                and list(zeros.inputs()) == list(ones.inputs())
                and _same_tensor_type(mean, node.output())
            ):
                continue
            size, dtype, layout, device, pin_memory = zeros.inputs()
            draw = graph.create(
                "aten::normal",
                [
                    _float_constant(graph, 0.0, node),
                    _float_constant(graph, 1.0, node),
                    size,
                    generator,
                    dtype,
                    layout,
                    device,
                    pin_memory,
                ],
            )
            draw.insertBefore(node)
            draw.output().setType(node.output().type())
            node.output().replaceAllUsesWith(draw.output())


#: Elementwise ops of one tensor (and scalar constants) that compute every element the same
#: way wherever it lies: IEEE arithmetic. (ATen's vectorized loops and scalar tails evaluate
#: transcendental functions such as exp, log or softplus slightly differently, so moving those
#: before an expand could change the last bit of some elements.)
_UNARY = {"aten::neg", "aten::mul", "aten::div", "aten::add", "aten::sub", "aten::pow"}


def _numel(value: torch.Value) -> int | None:
    sizes = _sizes(value)
    return None if sizes is None else math.prod(sizes)


def _negate_the_smaller_operand(graph: torch.Graph) -> None:
    """``(-a) / b`` as ``a / (-b)`` where ``b`` broadcasts from fewer elements: a Normal
    log-density divides ``-(z - m) ** 2`` by ``2 s ** 2``, with ``s`` shared by K draws of z.
    Division is correctly rounded and rounding is symmetric in sign: the same value."""
    for node in graph.nodes():
        if node.kind() != "aten::div" or len(list(node.inputs())) != 2:
            continue
        negated, divisor = node.inputs()
        if negated.node().kind() != "aten::neg" or len(negated.uses()) != 1:
            continue
        small, large = _numel(divisor), _numel(node.output())
        if small is None or large is None or small >= large:
            continue
        if not _same_tensor_type(negated, node.output()) or not (
            _floating(divisor) and divisor.type().dtype() == node.output().type().dtype()
        ):
            continue
        flipped = graph.create("aten::neg", [divisor])
        flipped.insertBefore(node)
        flipped.output().setType(divisor.type())
        quotient = graph.create("aten::div", [negated.node().inputsAt(0), flipped.output()])
        quotient.insertBefore(node)
        quotient.output().setType(node.output().type())
        node.output().replaceAllUsesWith(quotient.output())


def _is_scalar_constant(value: torch.Value) -> bool:
    return isinstance(_constant(value), int | float) and not isinstance(_constant(value), bool)


def _elementwise_before_expand(graph: torch.Graph) -> None:
    """Compute ``f(expand(a))`` as ``expand(f(a))`` for an elementwise ``f`` of one tensor.

    A distribution of a guide inside a particle plate expands its (N, L) parameters to
    (K, N, L); its log-density then takes ``scale ** 2`` and ``2 * var`` of every copy.
    Every element of the result is ``f`` of the same source element either way. The result is
    a broadcast view, so results that are viewed (``aten::view``) are left alone.
    """
    for node in graph.nodes():
        if node.kind() not in _UNARY:
            continue
        inputs = list(node.inputs())
        if not inputs or inputs[0].node().kind() != "aten::expand":
            continue
        if not all(_is_scalar_constant(v) for v in inputs[1:]):
            continue
        if node.kind() == "aten::pow" and _constant(inputs[1]) != 2:
            continue  # x ** 2 is x * x everywhere; other powers go through pow()
        if not _floating(inputs[0]):
            continue
        expand = inputs[0].node()
        source = expand.inputsAt(0)
        if (
            not isinstance(source.type(), torch._C.TensorType)
            or source.type().dtype() is None
            or source.type().dtype() != node.output().type().dtype()
            or _sizes(source) is None
            or _sizes(node.output()) != _sizes(expand.output())
        ):
            continue
        if any(use.user.kind() == "aten::view" for use in node.output().uses()):
            continue
        applied = graph.create(node.kind(), [source, *inputs[1:]])
        applied.insertBefore(node)
        applied.output().setType(source.type())
        expanded = graph.create("aten::expand", [applied.output(), *list(expand.inputs())[1:]])
        expanded.insertBefore(node)
        expanded.output().setType(expand.output().type())  # a broadcast view, as before
        node.output().replaceAllUsesWith(expanded.output())


def _fold_fills(graph: torch.Graph) -> None:
    """``pow(ones, p)`` is ones and ``log(ones)`` is zeros, element for element."""
    for node in graph.nodes():
        kind = node.kind()
        if not list(node.inputs()) or _fill(node.inputsAt(0)) != 1.0:
            continue
        source = node.inputsAt(0)
        if not _same_tensor_type(source, node.output()):
            continue
        if kind == "aten::pow" and _is_scalar_constant(node.inputsAt(1)):
            node.output().replaceAllUsesWith(source)
        elif kind == "aten::log" and len(list(node.inputs())) == 1:
            none = graph.create("prim::Constant")
            none.output().setType(torch._C.NoneType.get())
            none.insertBefore(node)
            zeros = graph.create("aten::zeros_like", [source] + [none.output()] * 5)
            zeros.insertBefore(node)
            zeros.output().setType(node.output().type())
            node.output().replaceAllUsesWith(zeros.output())


def _float_constant(graph: torch.Graph, value: float, before: torch.Node) -> torch.Value:
    node = graph.create("prim::Constant")
    node.f_("value", value)
    node.output().setType(torch._C.FloatType.get())
    node.insertBefore(before)
    return node.output()


_RESHAPES = ("aten::expand", "aten::reshape", "aten::view")


def _sizes(value: torch.Value) -> tuple[int, ...] | None:
    """The static shape of a tensor value of the graph, or None where the tracer left none."""
    kind = value.type()
    if not isinstance(kind, torch._C.TensorType):
        return None
    sizes = kind.sizes()
    return None if sizes is None or None in sizes else tuple(sizes)


def _drop_identities(graph: torch.Graph) -> None:
    """Reroute the uses of expand / reshape / view / broadcast_tensors that keep the shape."""
    for node in graph.nodes():
        if node.kind() in _RESHAPES:
            source = node.inputsAt(0)
            if _sizes(source) is not None and _sizes(source) == _sizes(node.output()):
                node.output().replaceAllUsesWith(source)
        elif node.kind() == "aten::broadcast_tensors":
            inputs = node.inputsAt(0).node()
            users = [use.user for use in node.output().uses()]
            if inputs.kind() != "prim::ListConstruct" or any(
                user.kind() != "prim::ListUnpack" for user in users
            ):
                continue
            sources = list(inputs.inputs())
            if len({_sizes(v) for v in sources}) != 1 or _sizes(sources[0]) is None:
                continue
            for user in users:
                for output, source in zip(user.outputs(), sources, strict=True):
                    output.replaceAllUsesWith(source)


@contextmanager
def _default_dtype(args: tuple):
    """Trace in the data's float dtype: a traced plate computes its scale N / B as a tensor of
    the default dtype, where the eager plate uses a Python float."""
    dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
    old = torch.get_default_dtype()
    if len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}:
        torch.set_default_dtype(dtypes.pop())
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _is_cuda(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_cuda


class _Compiled:
    """Mixin: ``differentiable_loss`` through one :class:`TracedLoss` per model/guide pair."""

    def _traced(self, model: Callable, guide: Callable) -> TracedLoss:
        cache = self.__dict__.setdefault("_traced_losses", {})
        key = (_identity(model), _identity(guide))
        if key not in cache:
            # the cache holds model and guide, so their ids cannot be reused while it lives
            cache[key] = TracedLoss(lambda *a, **k: self._surrogate(model, guide, a, k))
        return cache[key]

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The plain estimator's differentiable loss, computed by a traced graph."""
        return self._traced(model, guide)(*args, **kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The plain estimator's loss value (no gradient), computed by the plain estimator: it
        adds particles up as Python floats, which a float32 graph would round."""
        return super().loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss value; its gradient is accumulated into the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss)

    def compilations(self, model: Callable, guide: Callable) -> int:
        """How many graphs were traced for this model/guide pair."""
        cache = self.__dict__.get("_traced_losses", {})
        traced = cache.get((_identity(model), _identity(guide)))
        return 0 if traced is None else traced.compilations


class JitTrace_ELBO(_Compiled, Trace_ELBO):
    """``Trace_ELBO`` traced once: loss = -ELBO with Monte-Carlo log q - log p terms.

    The value is Trace_ELBO's loss, sum over sites of -log p + log q at z ~ q; the gradient is
    its surrogate's (reparameterized, plus score-function terms for non-reparameterized sites).
    """

    def _surrogate(self, model, guide, args, kwargs) -> torch.Tensor:
        # loss = -(1/S) sum_s [sum_model log p - sum_guide log q];  d(loss) = d(surrogate)
        # Trace_ELBO adds the site terms up as Python floats (float64) and rounds the total to
        # the surrogate's dtype at the end; so does this graph, for the same value to the bit.
        loss = surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = surrogate_elbo = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    elbo = elbo + site["log_prob_sum"].double()
                    surrogate_elbo = surrogate_elbo + site["log_prob_sum"]
            log_r = None
            for site in guide_trace.nodes.values():
                if site["type"] != "sample":
                    continue
                _, score_function_term, entropy_term = site["score_parts"]
                elbo = elbo - site["log_prob_sum"].double()
                if not is_identically_zero(entropy_term):
                    surrogate_elbo = surrogate_elbo - entropy_term.sum()
                if not is_identically_zero(score_function_term):
                    if log_r is None:
                        log_r = _compute_log_r(model_trace, guide_trace)
                    log_r_site = log_r.sum_to(site["cond_indep_stack"])
                    surrogate_elbo = surrogate_elbo + (log_r_site * score_function_term).sum()
            loss = loss - elbo / self.num_particles
            surrogate = surrogate - surrogate_elbo / self.num_particles
        return loss.detach().to(surrogate.dtype) + (surrogate - surrogate.detach())


class JitTraceMeanField_ELBO(_Compiled, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` traced once: loss = -ELBO with KL(q || p) in closed form."""

    def _surrogate(self, model, guide, args, kwargs) -> torch.Tensor:
        # loss = (1/S) sum_s [KL(q || p) - log p(x | z_s)]. Like Trace_ELBO, whose
        # differentiable_loss it inherits, TraceMeanField_ELBO averages the particles' values as
        # Python floats (float64) and their differentiable surrogates as tensors; so does this.
        loss = surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            _, particle = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + particle.detach().double() / self.num_particles
            surrogate = surrogate + particle / self.num_particles
        if self.num_particles == 1:  # -e in float64, rounded back, is -e: the same value
            return surrogate
        return loss.to(surrogate.dtype) + (surrogate - surrogate.detach())


#: The compiled counterpart of each plain estimator name (see ``inference.train.ESTIMATORS``).
COMPILED = {"trace": "jit", "meanfield": "jit-meanfield"}
