"""The eager API's docstring examples run and stay true."""
import doctest
import importlib

import pytest

MODULES = [
    "ckpt_compile",
    "ckpt_compile.eager._checkpoint",
    "ckpt_compile.eager._common",
    "ckpt_compile.eager._selective",
    "ckpt_compile.eager._device_state",
    "ckpt_compile.eager._reentrant",
    "ckpt_compile.eager._torch_api",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


def test_public_surface_matches_api_contract():
    import ckpt_compile as cc

    eager = {
        "checkpoint", "checkpoint_sequential", "CheckpointPolicy", "SelectiveCheckpointContext",
        "create_selective_checkpoint_contexts", "set_checkpoint_early_stop",
        "set_checkpoint_debug_enabled", "CheckpointError", "DefaultDeviceType", "noop_context_fn",
        "GraphExecGroup",
    }
    assert eager <= set(cc.__all__)
    for name in eager:
        assert getattr(cc, name) is not None
    import torch.utils.checkpoint as tuc

    assert cc.CheckpointPolicy is tuc.CheckpointPolicy  # user policies interoperate
    assert issubclass(cc.CheckpointError, RuntimeError)
