"""Selective activation checkpointing: a policy decides, per operator, save or recompute.

``create_selective_checkpoint_contexts(policy)`` returns two dispatch modes, used as
``context_fn`` of a non-reentrant checkpoint: the first runs in the forward and caches the
outputs of the operators the policy saves; the second runs in the recomputation and hands
those cached outputs back instead of recomputing them. ``CheckpointPolicy`` is torch's own
enum object, so policies written for ``torch.utils.checkpoint`` work unchanged.

Unlike PyTorch 2.13, which treats ``MUST_CPU_OFFLOAD`` / ``PREFER_CPU_OFFLOAD`` as
recompute in eager mode, we really offload: the output is copied to CPU (pinned memory when
it lives on CUDA) in the forward and copied back to its device whenever a recomputation
needs it (each backward, including a second or a double one), so the operator is not rerun.

A value named with ``cc.checkpoint_name`` and saved (or offloaded) by the policy is cached in
its producer's place, so the producer is not recomputed only to be named again (PyTorch's
engine caches the name's copy and reruns the producer).

The cache lives outside autograd, so ``saved_tensors_hooks`` (``save_on_cpu``) never see it
unless the region is checkpointed with ``respect_saved_tensors_hooks=True`` (torch 2.14's
keyword, offered on every torch): then each cached output is packed by the user's hooks in
the forward and unpacked when the recomputation takes it. Operators in
``SAC_IGNORED_OPS`` (torch's own set) are never cached.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
import torch.fx.traceback as fx_traceback
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import CheckpointPolicy

from ckpt_compile.eager._named_values import aliases, is_name_op, storage_ptr
from ckpt_compile.passes.facts import as_policy
from ckpt_compile.eager._torch_api import (
    SAC_IGNORED_OPS,
    TORCH_HAS_RESPECT_HOOKS,
    _current_user_saved_tensors_hooks,
)

__all__ = ["CheckpointPolicy", "SelectiveCheckpointContext", "create_selective_checkpoint_contexts"]

_SAVE = frozenset({CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE})
_OFFLOAD = frozenset(
    getattr(CheckpointPolicy, name)
    for name in ("MUST_CPU_OFFLOAD", "PREFER_CPU_OFFLOAD")
    if hasattr(CheckpointPolicy, name)
)


_RECOMPUTE = object()
_CONSUMED = object()
# Lists collecting every forward mode created while a `_observe_caches()` block is open.
_OBSERVERS: list[list] = []


class SelectiveCheckpointContext:
    """What a selective-checkpoint policy function receives as its first argument.

    ``is_recompute`` is ``False`` in the forward (the only time the policy is asked), and
    ``op_output`` is the operator's output there.
    """

    def __init__(self, *, is_recompute: bool, op_output: Any = None) -> None:
        self.is_recompute = is_recompute
        self.op_output = op_output


def _detach_keeping_version(x: Any) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    # Detach beneath autograd so that a view keeps sharing its base's version counter
    # (mutation detection) and the cached tensor holds no autograd graph (no cycles).
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
        return x.detach()


class _Cached:
    """One cached operator output: kept as is, offloaded to CPU, or packed by the user's
    saved-tensors hooks (``hooks``: ``respect_saved_tensors_hooks=True``)."""

    __slots__ = ("value", "version", "device", "offload", "stand_in", "unpack")

    def __init__(self, value: torch.Tensor, offload: bool, hooks: tuple | None = None, stand_in: bool = False) -> None:
        # stand_in: cached only because a saved `checkpoint_name` copies this output (see
        # `_SaveMode._serve_name`); if it changes in place, recomputing it is still right.
        self.stand_in = stand_in
        self.device = None
        self.offload = offload
        self.unpack = None
        if hooks is not None:
            # Whatever the pack hook returns is opaque (save_on_cpu: a device and a CPU
            # copy): no version to check, as in torch.
            self.value = hooks[0](_detach_keeping_version(value))
            self.unpack = hooks[1]
            self.version = None
            return
        if offload and value.device.type != "cpu":
            self.device = value.device
            host = torch.empty_strided(
                value.size(), value.stride(), dtype=value.dtype, device="cpu",
                pin_memory=value.device.type == "cuda",
            )
            value = host.copy_(value, non_blocking=True)
            self.version = None  # a private copy: later mutations of the source cannot reach it
        else:
            value = _detach_keeping_version(value)
            self.version = value._version
        self.value = value

    def get(self, func, allow_mutation: bool) -> torch.Tensor:
        if self.unpack is not None:
            return self.unpack(self.value)
        if self.device is not None:
            return self.value.to(self.device, non_blocking=True)
        if self.version is not None and not allow_mutation and self.value._version != self.version:
            raise RuntimeError(
                "Tensor cached during selective activation checkpoint has been mutated "
                f"(an output of {func} was modified in place after it was cached). Avoid the "
                "in-place operation, or pass allow_cache_entry_mutation=True to "
                "create_selective_checkpoint_contexts to accept the mutated value."
            )
        if self.offload:
            # An offloaded entry outlives the recomputation (a second backward needs it),
            # so hand out a fresh alias, never the cached tensor itself: autograd sets the
            # returned tensor's grad_fn, whose saved tensors hold the recomputation's pack
            # hook, which holds this cache, a cycle through C++ that gc cannot break
            # (3 tensors a region a step stayed alive; issue 17).
            return _detach_keeping_version(self.value)
        return self.value


def _is_tracing() -> bool:
    # Under AOTAutograd / make_fx tracing a proxy mode is active: the policy becomes a
    # node tag for the compiler's partitioner instead of an eager cache decision.
    if torch.compiler._is_non_strict_tracing():
        return False
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None


def _as_policy(value: Any, func) -> CheckpointPolicy:
    policy = as_policy(value)  # a member, or PyTorch's older boolean form (True means save)
    if policy is not None:
        return policy
    raise TypeError(
        f"selective checkpoint policy returned {value!r} for {func}; expected a "
        "CheckpointPolicy member (MUST_SAVE, PREFER_SAVE, MUST_RECOMPUTE, PREFER_RECOMPUTE, "
        "MUST_CPU_OFFLOAD, PREFER_CPU_OFFLOAD) or a bool."
    )


class _SaveMode(TorchDispatchMode):
    """Forward half: asks the policy about each operator and caches what it saves."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self, policy_fn: Callable, storage: dict, ac_graph_id: int | None = None) -> None:
        super().__init__()
        self.policy_fn = policy_fn
        self.storage = storage
        self.ac_graph_id = ac_graph_id  # set by torch's checkpoint HOP under torch.compile
        # Set by checkpoint after construction (torch's protocol): route the cache through
        # the user's saved_tensors_hooks (True), not (False), not and warn on 2.14+ (None).
        self.respect_saved_tensors_hooks: bool | None = None
        self.calls: dict = defaultdict(int)
        # Storage pointer -> (op, call index, layout) of the outputs that own their storage,
        # so a saved name can be served by the output it copies (see `_serve_name`).
        self.producers: dict[int, tuple] = {}
        for observer in _OBSERVERS:
            observer.append(self)

    def __exit__(self, *exc):
        if self.producers:
            self.producers.clear()  # only the forward reads it; keep nothing until the backward
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracing = _is_tracing()
        if tracing:
            fx_traceback.current_meta["ac_graph_id"] = self.ac_graph_id
            fx_traceback.current_meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        graph = None
        if tracing:
            from torch.fx.experimental.proxy_tensor import get_proxy_mode

            proxy_mode = get_proxy_mode()
            graph = proxy_mode.tracer.graph if proxy_mode is not None else None
            before = len(graph.nodes) if graph is not None else 0
        out = func(*args, **kwargs)
        index = self.calls[func]
        self.calls[func] += 1
        policy = _as_policy(
            self.policy_fn(SelectiveCheckpointContext(is_recompute=False, op_output=out), func, *args, **kwargs),
            func,
        )
        if graph is not None:
            for node in list(graph.nodes)[before:]:
                node.meta["recompute"] = policy
        if tracing or policy in _SAVE:
            hooks = None if tracing else self._user_hooks()
            self.storage[func][index] = tree_map(
                lambda x: _Cached(x, False, hooks) if isinstance(x, torch.Tensor) else x, out
            )
        elif policy in _OFFLOAD:
            self.storage[func][index] = tree_map(lambda x: _Cached(x, True) if isinstance(x, torch.Tensor) else x, out)
        else:
            self.storage[func][index] = _RECOMPUTE
        if not tracing:
            if is_name_op(func) and (policy in _SAVE or policy in _OFFLOAD):
                self._serve_name(func, index, args[0], policy in _OFFLOAD)
            elif not func.is_view and (ptr := storage_ptr(out)) and not aliases(ptr, args):
                # Metadata only (no reference: the output may be freed). An op returning an
                # alias of its input without being marked a view (`_unsafe_view`, in-place
                # ops) does not replace the storage's producer.
                self.producers[ptr] = (func, index, out.size(), out.stride(), out.storage_offset(),
                                       out.dtype, out.untyped_storage().nbytes())
        return out

    def _serve_name(self, func, index: int, value: torch.Tensor, offload: bool) -> None:
        # `cc.checkpoint_name(x, name)` is a copy of x. The recomputation reruns the region,
        # so caching only the copy would still recompute x's producer (an mm, say) just to
        # copy it again: cache x itself in the producer's slot instead, and let the cheap
        # copy rerun. Same bytes, and a saved name then saves its producer's work, as a
        # compiled partitioner does by dead-code elimination. The name may see the output
        # through a view of all of it (a linear layer on 3-d input ends in a reshape); a
        # view of part of a storage, or a multi-output op, is left alone (caching its
        # producer would keep more bytes alive than the copy).
        ptr = storage_ptr(value)
        if not ptr or ptr not in self.producers:
            return
        func_in, index_in, size, stride, offset, dtype, nbytes = self.producers[ptr]
        if dtype != value.dtype or nbytes != value.untyped_storage().nbytes() or size.numel() != value.numel():
            return
        entries = self.storage[func_in]
        if entries.get(index_in) is _RECOMPUTE:
            # Rebuilt as the producer's output; ADInplaceOrView on, so it shares the named
            # value's version counter and a later in-place change is noticed.
            with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
                base = value.as_strided(size, stride, offset)
            entries[index_in] = _Cached(base, offload, stand_in=True)
        self.storage[func][index] = _RECOMPUTE

    def _user_hooks(self) -> tuple | None:
        """The user's saved-tensors hooks the cache must go through, or None."""
        hooks = _current_user_saved_tensors_hooks()
        if hooks is None:
            return None
        if self.respect_saved_tensors_hooks is None and TORCH_HAS_RESPECT_HOOKS:
            warnings.warn(
                "A saved_tensors_hooks context (e.g. save_on_cpu) is active around a selective "
                "activation checkpoint region. Tensors that SAC saves currently bypass these "
                "hooks, but a future release will route them through the hooks like any other "
                "saved tensor. Silence this warning and choose the behavior explicitly by "
                "passing respect_saved_tensors_hooks=True|False to ckpt_compile.checkpoint.",
                FutureWarning,
                stacklevel=3,
            )
        return hooks if self.respect_saved_tensors_hooks else None


