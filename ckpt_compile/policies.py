"""Selective-checkpoint policies, modelled on JAX's ``jax.checkpoint_policies``.

Each policy is a function ``policy(ctx, op, *args, **kwargs) -> CheckpointPolicy`` for
``create_selective_checkpoint_contexts`` (ours or ``torch.utils.checkpoint``'s), eagerly
and under ``torch.compile`` (``backend="ckpt"`` or inductor). Saved values are
``MUST_SAVE`` and everything else ``PREFER_RECOMPUTE``, as with PyTorch's list form, so
that a compiled partitioner honours the same choice as eager (torch's min-cut treats only
``MUST_SAVE`` as binding).

==================================  ============================================
JAX                                 here
==================================  ============================================
``nothing_saveable``                ``save_nothing``
``everything_saveable``             ``save_everything``
``dots_saveable``                   ``save_matmuls`` (also conv and attention)
``dots_with_no_batch_dims_saveable`` ``save_matmuls_without_batch_dims``
``save_only_these_names``           ``save_only_these_names(*names)``
``save_any_names_but_these``        ``save_any_names_but_these(*names)``
``save_and_offload_only_these_names`` ``offload_these_names(*names)``
``save_from_both_policies``         ``save_from_both(p, q)``
(none)                              ``save_ops(*ops, every=n)``
``checkpoint_name``                 ``checkpoint_name(tensor, name)``
==================================  ============================================

>>> import functools, torch, ckpt_compile as cc
>>> from ckpt_compile import policies
>>> def block(x, w):
...     h = cc.checkpoint_name(torch.relu(x @ w), "hidden")
...     return (h @ w).sum()
>>> ctx = functools.partial(cc.create_selective_checkpoint_contexts,
...                         policies.save_only_these_names("hidden"))
>>> x, w = torch.randn(4, 8), torch.randn(8, 8, requires_grad=True)
>>> cc.checkpoint(block, x, w, use_reentrant=False, context_fn=ctx).backward()
>>> w.grad.shape
torch.Size([8, 8])
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ckpt_compile.eager._named_values import NAME_OP
from ckpt_compile.eager._selective import CheckpointPolicy
from ckpt_compile.passes.facts import EXPENSIVE, MATMULS_WITHOUT_BATCH_DIMS, as_policy

__all__ = [
    "checkpoint_name",
    "save_nothing",
    "save_everything",
    "save_matmuls",
    "save_matmuls_without_batch_dims",
    "save_only_these_names",
    "save_any_names_but_these",
    "offload_these_names",
    "save_ops",
    "save_from_both",
]

Policy = Callable[..., CheckpointPolicy]

_SAVE = CheckpointPolicy.MUST_SAVE
_RECOMPUTE = CheckpointPolicy.PREFER_RECOMPUTE
_OFFLOAD = CheckpointPolicy.MUST_CPU_OFFLOAD


# ---------------------------------------------------------------------------- names
# NAME_OP (``ckpt_compile::checkpoint_name``) is defined by the engine, so that it exists
# whatever was imported first (see ckpt_compile.eager._named_values).


def checkpoint_name(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``tensor`` (same values, gradient passes through) marked with ``name``.

    Name-based policies (:func:`save_only_these_names`, :func:`save_any_names_but_these`,
    :func:`offload_these_names`) decide on the marked value; other policies see one cheap
    copy. Traced by ``torch.compile(fullgraph=True)`` without a graph break.

    >>> import torch, ckpt_compile as cc
    >>> x = torch.arange(3.0)
    >>> torch.equal(cc.checkpoint_name(x, "x"), x)
    True
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"checkpoint_name(tensor, name): tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"checkpoint_name(tensor, name): name must be a str, got {type(name).__name__} {name!r}")
    return NAME_OP(tensor, name)


def _name_of(op, args) -> str | None:
    return args[1] if op is NAME_OP and len(args) > 1 else None


def _check_names(api: str, names: tuple) -> frozenset:
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"policies.{api}(*names): names must be str, got {bad!r}")
    return frozenset(names)


# ---------------------------------------------------------------------------- ops
def _is_matmul(op) -> bool:
    # Matrix products, convolutions and fused attention: the partitioner's expensive-op
    # set (ckpt_compile.passes.facts.EXPENSIVE), matched by operator packet.
    return getattr(op, "overloadpacket", None) in EXPENSIVE


# ---------------------------------------------------------------------------- policies
def save_nothing(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Recompute everything (full checkpointing; JAX's ``nothing_saveable``)."""
    return _RECOMPUTE


