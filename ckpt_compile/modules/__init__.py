"""Checkpointing applied to ``nn.Module`` objects, with clean parameter names.

Owns the wrappers (``wrappers``: ``checkpoint_wrapper``, ``offload_wrapper``,
``apply_activation_checkpointing``; public as ``ckpt_compile.wrappers``), the composable
API (``composable``: ``checkpoint(module)`` through forward hooks; public as
``ckpt_compile.composable``), FSDP-style auto-wrap policies (``_auto_wrap``), the
saved-tensor offload used by ``offload_wrapper`` (``_offload``) and the wrapper classes
made per wrapped class, so wrapped layers stay findable by class (``_stand_in``).

May import: the eager engine (``ckpt_compile.eager``) and ``ckpt_compile.policies``.
Never the compile backend or the diagnostics.
"""
