"""A Pyro loss recorded once per argument shape and run as a graph: :class:`TracedLoss`.

Pyro's per-call Python (the poutine stack, ``pyro.module`` re-registering every parameter,
distribution objects, site bookkeeping) costs more than the arithmetic of a small model's loss.
For a model/guide pair of static structure (:func:`is_static_pair`), the loss of one argument
shape is recorded by :func:`torch.export.export` (non-strict: Pyro's Python runs once, on fake
tensors) as the ATen ops it computes, made lean by exact :mod:`torch.fx` rewrites
(:mod:`inference.lean_graph`), and from then on run as that graph: the same ops on the same
random stream, so the same values and gradients. A shape runs eagerly until it recurs (its
export costs about as much as a few hundred eager calls), and, where the caller says how many
calls are to come (:func:`planned_calls`, as :func:`inference.train.fit` does), only if they
pay for the export; a graph that keeps being called is compiled by :func:`torch.compile`.
Only public torch and Pyro APIs are used.

The compiled ELBO estimators (:mod:`inference.estimators`), :func:`inference.elbo.decompose`
and :func:`inference.evidence.log_weights` run their losses through it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.runtime import am_i_wrapped
from torch.export.graph_signature import InputKind, OutputKind
from torch.overrides import TorchFunctionMode

from models.structure import has_static_structure

from . import collector
from .lean_graph import call_public_functions, lean, split_invariant

__all__ = [
    "COMPILE_AFTER_CALLS",
    "COMPILE_PAYS_AFTER_CALLS",
    "EXPORT_AFTER_CALLS",
    "EXPORT_PAYS_AFTER_CALLS",
    "FIRST_EXPORT_PAYS_AFTER_CALLS",
    "RecentByFunction",
    "TracedLoss",
    "freeze",
    "function_key",
    "is_static_pair",
    "planned_calls",
]

log = logging.getLogger(__name__)


def is_static_pair(model: Callable, guide: Callable) -> bool:
    """Whether a model and guide may be traced: both declared static
    (:func:`models.structure.static_structure`), a Pyro autoguide counting as static as the
    model it was built from unless it says ``static_structure = False``
    (:class:`models.guides.AutoGaussianInDataDtype`)."""
    if not has_static_structure(model):
        return False
    autoguide = (
        isinstance(guide, AutoGuide) and getattr(guide, "static_structure", None) is not False
    )
    return has_static_structure(guide) or autoguide


def function_key(fn: Callable) -> Hashable:
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
        full = (tuple(function_key(fn) for fn in fns), key)
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


def freeze(value: Any) -> Hashable:
    """A hashable key for call arguments: a tensor by its shape, dtype, device and whether it
    requires a gradient (a graph is recorded for those, not for its values); lists, tuples and
    dicts by their parts; anything else as itself (it must be hashable)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    hash(value)
    return value


