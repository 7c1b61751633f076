"""Capture of ``ckpt_compile.checkpoint`` regions while Dynamo traces a compiled model.

``ckpt_compile.checkpoint`` calls :func:`checkpoint_under_dynamo` when
``torch.compiler.is_dynamo_compiling()``; Dynamo inlines it like any Python function.

Why delegate to ``torch.utils.checkpoint.checkpoint``: Dynamo recognises that one function
by identity and lowers the region to the ``tag_activation_checkpoint`` higher-order op.
Tracing the HOP with AOTAutograd writes ``meta["recompute"]`` and ``meta["ac_graph_id"]``
on every forward node of the region, and runs the ``context_fn`` modes while it traces,
so a selective policy (ours from ``ckpt_compile.create_selective_checkpoint_contexts`` or
PyTorch's) is evaluated per aten op and its answer lands on the node. That is exactly the
annotation our tagging pass (``ckpt_compile.passes.tag_recompute``) consumes, identical for
regions written with ``torch.utils.checkpoint`` and with ``ckpt_compile``. The
alternative, ``torch.fx.traceback.annotate``, accepts only Python constants (no policy
function) and silently leaves the whole frame uncompiled on a graph break inside the
block; the tagging pass still honours such annotations written by hand.

The call handed on is the user's call: the same ``use_reentrant``, ``preserve_rng_state``,
``determinism_check`` ... keywords torch would record for it, nothing added, so a graph
captured from ``ckpt_compile.checkpoint`` and one captured from ``torch.utils.checkpoint``
are the same (issue 10). What Dynamo's lowering drops and the backend restores:
``preserve_rng_state`` (random ops are kept exact by the tagging pass, always), region
boundaries (saved as eager does), and CPU-offload policies (kept on the nodes for our
partitioner). ``use_reentrant`` does not change the compiled graph (both variants trace to
the same HOP), so no warning is issued for ``None`` under compile, as with PyTorch.
``determinism_check``, ``debug`` and ``early_stop`` are checks of the eager recomputation;
a compiled recompute is part of the backward graph, so they are validated and then have
nothing to act on.

When Dynamo cannot trace the region body it falls back to running the checkpoint call
eagerly; ``ckpt_compile.checkpoint`` then takes its eager path, which keeps Dynamo off
for the region and its recomputation (``_run_fn_with_dynamo_disabled`` semantics).
"""
from __future__ import annotations

import torch.utils.checkpoint as torch_checkpoint

from ckpt_compile.eager._common import _skip_as_fresh_frame, noop_context_fn
from ckpt_compile.eager._non_reentrant import _metadata_fn
from ckpt_compile.eager._torch_api import TORCH_HAS_RESPECT_HOOKS, reentrant_options_message

__all__ = ["checkpoint_under_dynamo"]


# The keywords of ``ckpt_compile.checkpoint`` and their defaults (``context_fn`` apart).
_DEFAULTS = {
    "use_reentrant": None,
    "determinism_check": "default",
    "debug": False,
    "early_stop": True,
    "preserve_rng_state": True,
    "respect_saved_tensors_hooks": None,
}


def checkpoint_under_dynamo(function, args: tuple, kwargs: dict, options: dict):
    """Record ``function(*args, **kwargs)`` as a checkpoint region in the traced graph.

    Called by ``ckpt_compile.checkpoint`` only while Dynamo traces; ``options`` holds its
    keywords by name. Only the keywords that differ from their defaults are handed on, so
    the recorded ``tag_activation_checkpoint`` call is the one ``torch.utils.checkpoint``
    records for the same call. Two differences: a keyword passed with its default value
    is not recorded (torch records it; the graph is the same), and ``debug=True`` is not
    handed on (torch fails to trace it; it has nothing to act on in a compiled region).
    """
    _metadata_fn(options["determinism_check"])  # the eager engine's validation and message
    context_fn = options["context_fn"]
    respect = options["respect_saved_tensors_hooks"]
    if options["use_reentrant"] and (context_fn is not noop_context_fn or options["debug"] or respect is not None):
        raise ValueError(reentrant_options_message(respect is not None))
    passed = {
        name: options[name]
        for name, default in _DEFAULTS.items()
        if not (type(options[name]) is type(default) and options[name] == default)
    }
    # torch's own call with debug=True fails while Dynamo traces it (its debug mode is a
    # context_fn, and the compiled region's policy is another); a compiled recompute has
    # no eager trace to show, so debug is validated above and not handed on.
    passed.pop("debug", None)
    if not TORCH_HAS_RESPECT_HOOKS:
        # torch 2.13 would take it for an argument of `function`; under compile it has
        # nothing to act on anyway (selective caches are a tracing artifact there).
        passed.pop("respect_saved_tensors_hooks", None)
    # Dynamo chooses plain checkpointing only when no context_fn is passed at all (any
    # context_fn argument, even torch's noop_context_fn, is taken as a selective policy
    # and leaves the region untagged), so neither no-op is handed on.
    if context_fn is not noop_context_fn and context_fn is not torch_checkpoint.noop_context_fn:
        passed["context_fn"] = context_fn
    return torch_checkpoint.checkpoint(function, *args, **passed, **kwargs)


# After a graph break at a checkpoint call, the eager fallback stays on our engine
# (`ckpt_compile.checkpoint` marks its own frame the same way).
_skip_as_fresh_frame(checkpoint_under_dynamo.__code__)
