"""The ``svdquant`` Dynamo backend: ``torch.compile(model, backend="svdquant", options={...})``.

Flow per Dynamo graph: find linear sites -> plan (skip / target / sibling groups) ->
calibration statistics (explicit :func:`svdq_compile.calibrate`, or recorded on the
first calls) -> per-group SVDQuant decomposition (cached per weight, so a recompile
for new shapes does not quantize again) -> graph rewrite to ``svdq::linear`` ->
Inductor (or eager with ``use_inductor=False``).

Every call that returns an output of a set of weights whose calibration is complete runs
that set's one compiled variant: the call that completes an automatic calibration
returns the quantized output too, so the first output is the one every later call gives
for the same inputs (with ``calib_calls=N`` the first ``N - 1`` calls return float outputs).
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

__all__ = ["svdquant_backend", "last_reports", "reports_for"]

log = logging.getLogger(__name__)

# Reports of the graphs compiled in this process, newest last (for explain()); bounded,
# since a pipeline whose LoRA adapters change compiles again at every change.
_REPORTS: "collections.deque[CompileReport]" = collections.deque(maxlen=256)
# Every compiled graph of this process (weakly: Dynamo owns them), for retained_variants().
_LIVE: "weakref.WeakSet[SVDQuantCompiled]" = weakref.WeakSet()


def last_reports() -> list[CompileReport]:
    """Reports of every graph compiled in this process, newest last (all models)."""
    return list(_REPORTS)


def reports_for(model: torch.nn.Module) -> list[CompileReport]:
    """Reports of the graphs that read ``model``'s own parameters or buffers, oldest first.

    A report belongs to a model when one of the tensors its graph was compiled with (the
    weights of its linears, the buffers of already-quantized layers) is one of the
    model's tensors (by identity, through weak references). When the same weights were
    compiled more than once (``torch._dynamo.reset()``, a float argument that changed),
    only the newest report of that set of weights is kept.
    """
    model = getattr(model, "_orig_mod", model)
    own = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    newest: dict[tuple, CompileReport] = {}
    for r in list(_REPORTS):
        live = [t for t in (ref() for ref in r.tensor_refs) if t is not None]
        mine = tuple(sorted(id(t) for t in live if own.get(id(t)) is t))
        if mine:
            newest.pop(mine, None)  # re-inserted: dict order follows the newest report
            newest[mine] = r
    return list(newest.values())


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


class _Pending:
    """A set of weights still recording its calibration calls (``config.calib_calls``).

    Holds its weight tensors weakly, like :class:`_Variant`: a key whose tensors died is
    never matched by a new tensor that reuses an id.
    """

    __slots__ = ("gm", "calls", "refs")

    def __init__(self, gm: fx.GraphModule, refs: list) -> None:
        self.gm = gm  # the graph with recorders in front of the linears lacking statistics
        self.calls = 0
        self.refs = refs

    def holds(self, inputs: Sequence[Any], idx: Sequence[int]) -> bool:
        return all(r() is inputs[i] for r, i in zip(self.refs, idx))


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
        self._scalars: list[tuple[int, float]] = []  # see _specialize_scalars
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
        # How Inductor sees the inputs: Dynamo's fake tensors of this graph (see _compile_inputs).
        self._fakes = [n.meta.get("example_value") for n in placeholders]
        self._key: Optional[tuple] = None
        self._variants: dict[tuple, _Variant] = {}
        # Sets of weights being calibrated (recording their first calls), by weight key.
        self._pending: dict[tuple, _Pending] = {}
        _LIVE.add(self)
        pending = self._calibration(self.sites, self.example_inputs, first=True)
        if pending is None:
            self._finalize(self.example_inputs, self.sites)
        else:
            self._pending[self._weight_key(self.example_inputs)] = pending
        # The first call's tensors are not needed any more: holding them would keep the
        # first variant's key alive for ever (LoRA factors replaced since then). Cleared in
        # place: Dynamo's wrapper of this callable holds a copy of our __dict__ (functools.wraps).
        self.example_inputs.clear()

    def _calibration(self, sites: Sequence, inputs: Sequence[Any], first: bool) -> Optional[_Pending]:
        """The recording state for ``inputs``' weights, or None when they can be quantized now.

        Only the linears the plan quantizes need statistics: those it keeps in float
        (skip patterns, too small, the float linears beside the ``svdq::linear`` calls of an
        already-quantized model) must not send the first call through the calibration
        graph, which has none of the rewrites (smoothing folded into norms, fused
        siblings and epilogues) nor Inductor: its output would differ from every later call's.
        """
        from svdq_compile.passes.plan import plan_sites

        groups, _ = plan_sites(list(sites), self.config)
        missing = [s for g in groups for s in g.sites if stats_of(s.weight) is None or stats_of(s.weight).seen == 0]
        if not missing:
            return None
        names = ", ".join(s.name for s in missing[:5])
        if self.config.calibration == "require":
            if first:
                raise ValueError(
                    f"svdquant: missing calibration for {len(missing)} linear layer(s) ({names}...); "
                    "run svdq_compile.calibrate(model, data) first, or pass options={'calibration': 'auto'}"
                )
            raise ValueError(f"svdquant: missing calibration for {len(missing)} linear layer(s) "
                             f"({names}...) of another instance of this model")
        if not self.config.needs_activation_stats():  # weight-only modes (A16) need none
            return None
        log.info("svdquant: no calibration statistics for %d layers%s; recording the first %d call(s)",
                 len(missing), "" if first else " of a new set of weights for a shared graph",
                 self.config.calib_calls)
        config = self.config

        def new_stats(s, i: int) -> LayerStats:
            st = LayerStats(s.in_features, config.calib_tokens, seed=config.seed + i, name=s.name)
            attach_stats(s.weight, st)
            return st

        refs = [weakref.ref(inputs[i]) for i in self._widx]
        return _Pending(_calibration_graph(self.gm, missing, new_stats), refs)

    def _compile_inputs(self, inputs: Sequence[Any]) -> list[Any]:
        """The inputs as Inductor must see them: Dynamo's fake tensors of this graph.

        Dynamo calls this graph again for any inputs its guards admit (other instances'
        weights, other slices of one stacked tensor, at other storage offsets); the
        compiled code must hold for all of them, as the code Dynamo would have had
        Inductor compile does. Compiling with one call's real tensors instead re-fakes
        them against the ShapeEnv that traced the graph: a view at another storage
        offset than the traced one contradicts it (``int(sym)=0 != hint=512``), and the
        code would be specialized to that call. Real values are kept where no fake exists
        (a graph not from Dynamo, non-tensor inputs).
        """
        from torch._subclasses.fake_tensor import FakeTensor

        mode = getattr(self._tracing, "fake_mode", None)
        if mode is None or len(self._fakes) != len(inputs):
            return list(inputs)
        return [f if isinstance(x, torch.Tensor) and isinstance(f, FakeTensor) and f.fake_mode is mode else x
                for x, f in zip(inputs, self._fakes)]

    def _weight_key(self, inputs: Sequence[Any]) -> tuple:
        return tuple(id(inputs[i]) for i in self._widx)

    def _finalize(self, inputs: Sequence[Any], sites: Optional[Sequence] = None) -> None:
        """Quantize and compile the variant of ``inputs``' weights (calibrated by now)."""
        from svdq_compile.passes.find_linears import find_linear_sites

        t0 = time.perf_counter()
        inputs = list(inputs)
        sites = find_linear_sites(self.gm, inputs) if sites is None else sites
        qgm, report = quantize_graph(self.gm, inputs, sites, self.config)
        # What this graph read, for reports_for(model) / explain(model).
        report.tensor_refs = [weakref.ref(t) for t in {id(t): t for t in
                              [s.weight for s in sites] + [x for x in inputs if isinstance(x, torch.Tensor)]}.values()]
        _REPORTS.append(report)
        versions = [(s.weight, _version(s.weight)) for s in sites]
        # ops_inserted also counts svdq ops of already-quantized models (quantize()/load()).
        if self.config.use_inductor and (report.rewritten or report.ops_inserted):
            from torch._inductor.compile_fx import compile_fx

            # Inference only: compiling under no_grad makes AOTAutograd build a forward
            # graph (svdq::linear has no backward; quantized training is out of scope).
            self._scalars = _specialize_scalars(qgm, inputs)
            with self._dynamo_context(), torch.no_grad():
                self._fn = compile_fx(qgm, self._compile_inputs(inputs))
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

    def _record(self, key: tuple, args: Sequence[Any]) -> tuple[bool, Any]:
        """Calibrate (record this call if statistics are missing) and quantize the weights of
        ``args``. Returns (True, None) once their variant is built (this call runs it), or
        (False, this call's float output) while more calibration calls are due."""
        from svdq_compile.passes.find_linears import find_linear_sites

        pending = self._pending.get(key)
        if pending is not None and not pending.holds(args, self._widx):
            del self._pending[key]  # ids reused by new tensors: not the weights it was recording
            pending = None
        if pending is None:
            sites = find_linear_sites(self.gm, args)
            pending = self._calibration(sites, args, first=False)
            if pending is None:
                log.info("svdquant: new set of weights for a shared graph; quantizing them")
                self._finalize(args, sites)
                return True, None
            self._pending[key] = pending
        pending.calls += 1
        with torch.no_grad():
            out = pending.gm(*args)
        if pending.calls < self.config.calib_calls:
            return False, out
        del self._pending[key]
        # The variant is built from these statistics and this very call runs it: the
        # output of the call that completes calibration is the quantized one, as for
        # every later call (its float output is only what the statistics were taken on).
        self._finalize(args)
        return True, None

    def _drop_variant(self, key: tuple) -> None:
        variant = self._variants.pop(key, None)
        if variant is not None:
            variant.refs.clear()  # its callbacks must not evict the variant replacing it
        if key == self._key and variant is not None and variant.fn is self._fn:
            self._fn, self._versions, self._key = None, [], None

    def _dynamo_context(self):
        """Re-enter the tracing / compile context Dynamo called the backend in (no-op
        when already inside it or when the backend was called outside Dynamo)."""
        import contextlib

        stack = contextlib.ExitStack()
        if self._tracing is not None and torch._guards.TracingContext.try_get() is not self._tracing:
            stack.enter_context(torch._guards.tracing(self._tracing))
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
        key = self._weight_key(args)
        if key != self._key or self._fn is None:  # the first call, another instance, new (LoRA) tensors
            variant = self._variants.get(key)
            if variant is not None:
                self._key = key
                self._fn, self._versions = variant.fn, variant.versions
            else:
                done, out = self._record(key, args)
                if not done:  # still recording (calib_calls > 1): this call's float output
                    return out
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
