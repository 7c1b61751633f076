"""The memory of a whole training step: ``estimate_memory`` (fake tensors), ``measure_memory``
(a real run) and the ``StepMemory`` they both return.

``_step`` holds ``StepMemory`` (plain data: peak, where it sits, the breakdown at the peak,
the timeline; ``to_dict``/``__str__``), ``_tracker`` the dispatch-mode tracker that follows
every storage's bytes and category on fake tensors, ``_estimate`` drives one steady-state
step through it, ``_measure`` reads a real step from the profiler (CPU) or the allocator
(CUDA), ``_fsdp`` shards the estimate the way FSDP2's ``fully_shard`` does.

May import: the eager engine, ``ckpt_compile.policies``, the module wrappers
(``ckpt_compile.modules``), ``ckpt_compile.diagnostics`` and ``ckpt_compile.passes``. The
planner and the CLI import this part; never the compile backend or the planner.
"""
from ckpt_compile.memory._estimate import estimate_memory
from ckpt_compile.memory._measure import measure_memory
from ckpt_compile.memory._step import CATEGORIES, PHASES, StepMemory

__all__ = ["estimate_memory", "measure_memory", "StepMemory", "CATEGORIES", "PHASES"]