def save_everything(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save every operator's output (no recomputation; JAX's ``everything_saveable``)."""
    return _SAVE


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save the outputs of matrix products (``mm``, ``addmm``, ``bmm``, ...), convolutions and
    fused attention; recompute the rest (JAX's ``dots_saveable``)."""
    return _SAVE if _is_matmul(op) else _RECOMPUTE


def save_matmuls_without_batch_dims(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save only products without batch dimensions (``mm``, ``addmm``: the linear layers),
    recompute batched ones (``bmm``: attention scores) and all else (JAX's
    ``dots_with_no_batch_dims_saveable``)."""
    return _SAVE if getattr(op, "overloadpacket", None) in MATMULS_WITHOUT_BATCH_DIMS else _RECOMPUTE


def save_only_these_names(*names: str) -> Policy:
    """Save the values marked by :func:`checkpoint_name` with one of ``names``; recompute
    everything else."""
    wanted = _check_names("save_only_these_names", names)

    def policy(ctx, op, *args, **kwargs):
        return _SAVE if _name_of(op, args) in wanted else _RECOMPUTE

    policy.__name__ = policy.__qualname__ = f"save_only_these_names{tuple(sorted(wanted))}"
    return policy


def save_any_names_but_these(*names: str) -> Policy:
    """Save every value marked by :func:`checkpoint_name` except those named in ``names``;
    recompute everything else (unnamed values included)."""
    unwanted = _check_names("save_any_names_but_these", names)

    def policy(ctx, op, *args, **kwargs):
        name = _name_of(op, args)
        return _SAVE if name is not None and name not in unwanted else _RECOMPUTE

    policy.__name__ = policy.__qualname__ = f"save_any_names_but_these{tuple(sorted(unwanted))}"
    return policy


def offload_these_names(*names: str) -> Policy:
    """Offload the values named by :func:`checkpoint_name` with one of ``names`` to CPU
    (``MUST_CPU_OFFLOAD``: copied to host memory in the forward, back for the backward);
    recompute everything else. Values already on CPU are simply kept."""
    wanted = _check_names("offload_these_names", names)

    def policy(ctx, op, *args, **kwargs):
        return _OFFLOAD if _name_of(op, args) in wanted else _RECOMPUTE

    policy.__name__ = policy.__qualname__ = f"offload_these_names{tuple(sorted(wanted))}"
    return policy


class _Count:
    """Calls counted by one copy of a counting policy (see :func:`save_ops`)."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0

    def next(self) -> int:
        index, self.calls = self.calls, self.calls + 1
        return index

    def __repr__(self) -> str:  # stable: the backend's cache key describes policies by repr
        return "_Count()"


def save_ops(*ops, every: int = 1) -> Policy:
    """Save the outputs of the listed aten operators, or, with ``every=n``, of their 1st,
    (n+1)-th, (2n+1)-th ... call in each run of a checkpointed region (the listed ops'
    calls counted together, in program order; torchtitan's "save every other matmul" is
    ``save_ops(torch.ops.aten.mm.default, every=2)``). Everything else is recomputed.

    How the count restarts per region run, without looking at who calls: the policy
    offers ``fresh_per_region()``, a copy counting from 0, and
    ``cc.create_selective_checkpoint_contexts`` takes one per context pair, that is per
    run of a region (forward, or trace under ``torch.compile``), as torchtitan builds its
    counting policy per region. Called directly, or through torch's
    ``create_selective_checkpoint_contexts`` (which knows no such copy), the policy counts
    over its whole life; with torch's, build one per region instead:
    ``context_fn=lambda: create_selective_checkpoint_contexts(save_ops(mm, every=2))``.

    ``ops`` are ``OpOverload`` (``torch.ops.aten.mm.default``) or ``OpOverloadPacket``
    (``torch.ops.aten.mm``: all its overloads).

    >>> import torch
    >>> every_other = save_ops(torch.ops.aten.mm.default, every=2)
    >>> [every_other(None, torch.ops.aten.mm.default).name for _ in range(3)]  # called directly
    ['MUST_SAVE', 'PREFER_RECOMPUTE', 'MUST_SAVE']
    """
    overloads, packets = set(), set()
    for op in ops:
        if isinstance(op, torch._ops.OpOverload):
            overloads.add(op)
        elif isinstance(op, torch._ops.OpOverloadPacket):
            packets.add(op)
        else:
            raise TypeError(
                f"policies.save_ops(*ops, every): each op must be a torch operator such as "
                f"torch.ops.aten.mm.default or torch.ops.aten.mm, got {op!r} ({type(op).__name__})"
            )
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"policies.save_ops(*ops, every): every must be an int >= 1, got {every!r}")
    listed = ", ".join(str(op) for op in ops)

    def make(count: _Count | None) -> Policy:
        def policy(ctx, op, *args, **kwargs):
            if op not in overloads and getattr(op, "overloadpacket", None) not in packets:
                return _RECOMPUTE
            if count is None:
                return _SAVE
            return _SAVE if count.next() % every == 0 else _RECOMPUTE

        policy.__name__ = policy.__qualname__ = f"save_ops({listed}, every={every})"
        if count is not None:
            policy.fresh_per_region = lambda: make(_Count())
        return policy

    return make(_Count() if every > 1 else None)


