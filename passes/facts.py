"""Facts about the nodes of an AOTAutograd joint graph, each decided in one place.

Every pass (and the backend, the diagnostics, the policies) asks here rather than
deciding again: which placeholder is a primal, a tangent or an RNG seed; whether a node
mutates, draws random numbers, or is a compute-bound operator; how many bytes a value
holds; how a selective policy's answer reads as a ``CheckpointPolicy``; and why a value
may not be recomputed. This module imports nothing of ours, so the engine
(``ckpt_compile.eager``) may import it too.

Example::

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> gm = make_fx(lambda primals, tangents: [primals.sin(), tangents * primals.cos()])(
    ...     torch.randn(512, 512), torch.randn(512, 512))
    >>> [placeholder_kind(n).name for n in gm.graph.find_nodes(op="placeholder")]
    ['PRIMAL', 'TANGENT']
    >>> value_nbytes(next(iter(gm.graph.nodes)).meta["val"])   # a 512x512 float32: 1 MiB
    1048576
"""
from __future__ import annotations

import enum
import math
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils.checkpoint import CheckpointPolicy

__all__ = [
    "EXPENSIVE", "MATMULS_WITHOUT_BATCH_DIMS", "NoRecompute", "PlaceholderKind", "TagReason", "as_policy",
    "draws_random", "is_graph_input", "mutates", "placeholder_kind", "random_recompute_differs",
    "size_hint", "tensors_of", "value_nbytes",
]

aten = torch.ops.aten


# ---------------------------------------------------------------------------- placeholders
class PlaceholderKind(enum.Enum):
    """What a joint graph's placeholder carries (AOTAutograd names them; torch's
    partitioner reads the same names: ``_is_tangent``, ``_is_bwd_seed_offset``...)."""

    PRIMAL = "primal"  # a forward input: parameter, buffer or user input
    TANGENT = "tangent"  # a gradient of a forward output, read by the backward only
    FORWARD_SEED = "forward seed"  # functionalized RNG: the forward's seed and offset
    BACKWARD_SEED = "backward seed"  # functionalized RNG: the backward's seed and offset
    BACKWARD_STATE = "backward state"  # compiled autograd's BackwardState (a forward input too)

    @property
    def forward_input(self) -> bool:
        """Whether the forward graph takes it (torch's ``_is_primal``: all but the
        tangents and the RNG seeds)."""
        return self in (PlaceholderKind.PRIMAL, PlaceholderKind.BACKWARD_STATE)

    @property
    def backward_input(self) -> bool:
        """Whether the backward reads it without the forward computing it."""
        return self is not PlaceholderKind.PRIMAL and self is not PlaceholderKind.FORWARD_SEED


def placeholder_kind(node: fx.Node) -> PlaceholderKind:
    """The kind of a placeholder of a joint graph (``ValueError`` for another node)."""
    if node.op != "placeholder":
        raise ValueError(f"placeholder_kind(node): expected a placeholder, got {node.format_node()}")
    name = str(node.target)
    if name.startswith("tangents"):
        return PlaceholderKind.TANGENT
    if "bwd_seed" in name or "bwd_base_offset" in name:
        return PlaceholderKind.BACKWARD_SEED
    if "fwd_seed" in name or "fwd_base_offset" in name:
        return PlaceholderKind.FORWARD_SEED
    if type(node.meta.get("val")).__name__ == "BackwardState":
        return PlaceholderKind.BACKWARD_STATE
    return PlaceholderKind.PRIMAL


def is_graph_input(node: fx.Node) -> bool:
    """A placeholder or a ``get_attr``: alive anyway, so saving it costs no activation bytes."""
    return node.op in ("placeholder", "get_attr")


# ---------------------------------------------------------------------------- operators
def mutates(node: fx.Node) -> bool:
    """Whether ``node`` calls an operator that changes one of its inputs in place."""
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _packets(*names: str) -> frozenset:
    # Looked up by name so that an operator missing from this torch build is skipped.
    return frozenset(p for p in (getattr(aten, name, None) for name in names) if p is not None)


# Matrix products without batch dimensions (one product per call; JAX's
# dots_with_no_batch_dims): the linear layers.
MATMULS_WITHOUT_BATCH_DIMS = _packets("mm", "addmm", "mv", "addmv", "dot", "_int_mm", "_scaled_mm")
# Compute-bound operators (operator packets): every matrix product, convolution and fused
# attention. Outside a checkpoint region the partitioner never recomputes them at
# memory_budget=1 (the judgement torch's partitioner makes), and ``policies.save_matmuls``
# saves them.
EXPENSIVE = MATMULS_WITHOUT_BATCH_DIMS | _packets(
    "bmm", "baddbmm", "addbmm", "convolution", "_convolution", "cudnn_convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
    "_efficient_attention_forward",
)
# Attention kernels carry a dropout_p argument and the random-op tag, but draw no random
# numbers when dropout_p is 0 (on CPU every SDPA call is tagged random, see docs/torch-notes.md).
_ATTENTION = frozenset(p for p in EXPENSIVE if "attention" in p.__name__)


