"""The ``svdquant`` Dynamo backend: ``torch.compile(model, backend="svdquant", options={...})``.

Flow per Dynamo graph: find linear sites -> plan (skip / target / sibling groups) ->
calibration statistics (explicit :func:`svdq_compile.calibrate`, or recorded on the
first calls) -> per-group SVDQuant decomposition (cached per weight, so a recompile
for new shapes does not quantize again) -> graph rewrite to ``svdq::linear`` ->
Inductor (or eager with ``use_inductor=False``).
"""
from __future__ import annotations

import collections
import copy
import logging
import time
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from svdq_compile.quant.stats import LayerStats, attach_stats, stats_of
from svdq_compile.quant.config import SVDQuantConfig
from svdq_compile.passes.pipeline import CompileReport, quantize_graph
from svdq_compile.capture.versions import tensor_version as _version
from svdq_compile.passes.fuse_siblings import apply_aliases

__all__ = ["svdquant_backend", "last_reports"]

log = logging.getLogger(__name__)

# Reports of the graphs compiled in this process, newest last (for explain()); bounded,
# since a pipeline whose LoRA adapters change compiles again at every change.
_REPORTS: "collections.deque[CompileReport]" = collections.deque(maxlen=256)
# Every compiled graph of this process (weakly: Dynamo owns them), for retained_variants().
_LIVE: "weakref.WeakSet[SVDQuantCompiled]" = weakref.WeakSet()


def last_reports() -> list[CompileReport]:
    return list(_REPORTS)


def retained_variants() -> int:
    """Quantized variants (compiled graph + the tensors it baked) held in this process.

    A variant is kept while every tensor that keys it is alive (see
    :class:`SVDQuantCompiled`): at most one per set of live weights, whatever the
    number of adapter changes a pipeline went through.
    """
    return sum(len(c._variants) for c in list(_LIVE))


class _Recorder(torch.nn.Module):
    """Identity that feeds what flows through it into a LayerStats."""

    def __init__(self, stats: LayerStats) -> None:
        super().__init__()
        self.stats = stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stats.update(x)
        return x


def _calibration_graph(gm: fx.GraphModule, sites, new_stats: Callable[[Any, int], LayerStats]) -> fx.GraphModule:
    """A copy of gm that records the input of every site before running it.

    Sites reading the same graph value (q/k/v) share one recorder and one LayerStats:
    ``new_stats(site, i)`` makes the statistics of a group's first site, the other
    members get the same object attached to their weights.
    """
    cgm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    by_name = {n.name: n for n in cgm.graph.nodes}
    order = {n: i for i, n in enumerate(cgm.graph.nodes)}
    groups: dict[fx.Node, list] = {}
    for site in sites:
        node = by_name[site.node.name]
        x = node.args[0] if site.kind == "linear" else node.args[1 if site.kind == "addmm" else 0]
        groups.setdefault(x, []).append((site, node))
    for i, (x, members) in enumerate(groups.items()):
        st = new_stats(members[0][0], i)
        for site, _ in members[1:]:
            attach_stats(site.weight, st)
        cgm.add_submodule(f"svdq_recorder_{i}", _Recorder(st))
        first = min((node for _, node in members), key=order.__getitem__)  # before every reader
        with cgm.graph.inserting_before(first):
            rec = cgm.graph.call_module(f"svdq_recorder_{i}", (x,))
        for _, node in members:
            node.replace_input_with(x, rec)
    cgm.recompile()
    return cgm


class _Variant:
    """One quantized, compiled version of a Dynamo graph for one set of weight tensors.

    Holds its key tensors only weakly: when one of them dies (a LoRA layer replaced its
    factors, ``fuse_lora`` / ``unload_lora_weights`` / ``delete_adapters`` rebuilt a
    buffer, the model was deleted) the key can never match again, so the variant (its
    compiled function and the fused copies it baked) is dropped at once, before the
    tensor's id could be reused by a new tensor.
    """

    __slots__ = ("fn", "versions", "refs")

    def __init__(self, fn: Callable, versions: list, refs: list) -> None:
        self.fn = fn
        self.versions = versions  # [(weakref to a tensor baked in, its version at compile time)]
        self.refs = refs  # weakrefs with the eviction callback (keep them alive)