# Rank of each decision when two policies are merged: save beats offload beats recompute.
_KIND = {
    CheckpointPolicy.MUST_SAVE: 2, CheckpointPolicy.PREFER_SAVE: 2,
    CheckpointPolicy.MUST_CPU_OFFLOAD: 1, CheckpointPolicy.PREFER_CPU_OFFLOAD: 1,
    CheckpointPolicy.MUST_RECOMPUTE: 0, CheckpointPolicy.PREFER_RECOMPUTE: 0,
}
_MUST = frozenset({CheckpointPolicy.MUST_SAVE, CheckpointPolicy.MUST_CPU_OFFLOAD, CheckpointPolicy.MUST_RECOMPUTE})


def _as_policy(value: Any, which: Callable, op) -> CheckpointPolicy:
    policy = as_policy(value)  # a member, or torch's older boolean form (True means save)
    if policy is not None:
        return policy
    raise TypeError(
        f"policies.save_from_both: {getattr(which, '__name__', which)!r} returned {value!r} for {op}; "
        "expected a CheckpointPolicy member or a bool"
    )


def save_from_both(p: Policy, q: Policy) -> Policy:
    """Save what either policy saves (JAX's ``save_from_both_policies``): save beats
    offload beats recompute, and the result is ``MUST_*`` when a policy that chose that
    kind said ``MUST``. Both policies are asked about every operator, so counting
    policies such as :func:`save_ops` keep their count.

    >>> import torch
    >>> both = save_from_both(save_matmuls, save_only_these_names("attn"))
    >>> both(None, torch.ops.aten.mm.default).name, both(None, torch.ops.aten.sin.default).name
    ('MUST_SAVE', 'PREFER_RECOMPUTE')
    """
    for which in (p, q):
        if not callable(which):
            raise TypeError(f"policies.save_from_both(p, q): policies must be callable, got {which!r}")

    fresh = [getattr(which, "fresh_per_region", None) for which in (p, q)]

    def policy(ctx, op, *args, **kwargs):
        a = _as_policy(p(ctx, op, *args, **kwargs), p, op)
        b = _as_policy(q(ctx, op, *args, **kwargs), q, op)
        if _KIND[a] != _KIND[b]:
            return a if _KIND[a] > _KIND[b] else b
        return a if a in _MUST else b

    policy.__name__ = policy.__qualname__ = (
        f"save_from_both({getattr(p, '__name__', p)}, {getattr(q, '__name__', q)})"
    )
    if any(fresh):  # a counting policy inside: a fresh pair per region run (see save_ops)
        policy.fresh_per_region = lambda: save_from_both(*(f() if f else w for f, w in zip(fresh, (p, q))))
    return policy