def draws_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers: tagged ``nondeterministic_seeded``, except an
    attention kernel called with ``dropout_p == 0`` (SDPA carries the tag regardless)."""
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded not in tags:
        return False
    if getattr(node.target, "overloadpacket", None) in _ATTENTION:
        return _argument(node, "dropout_p", 0.0) != 0.0
    return True


def random_recompute_differs(node: fx.Node) -> bool:
    """A random op whose recompute would draw new numbers: the tagging pass did not mark
    its recompute exact (``meta["ckpt_rng_exact"]``, inductor's seeded random)."""
    return draws_random(node) and not node.meta.get("ckpt_rng_exact", False)


def _argument(node: fx.Node, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    for position, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            return node.args[position] if position < len(node.args) else default
    return default


# ---------------------------------------------------------------------------- sizes
# A size with no hint (an unbacked SymInt: data-dependent, from nonzero() or item()) counts
# as 8192, inductor's `unbacked_symint_fallback`; a backed symbolic size (dynamic=True)
# counts at its hint, the example input's size. One rule for saved bytes everywhere: the
# plan, the backend's figures and the diagnostics' reports agree.
UNBACKED_SIZE = 8192


def size_hint(x: Any) -> int:
    """A concrete int for a size (an int, or a SymInt at its hint; see :data:`UNBACKED_SIZE`)."""
    if isinstance(x, torch.SymInt):
        return int(optimization_hint(x, fallback=UNBACKED_SIZE))
    return int(x)


def tensors_of(val: Any) -> list[torch.Tensor]:
    """The tensors in a ``meta["val"]`` (a tensor, or nested lists / tuples of them)."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in tensors_of(v)]
    return []


def value_nbytes(val: Any) -> int:
    """Bytes of the tensor(s) in a ``meta["val"]``: elements times element size, each
    dimension at :func:`size_hint`."""
    return sum(math.prod(size_hint(s) for s in t.shape) * t.element_size() for t in tensors_of(val))


# ---------------------------------------------------------------------------- policies
def as_policy(value: Any) -> CheckpointPolicy | None:
    """A selective policy's answer as a ``CheckpointPolicy``: a member as is, a ``bool``
    by PyTorch's convention (``True``: ``MUST_SAVE``, ``False``: ``PREFER_RECOMPUTE``);
    None for anything else (the caller names its API in the error)."""
    if isinstance(value, CheckpointPolicy):
        return value
    if isinstance(value, bool):
        return CheckpointPolicy.MUST_SAVE if value else CheckpointPolicy.PREFER_RECOMPUTE
    return None


# ---------------------------------------------------------------------------- reasons
class NoRecompute(enum.Enum):
    """Why a forward value may not be recomputed (the text is what reports show)."""

    GRAPH_INPUT = "graph input"
    MUTATION = "mutates its input"
    TAGGED_MUST_SAVE = "tagged MUST_SAVE"
    TAGGED_MUST_CPU_OFFLOAD = "tagged MUST_CPU_OFFLOAD"
    TAGGED_PREFER_CPU_OFFLOAD = "tagged PREFER_CPU_OFFLOAD"
    RANDOM = "random op without exact recompute"
    RNG_STATE = "RNG state of a random op (what makes its recompute exact)"
    SYMBOLIC = "symbolic size (saved as a SymInt)"
    NOT_A_TENSOR = "not a tensor"
    EXPENSIVE = "expensive op outside a checkpoint region"
    BOUNDARY = "output of a checkpoint region"

    @classmethod
    def tagged(cls, policy: CheckpointPolicy) -> NoRecompute:
        return cls[f"TAGGED_{policy.name}"]

    def __str__(self) -> str:
        return self.value


class TagReason(str, enum.Enum):
    """Why the tagging pass changed a node's policy (``node.meta["ckpt_tag_reason"]``).
    A ``str`` too, so a reader comparing the meta to ``"boundary"`` keeps working."""

    BOUNDARY = "boundary"  # a region's output read by another region: saved as eager saves it
    RANDOM = "random"  # a random op (or a value from random values alone): saved
    RANDOM_EXACT = "random_exact"  # inductor's seeded random: recomputed exactly
    RNG_REPLAY = "rng_replay"  # a random op recomputed with the forward's RNG state (.rng_replay)
    RNG_STATE = "rng_state"  # that RNG state: saved when the op is recomputed
    ANNOTATION = "annotation"  # a region from torch.fx.traceback.annotate