class SVDQuantCompiled:
    """Callable returned to Dynamo: calibrates on the first calls if needed, then runs quantized.

    Quantized variants are keyed by the identity of the weight tensors the graph bakes in
    (Dynamo shares one graph between instances of a module class and between LoRA factor
    tensors of the same shapes). Each variant lives as long as all its key tensors do
    (:class:`_Variant`): switching adapters N times on a compiled pipeline leaves one
    variant per live set of tensors, not N.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], config: SVDQuantConfig) -> None:
        from svdq_compile.passes.find_linears import find_linear_sites

        self.config = config
        self.gm = gm
        self.example_inputs = list(example_inputs)
        self.sites = find_linear_sites(gm, example_inputs)
        self._fn: Optional[Callable] = None
        # Dynamo's tracing context of this graph (fake mode, ShapeEnv with the symbols of
        # dynamic=True, memo real input -> symbolic fake): Inductor reads it when Dynamo
        # calls it directly. We compile later (after calibration, or for a new set of
        # weights), so compile_fx runs under the same context, as AOTAutograd's lazy
        # backward does; without it, the graph is re-faked with a fresh mode that has no
        # ShapeEnv (the .item() of a float turned input under dynamic=True then fails).
        self._tracing = torch._guards.TracingContext.try_get()
        self._compile_context = torch._guards.CompileContext.try_get()
        # Dynamo clears tensor_to_context (real input -> symbolic context) once the
        # backend returns; keep our inputs' entries to restore them for compile_fx.
        t2c = getattr(self._tracing, "tensor_to_context", None)
        self._symbolic = [(i, t2c[x]) for i, x in enumerate(example_inputs)
                          if t2c is not None and isinstance(x, torch.Tensor) and x in t2c]
        self._scalars: list[tuple[int, float]] = []  # see _specialize_scalars
        self._calib_gm: Optional[fx.GraphModule] = None
        self._calls = 0
        self._versions: list[tuple[torch.Tensor, int]] = []
        # Dynamo shares one graph between instances of the same module class and passes
        # each instance's parameters as inputs: quantized weights are baked into the graph,
        # so every distinct set of weight inputs gets its own quantized variant.
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._widx = [placeholders.index(s.weight_node) for s in self.sites if s.weight_node.op == "placeholder"]
        # Tensors of already-quantized layers (SVDQLinear buffers) are baked in too when
        # the passes fuse them: they key the variant as well.
        svdq_targets = (torch.ops.svdq.linear, torch.ops.svdq.linear.default)
        self._svdq_idx: list[int] = []
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in svdq_targets:
                self._svdq_idx += [placeholders.index(a) for a in n.args[1:9]
                                   if isinstance(a, fx.Node) and a.op == "placeholder"]
        self._widx += self._svdq_idx
        self._key: Optional[tuple] = None
        self._variants: dict[tuple, _Variant] = {}
        self._ready = False  # calibrated (the first variant was built)
        _LIVE.add(self)
        missing = [s for s in self.sites if (stats_of(s.weight) is None or stats_of(s.weight).seen == 0)]
        if missing and config.calibration == "require":
            names = ", ".join(s.name for s in missing[:5])
            raise ValueError(
                f"svdquant: missing calibration for {len(missing)} linear layer(s) ({names}...); "
                "run svdq_compile.calibrate(model, data) first, or pass options={'calibration': 'auto'}"
            )
        if missing and self._needs_activation_stats():
            log.info("svdquant: no calibration statistics for %d layers; recording the first %d call(s)",
                     len(missing), config.calib_calls)

            def new_stats(s, i: int) -> LayerStats:
                st = LayerStats(s.in_features, config.calib_tokens, seed=config.seed + i, name=s.name)
                attach_stats(s.weight, st)
                return st

            self._calib_gm = _calibration_graph(gm, missing, new_stats)
        else:
            self._finalize()

    def _needs_activation_stats(self) -> bool:
        # Weight-only modes (A16) need no activation statistics.
        return self.config.needs_activation_stats()

    def _weight_key(self, inputs: Sequence[Any]) -> tuple:
        return tuple(id(inputs[i]) for i in self._widx)

    def _finalize(self, inputs: Optional[Sequence[Any]] = None) -> None:
        from svdq_compile.passes.find_linears import find_linear_sites

        t0 = time.perf_counter()
        inputs = list(self.example_inputs if inputs is None else inputs)
        sites = find_linear_sites(self.gm, inputs)
        if self.config.calibration == "require":
            missing = [s.name for s in sites if stats_of(s.weight) is None or stats_of(s.weight).seen == 0]
            if missing:
                raise ValueError(f"svdquant: missing calibration for {len(missing)} linear layer(s) "
                                 f"({', '.join(missing[:5])}...) of another instance of this model")
        qgm, report = quantize_graph(self.gm, inputs, sites, self.config)
        _REPORTS.append(report)
        versions = [(s.weight, _version(s.weight)) for s in sites]
        # ops_inserted also counts svdq ops of already-quantized models (quantize()/load()).
        if self.config.use_inductor and (report.rewritten or report.ops_inserted):
            from torch._inductor.compile_fx import compile_fx

            # Inference only: compiling under no_grad makes AOTAutograd build a forward
            # graph (svdq::linear has no backward; quantized training is out of scope).
            self._scalars = _specialize_scalars(qgm, inputs)
            with self._dynamo_context(inputs), torch.no_grad():
                self._fn = compile_fx(qgm, inputs)
        else:
            self._fn = qgm
        apply_aliases(qgm)  # only now: compiling checks the inputs' storage offsets
        # Buffers of already-quantized layers (quantize()/load()) are baked into fused ops
        # too: an in-place edit of one must not leave the compiled model half stale.
        versions += [(inputs[i], _version(inputs[i])) for i in self._svdq_idx
                     if isinstance(inputs[i], torch.Tensor)]
        self._key = key = self._weight_key(inputs)
        self._versions = [(weakref.ref(t), v) for t, v in versions]
        self._drop_variant(key)
        evict = _evictor(weakref.ref(self), key)
        refs = [weakref.ref(inputs[i], evict) for i in self._widx if isinstance(inputs[i], torch.Tensor)]
        self._variants[key] = _Variant(self._fn, self._versions, refs)
        report.seconds = time.perf_counter() - t0
        log.info("svdquant: %s (%d variant(s) of this graph held)", report.summary(), len(self._variants))
        self._calib_gm = None
        self._ready = True
        # The first call's tensors are not needed any more: holding them would keep the
        # first variant's key alive for ever (LoRA factors replaced since then). Cleared in
        # place: Dynamo's wrapper of this callable holds a copy of our __dict__ (functools.wraps).
        self.example_inputs.clear()

    def _drop_variant(self, key: tuple) -> None:
        variant = self._variants.pop(key, None)
        if variant is not None:
            variant.refs.clear()  # its callbacks must not evict the variant replacing it
        if key == self._key and variant is not None and variant.fn is self._fn:
            self._fn, self._versions, self._key = None, [], None

    def _dynamo_context(self, inputs: Sequence[Any]):
        """Re-enter the tracing / compile context Dynamo called the backend in (no-op
        when already inside it or when the backend was called outside Dynamo)."""
        import contextlib

        stack = contextlib.ExitStack()
        if self._tracing is not None and torch._guards.TracingContext.try_get() is not self._tracing:
            stack.enter_context(torch._guards.tracing(self._tracing))
            for i, sc in self._symbolic:
                self._tracing.tensor_to_context[inputs[i]] = sc
            stack.callback(self._tracing.tensor_to_context.clear)
            if self._compile_context is not None:
                stack.enter_context(torch._guards.compile_context(self._compile_context))
            shape_env = getattr(self._tracing.fake_mode, "shape_env", None)
            if self._scalars and shape_env is not None:
                # The floats are specialized in the graph already (_specialize_scalars):
                # tell the tensorify pass, which otherwise asks for a Dynamo restart.
                from torch._dynamo.symbolic_convert import TensorifyState
                from torch.utils._sympy.symbol import SymT, symbol_is_type

                added = {str(k) for k in shape_env.backed_var_to_val
                         if symbol_is_type(k, SymT.FLOAT)} - TensorifyState.force_specializations
                TensorifyState.force_specializations.update(added)
                stack.callback(TensorifyState.force_specializations.difference_update, added)
        return stack

    def __call__(self, *args: Any) -> Any:
        if not self._ready:
            self._calls += 1
            with torch.no_grad():
                out = self._calib_gm(*args)
            if self._calls >= self.config.calib_calls:
                self._finalize()
            return out
        key = self._weight_key(args)
        if key != self._key or self._fn is None:  # another instance, or new (LoRA) tensors
            variant = self._variants.get(key)
            if variant is not None:
                self._key = key
                self._fn, self._versions = variant.fn, variant.versions
            else:
                log.info("svdquant: new set of weights for a shared graph; quantizing them")
                self._finalize(args)
        if any(args[i].item() != v for i, v in self._scalars):
            log.info("svdquant: a float argument specialized at compile time changed; compiling again")
            self._finalize(args)
        for ref, v in self._versions:
            w = ref()
            if w is not None and _version(w) != v:
                raise RuntimeError(
                    "svdquant: a quantized weight was modified after compilation; the compiled "
                    "model would run stale weights. Re-create it with torch.compile(...) (and "
                    "torch._dynamo.reset()) after changing weights."
                )
        with torch.no_grad():
            return self._fn(*args)


def _evictor(owner: "weakref.ref[SVDQuantCompiled]", key: tuple) -> Callable[[Any], None]:
    """Weakref callback: drop ``owner``'s variant ``key`` when one of its key tensors dies."""

    def evict(_: Any) -> None:
        compiled = owner()
        if compiled is not None and key in compiled._variants:
            compiled._drop_variant(key)
            log.debug("svdquant: a tensor of a compiled variant was freed; variant dropped (%d held)",
                      len(compiled._variants))

    return evict