def _holds_tensor(value: Any) -> bool:
    """Whether a tensor is among ``value``'s parts (lists, tuples and dicts searched)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


#: Calls with one argument shape before :class:`TracedLoss` exports a graph for it; until then
#: the loss runs eagerly (the same numbers). Exporting costs about 0.14 s (the first export in a
#: process 0.3-0.4 s more, importing :mod:`torch.export`'s tracer, and 1.1 s where nothing has
#: imported ``torch._dynamo`` yet) and saves about 0.7 ms per digits step
#: (``python benchmarks/export_payback.py``), so it pays for a shape that keeps recurring: a
#: training batch shape of a long enough run does (a default run exports its batch of 128 in
#: the first epoch; its ragged batch of 30, called 200 times, would only break even and stays
#: eager), a probe or a one-off call does not. Counting calls, not seconds, keeps what runs as
#: a graph of a training loss independent of the machine's speed; only a caller that asks for
#: it (``export_after_seconds``: L_K's slow chunks) exports by time too. The numbers are the
#: same either way.
EXPORT_AFTER_CALLS = 10

#: Calls of an argument shape still to come, the current one included, below which an export
#: does not pay for itself. In isolation an export (after the process's first) costs about
#: 0.14 s and a loss and backward as a graph saves 0.7 ms against an eager one, for the digits
#: VAE at batch 128 and at its ragged batch of 30 (``python benchmarks/export_payback.py``):
#: 200 calls. In a whole run a step saves less (0.45 ms: 1.42 against 0.98 ms a step in a
#: default run), so the figure is 300. Both costs scale with the model's sites and ops, so the
#: ratio holds across models. Consulted only where the caller states its plan
#: (:func:`planned_calls`); :func:`inference.train.fit` does.
EXPORT_PAYS_AFTER_CALLS = 300

#: The same for the first export in a process, which also imports :mod:`torch.export`'s
#: tracer (``torch._functorch.aot_autograd`` and others) and leaves objects for Python's
#: collector: 0.30-0.38 s in isolation (410-505 calls). Whole default runs with and without
#: the export (CPU time, 4 rounds) break even at 80 epochs (870 calls to come at the 11th),
#: and the export saves 0.25 s at 120 epochs: 800.
FIRST_EXPORT_PAYS_AFTER_CALLS = 800

_PLANNED: ContextVar[int | None] = ContextVar("planned_calls", default=None)
_exports_in_process = 0


class planned_calls:  # noqa: N801 (a context manager, used as a function is)
    """``with planned_calls(n):`` the caller will call the loss with the current argument shape
    ``n`` more times, this call included (None: unknown). A :class:`TracedLoss` then exports a
    shape, once past ``export_after`` calls, only if those calls will pay for the export
    (:data:`EXPORT_PAYS_AFTER_CALLS`, :data:`FIRST_EXPORT_PAYS_AFTER_CALLS`); otherwise it keeps
    running the shape eagerly, which computes the same numbers; and it compiles a CPU graph
    only if the calls to come pay for that (:data:`COMPILE_PAYS_AFTER_CALLS`). Without a plan
    every shape is exported after ``export_after`` calls, and compiled after ``compile_after``."""

    __slots__ = ("calls", "_token")

    def __init__(self, calls: int | None):
        self.calls = calls

    def __enter__(self) -> None:
        self._token = _PLANNED.set(self.calls)

    def __exit__(self, *exc) -> None:
        _PLANNED.reset(self._token)


def _export_pays() -> bool:
    """Whether the calls the caller plans (:func:`planned_calls`) pay for an export."""
    planned = _PLANNED.get()
    if planned is None:
        return True
    if _exports_in_process:
        return planned >= EXPORT_PAYS_AFTER_CALLS
    return planned >= FIRST_EXPORT_PAYS_AFTER_CALLS


def _compile_pays(inputs: tuple) -> bool:
    """Whether the calls the caller plans pay for compiling a graph with these inputs."""
    planned = _PLANNED.get()
    if planned is None or any(_is_cuda(t) for t in inputs):
        return True
    return planned >= COMPILE_PAYS_AFTER_CALLS


#: Calls of one graph before :class:`TracedLoss` compiles it with ``torch.compile``. Compiling
#: costs seconds (about 2 s per graph with inductor's on-disk cache warm, 10-25 s cold on a
#: 2-core CPU), so a default digits run (200 epochs: 2,200 full mini-batches) never compiles.
COMPILE_AFTER_CALLS = 5000

#: Calls of a graph still to come (:func:`planned_calls`) below which a CPU graph is not
#: compiled: on this project's 2-core CPU the digits VAE's compiled loss and backward save
#: 0.03 ms a call (0.62 -> 0.59 ms) for 13 s of compiling with a cold inductor cache
#: (``python benchmarks/export_payback.py --compile``), and nothing at the MNIST size
#: (``benchmarks/compiled_step.py``). So ``fit`` compiles a CPU graph only for runs of about
#: half a million more steps. CUDA graphs are compiled after :data:`COMPILE_AFTER_CALLS`
#: calls whatever the plan (not measured here: no GPU was lent).
COMPILE_PAYS_AFTER_CALLS = 450_000


class _Substitute(TorchFunctionMode):
    """Inside it, every torch function sees ``mapping[id(t)]`` in place of the tensor ``t``:
    the param store's tensors become the inputs of the exported graph, wherever a module or a
    constraint transform reads them."""

    def __init__(self, mapping: dict[int, torch.Tensor]):
        super().__init__()
        self.mapping = mapping

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*self._swap(args), **self._swap(kwargs or {}))

    def _swap(self, value):
        if isinstance(value, torch.Tensor):
            return self.mapping.get(id(value), value)
        if isinstance(value, list | tuple):
            return type(value)(self._swap(v) for v in value)
        if isinstance(value, dict):
            return {k: self._swap(v) for k, v in value.items()}
        return value


class _Replay(torch.nn.Module):
    """``fn(*args, **kwargs)`` as a module of (parameters..., args...), for :func:`torch.export`."""

    def __init__(self, fn: Callable[..., torch.Tensor], params: tuple, kwargs: dict):
        super().__init__()
        self.fn, self.params, self.kwargs = fn, params, kwargs

    def forward(self, *params_and_args):
        inputs, args = params_and_args[: len(self.params)], params_and_args[len(self.params) :]
        with _Substitute({id(p): q for p, q in zip(self.params, inputs, strict=True)}):
            return self.fn(*args, **self.kwargs)


class _Graph:
    """One exported graph, made lean (:func:`inference.lean_graph.lean`): run as the ATen ops
    that Pyro's eager run computes, without its Python; after ``compile_after`` calls (None:
    never), compiled by ``torch.compile``. ``module`` returns the loss, or (with ``unpack``) a
    tuple holding only the loss. With ``prefix`` (a hoisted graph, :func:`split_invariant`),
    ``prefix`` computes what draws no noise and ``module`` takes it as its last inputs."""

    def __init__(
        self,
        names: list[str],
        module: torch.fx.GraphModule,
        unpack: bool,
        compile_after: int | None,
        prefix: torch.fx.GraphModule | None = None,
    ):
        self.names, self.module, self.unpack, self.compiled = names, module, unpack, None
        self.compile_after = compile_after
        self.prefix = prefix
        self.calls = 0
        self._run = module.forward  # no nn.Module hooks: about 5 us a call

    def __call__(self, inputs: tuple, memo: dict | None = None, key: Hashable = None):
        if self.prefix is not None:
            kept = None if memo is None else memo.get(key)
            if kept is None:
                kept = self.prefix.forward(*inputs)
                if memo is not None:
                    memo[key] = kept
            inputs = (*inputs, *kept)
        if self.compiled is None and self.calls == self.compile_after and _compile_pays(inputs):
            self.compiled = self._compile(inputs)  # one try
            if self.compiled is not None:
                self._run = self.compiled
        self.calls += 1
        out = self._run(*inputs)
        return out[0] if self.unpack else out

    def _compile(self, inputs: tuple) -> Callable | None:
        """The graph compiled, or None if compiling fails (no C++ compiler, say). A first call
        under a forked random state compiles the forward and, with gradients, the backward;
        it checks the compiled value against the uncompiled one."""
        # fallback_random: draw with ATen's kernels, the same noise as eager Pyro. Each graph
        # module has its own code object, so its compiled code is cached apart from the others'.
        compiled = torch.compile(self.module, dynamic=False, options={"fallback_random": True})
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        wrt = [t for t in tensors if t.requires_grad] if torch.is_grad_enabled() else []
        try:
            with torch.random.fork_rng(devices=devices):
                got = compiled(*inputs)
                got = got[0] if self.unpack else got
                if wrt and got.requires_grad:
                    torch.autograd.grad(got, wrt, allow_unused=True)
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                want = self.module(*inputs)
                want = want[0] if self.unpack else want
            torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)
        except Exception as exc:  # noqa: BLE001 (any compiler failure: keep the exported graph)
            log.warning("torch.compile failed; the loss runs uncompiled: %s", exc)
            return None
        log.info("compiled a loss graph after %d calls", self.calls)
        return compiled


#: With ``export_after_seconds``: the mean eager call of a shape that is exported by the time
#: its eager calls took, rather than by their count. An MNIST-sized L_K chunk takes 55 ms
#: eagerly, a digits chunk about 5 ms, which keeps the count.
SLOW_CALL_SECONDS = 0.02


class _Shape:
    """What :class:`TracedLoss` knows of one argument shape: how often it was called, and its
    graph once exported (:data:`EAGER` where it could not be)."""

    __slots__ = ("calls", "graph", "seconds")

    def __init__(self):
        self.calls = 0
        self.seconds = 0.0  # of its eager calls, where the loss counts them
        self.graph: _Graph | None | str = None


#: The graph of an argument shape that :func:`torch.export.export` could not record.
EAGER = "eager"


class TracedLoss:
    """``fn(*args, **kwargs)`` run as a graph exported once per argument shapes and keywords.

    ``fn`` is a Pyro function returning a tensor. Its first ``export_after`` calls with one
    argument shape run eagerly (with ``export_after_seconds``, fewer once they have taken that
    long, if they took :data:`SLOW_CALL_SECONDS` or more each: where an eager call is
    expensive, its graph pays sooner); then one eager run creates its parameters
    (``pyro.param`` and ``pyro.module`` sites), and :func:`torch.export.export` records the run (guide, model
    replay, log-densities) as ATen ops, with the parameters as inputs of the graph, so gradients
    flow to the param store. :func:`inference.lean_graph.lean` removes the ops that only
    recording put there (exactly). The graph runs the same ops on the same random stream as the
    eager run, so it computes the same values and gradients, without Pyro's per-call Python
    work. After ``compile_after`` calls of one graph (``None``: never) it is compiled with
    ``torch.compile`` (inductor, ``fallback_random`` so that the noise stays ATen's); fused
    kernels round differently, so from then on values and gradients agree with the eager run's
    to float rounding rather than bit for bit.

    ``compilations`` counts the graphs exported so far, ``compiled`` those switched to the
    compiled function, ``graph_calls`` the calls a graph (exported or compiled) ran, and
    ``fallbacks`` the argument shapes that could not be exported and run eagerly.
    ``differentiable=False`` (for graphs only ever run without gradients) also merges common
    subexpressions; ``hoist=True`` on top of it splits off the part of the graph that draws no
    noise, which :meth:`call` with a memo computes once for repeated calls on the same inputs.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        differentiable: bool = True,
        hoist: bool = False,
        export_after: int = EXPORT_AFTER_CALLS,
        compile_after: int | None = COMPILE_AFTER_CALLS,
        export_after_seconds: float | None = None,
    ):
        if hoist and differentiable:
            raise ValueError("hoisting is for graphs run without gradients (differentiable=False)")
        self.fn = fn
        self.differentiable = differentiable
        self.hoist = hoist
        self.export_after = export_after
        self.export_after_seconds = export_after_seconds
        self.compile_after = compile_after
        self.compilations = 0
        self.fallbacks = 0
        self._shapes: dict[Hashable, _Shape] = {}

    @property
    def compiled(self) -> int:
        """How many of the graphs run compiled by ``torch.compile``."""
        return sum(
            isinstance(s.graph, _Graph) and s.graph.compiled is not None
            for s in self._shapes.values()
        )

    @property
    def graph_calls(self) -> int:
        """How many calls ran an exported (or compiled) graph rather than ``fn`` itself."""
        return sum(s.graph.calls for s in self._shapes.values() if isinstance(s.graph, _Graph))

    def graphs(self) -> list[_Graph]:
        """The exported graphs, one per argument shape."""
        return [s.graph for s in self._shapes.values() if isinstance(s.graph, _Graph)]

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.call(None, *args, **kwargs)

    def call(self, memo: dict | None, *args, **kwargs) -> torch.Tensor:
        """``fn(*args, **kwargs)``; with a ``memo`` (``hoist=True`` only), the values that do
        not depend on random draws are computed at the first call and kept in it. The caller
        promises that parameters and arguments stay the same while it uses the memo."""
        if _holds_tensor(kwargs):  # a graph's inputs are the positional arguments: it would
            return self.fn(*args, **kwargs)  # keep the first call's keyword tensor values
        key = (freeze(args), freeze(kwargs))
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape()
        graph = shape.graph
        if graph is None:
            due = shape.calls >= self.export_after or (
                self.export_after_seconds is not None
                and shape.seconds >= self.export_after_seconds
                and shape.seconds >= SLOW_CALL_SECONDS * shape.calls  # slow calls only
            )
            if not due or not _export_pays():
                shape.calls += 1
                if self.export_after_seconds is None:
                    return self.fn(*args, **kwargs)
                start = time.perf_counter()
                try:
                    return self.fn(*args, **kwargs)
                finally:
                    shape.seconds += time.perf_counter() - start
            graph = shape.graph = self._export(args, kwargs)
        if graph is EAGER:
            return self.fn(*args, **kwargs)
        if am_i_wrapped():  # let enclosing handlers (e.g. a param-only trace) see the parameters
            params = [pyro.param(name).unconstrained() for name in graph.names]
        else:
            store = dict(pyro.get_param_store().named_parameters())
            params = [store[name] for name in graph.names]
        return graph((*params, *args), memo, key)

    def _export(self, args: tuple, kwargs: dict) -> _Graph | str:
        devices = sorted({a.device.index or 0 for a in args if _is_cuda(a)})
        with torch.random.fork_rng(devices=devices):
            # one eager run (validated if validation is on) creates and names the parameters
            with poutine.trace(param_only=True) as capture:
                self.fn(*args, **kwargs)
            names = sorted(capture.trace.nodes)
            store = dict(pyro.get_param_store().named_parameters())
            params = tuple(store[name] for name in names)
            replay = _Replay(self.fn, params, kwargs)
            with (
                poutine.block(),  # enclosing handlers see the call, not the recording
                pyro.validation_enabled(False),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                try:
                    with collector.paused():  # the first export imports its tracer
                        exported = torch.export.export(replay, params + tuple(args), strict=False)
                except Exception as exc:  # noqa: BLE001 (whatever cannot be recorded runs eagerly)
                    log.warning("cannot export the loss, running it eagerly: %s", exc)
                    self.fallbacks += 1
                    return EAGER
        self.compilations += 1
        global _exports_in_process
        _exports_in_process += 1
        # Where every input is the caller's and the one output is the loss, the graph module
        # itself runs it: ``exported.module()`` would also flatten the arguments and check their
        # shapes at every call (about 0.1 ms), which the graph's key already guarantees.
        module = _inline_constants(exported)
        plain = module is not None
        if module is None:  # buffers or mutated inputs: the module knows where they go
            module = exported.module()
        module = lean(module, self.differentiable)
        prefix = None
        if self.hoist and plain:
            split = split_invariant(module)
            if split is not None:
                prefix, module = split
                call_public_functions(prefix)
        call_public_functions(module)
        return _Graph(names, module, plain, self.compile_after, prefix)


def _inline_constants(exported: torch.export.ExportedProgram) -> torch.fx.GraphModule | None:
    """The exported graph module as a function of the caller's inputs alone, its one output
    the loss, with each lifted constant (a tensor the loss creates or closes over) an
    attribute of the module; None where the graph also takes buffers or mutates an input.
    Run directly, it skips ``exported.module()``'s argument flattening and shape checks at
    every call (about 0.1 ms), which the graph's key already guarantees."""
    signature = exported.graph_signature
    if [spec.kind for spec in signature.output_specs] != [OutputKind.USER_OUTPUT]:
        return None
    kinds = {spec.kind for spec in signature.input_specs}
    if not kinds <= {InputKind.USER_INPUT, InputKind.CONSTANT_TENSOR}:
        return None
    module = exported.graph_module
    graph = module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    for i, (node, spec) in enumerate(zip(placeholders, signature.input_specs, strict=True)):
        if spec.kind == InputKind.USER_INPUT:
            continue
        name = f"constant_{i}"
        module.register_buffer(name, exported.constants[spec.target], persistent=False)
        with graph.inserting_before(node):
            attribute = graph.get_attr(name)
        attribute.meta = dict(node.meta)
        node.replace_all_uses_with(attribute)
        graph.erase_node(node)
    graph.lint()
    module.recompile()
    return module


def _is_cuda(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_cuda
