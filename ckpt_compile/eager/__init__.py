"""The eager engine: ``checkpoint``, ``checkpoint_sequential`` and selective checkpointing.

Owns what ``torch.utils.checkpoint`` does in eager mode: the non-reentrant engine
(``_non_reentrant``: saved-tensor slots, recompute on first unpack, early stop), the
reentrant one (``_reentrant``), selective policies and their caches (``_selective``), RNG
and device-state replay (``_device_state``), the debug traces (``_debug``), shared switches
and errors (``_common``), the rest of ``torch.utils.checkpoint``'s namespace and what
differs between torch versions (``_torch_api``), and how ``checkpoint`` presents itself
while Dynamo traces (``_capture``: it hands the region to ``torch.utils.checkpoint`` so
Dynamo lowers it to ``tag_activation_checkpoint``; it lives here because ``checkpoint``
calls it).

May import: torch only. Never the compile backend, the diagnostics, the module wrappers
or ``passes`` (``tests/test_layout.py`` holds this).
"""