@contextlib.contextmanager
def _observe_caches() -> Iterator[list]:
    """Collect the forward mode of every selective region created inside the block, so
    diagnostics can add their caches (see :func:`_cached_storages`) to saved bytes."""
    found: list = []
    _OBSERVERS.append(found)
    try:
        yield found
    finally:
        _OBSERVERS.remove(found)


def _cached_tensors(forward_mode: _SaveMode) -> Iterator[torch.Tensor]:
    """The tensors a region's cache holds (outputs kept, offloaded, or packed by the
    user's hooks): saved-activation memory that a saved-tensors hook cannot see, because
    autograd does not save it. Diagnostics and the planner both count it from here."""
    for entries in forward_mode.storage.values():
        for entry in entries.values():
            for leaf in torch.utils._pytree.tree_leaves(entry):
                if not isinstance(leaf, _Cached):
                    continue
                # A value packed by user hooks may be a container (save_on_cpu: a tuple).
                for tensor in torch.utils._pytree.tree_leaves(leaf.value):
                    if isinstance(tensor, torch.Tensor):
                        yield tensor


def _cached_storages(forward_mode: _SaveMode) -> dict[int, int]:
    """Storages (data pointer -> bytes) of :func:`_cached_tensors`."""
    storages = (t.untyped_storage() for t in _cached_tensors(forward_mode))
    return {storage.data_ptr(): storage.nbytes() for storage in storages}