def _specialize_scalars(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[tuple[int, float]]:
    """Bake the Python floats Dynamo passed as 0-d tensors (dynamic=True) into ``gm``.

    Dynamo turns float arguments into CPU scalar tensors read by ``.item()``; when it
    calls Inductor itself, Inductor's tensorify pass asks Dynamo to restart and
    specialize the floats it cannot keep symbolic. We compile after Dynamo returned
    (calibration comes first), where no restart is possible, so we specialize them all
    here (eps, default arguments...) and check their values on every call instead of
    Dynamo's guard (a change compiles again). Returns [(input index, value)].
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        return []
    out = []
    for i, (node, x) in enumerate(zip(placeholders, inputs)):
        users = list(node.users)
        if not (isinstance(x, torch.Tensor) and x.dim() == 0 and x.is_floating_point() and x.device.type == "cpu"
                and users and all(u.op == "call_method" and u.target == "item" for u in users)):
            continue
        value = float(x.item())
        for u in users:
            for reader in list(u.users):
                reader.args = fx.node.map_arg(reader.args, lambda a, u=u: value if a is u else a)
                reader.kwargs = fx.node.map_arg(reader.kwargs, lambda a, u=u: value if a is u else a)
            gm.graph.erase_node(u)
        out.append((i, value))
    if out:
        gm.recompile()
    return out


def svdquant_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None, mode: Optional[str] = None
) -> Callable:
    """Dynamo backend entry point (registered as ``svdquant``)."""
    config = SVDQuantConfig.from_options(options)
    if mode not in (None, "default"):
        log.info("svdquant: torch.compile mode=%r is ignored (use options)", mode)
    return SVDQuantCompiled(gm, example_inputs, config)
