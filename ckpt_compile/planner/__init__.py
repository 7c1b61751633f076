"""The planner: ``cc.plan(model, *example_inputs, memory_budget=...)`` chooses, per block,
no checkpoint, full checkpoint, a selective policy or CPU offload, so that the model's
saved activation bytes fit a budget at the least recompute.

Four steps with plain data between them (docs/design.md, "The planner"): ``_measure``
runs the model on fake tensors and records what each block saves and recomputes under each option;
``_pose`` turns those storage sets into the solver's table; ``_solve`` is the exact
dynamic programme (pure Python, no torch); ``_plan`` holds ``CheckpointPlan`` (a frozen
dataclass: table, JSON, ``apply``) and ``plan()`` itself.

May import: the eager engine (``ckpt_compile.eager``), ``ckpt_compile.policies``, the
module wrappers (``ckpt_compile.modules``), ``ckpt_compile.diagnostics`` and
``ckpt_compile.passes``. Never the compile backend or the CLI.
"""
from ckpt_compile.planner._plan import BlockChoice, CheckpointPlan, plan

__all__ = ["plan", "CheckpointPlan", "BlockChoice"]