class _ReplayMode(TorchDispatchMode):
    """Recomputation half: hands back cached outputs, reruns everything else."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self, storage: dict, allow_cache_entry_mutation: bool) -> None:
        super().__init__()
        self.storage = storage
        self.allow_mutation = allow_cache_entry_mutation
        self.calls: dict = defaultdict(int)

    def __enter__(self):
        self.calls.clear()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        index = self.calls[func]
        self.calls[func] += 1
        entries = self.storage.get(func)
        entry = None if entries is None else entries.get(index)
        if entry is None:
            raise RuntimeError(
                f"{func} (call #{index} of that operator) ran during the recomputation but not "
                "in the original forward. This can happen if the operations in the checkpointed "
                "region are nondeterministic or depend on global state that changed between "
                "forward and backward."
            )
        if entry is _CONSUMED:
            raise RuntimeError(
                "Trying to backward an extra time. You are only allowed to backward once "
                "on any region computed under selective activation checkpoint."
            )
        if entry is _RECOMPUTE or _mutated_stand_in(entry):
            return func(*args, **kwargs)
        out = tree_map(lambda c: c.get(func, self.allow_mutation) if isinstance(c, _Cached) else c, entry)
        if not _is_offloaded(entry):
            entries[index] = _CONSUMED  # free a saved output as soon as it is handed back
        # An offloaded output stays in host memory until the region is freed, and each
        # recomputation gets its own device copy: a second backward (retain_graph=True) or
        # a double backward recomputes the region again, which PyTorch allows for these
        # policies (it recomputes them), so it must work here too (issue 10, fault 6b).
        return out


def _is_offloaded(entry: Any) -> bool:
    return any(isinstance(c, _Cached) and c.offload for c in torch.utils._pytree.tree_leaves(entry))


def _mutated_stand_in(entry: Any) -> bool:
    return isinstance(entry, _Cached) and entry.stand_in and entry.version is not None and (
        entry.value._version != entry.version
    )


def create_selective_checkpoint_contexts(policy_fn_or_list, allow_cache_entry_mutation: bool = False):
    """The ``(forward, recompute)`` context pair for selective activation checkpointing.

    Args:
        policy_fn_or_list: a function ``policy(ctx, op, *args, **kwargs)`` returning a
            :class:`CheckpointPolicy` (or a bool, ``True`` = save) for each aten operator,
            or a list of ``OpOverload`` to save (everything else is recomputed).
        allow_cache_entry_mutation: by default, an in-place change to a cached output
            before the backward is an error; ``True`` accepts it.

    ``MUST_CPU_OFFLOAD`` / ``PREFER_CPU_OFFLOAD`` really offload the output to CPU and bring
    it back (PyTorch 2.13 recomputes such operators instead); the host copy lives until the
    region is freed, so a second or a double backward works as with PyTorch.

    >>> import functools, torch, ckpt_compile as cc
    >>> ctx = functools.partial(cc.create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    >>> x = torch.randn(8, 8, requires_grad=True)
    >>> y = cc.checkpoint(lambda t: (t @ t).relu(), x, use_reentrant=False, context_fn=ctx)
    >>> y.sum().backward()
    """
    if isinstance(policy_fn_or_list, (list, tuple, set, frozenset)):
        ops = frozenset(policy_fn_or_list)
        for op in ops:
            if not isinstance(op, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
                hint = (
                    " Please update the OpOverloadPacket to a specific OpOverload. For example, "
                    "if you have `torch.ops.aten.mm`, change it to `torch.ops.aten.mm.default`."
                    if isinstance(op, torch._ops.OpOverloadPacket) else ""
                )
                raise ValueError(
                    f"Expected op in `op_list` to be an OpOverload but got: {op} of type {type(op)}.{hint}"
                )

        def policy_fn(ctx, op, *args, **kwargs):
            return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE
    elif callable(policy_fn_or_list):
        policy_fn = policy_fn_or_list
    else:
        raise TypeError(
            "policy_fn_or_list must be either a function or a list of ops, got "
            f"{type(policy_fn_or_list).__name__}."
        )
    # A policy that counts its calls (policies.save_ops(every=n)) offers a fresh copy per
    # region run: each context pair is one run of one region (as torchtitan builds its
    # counting policy per region), so the count restarts there, forward and trace alike.
    fresh = getattr(policy_fn, "fresh_per_region", None)
    if callable(fresh):
        policy_fn = fresh()
    storage: dict = defaultdict(dict)
    return _SaveMode(policy_fn, storage), _ReplayMode(storage, allow_cache_entry_mutation)
