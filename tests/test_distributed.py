"""Checkpointing composes with DDP and FSDP2: 2 ranks, gloo, CPU (issue 7).

One spawned world (see ``dist_utils``) runs every scenario; each test then checks one
scenario's per-rank results against a single process running the *unwrapped* model on
the whole global batch: every parameter's gradient equal (DDP averages over ranks, FSDP2
shards are gathered with ``DTensor.full_tensor()``), names equal to the unwrapped model's,
and each block's forward counted per step: twice when checkpointed (so the recomputation
really ran), once when offloaded. PyTorch's own ``checkpoint_wrapper`` runs under FSDP2 too,
as a reference: same gradients, but its parameter names leak ``_checkpoint_wrapped_module.``.
The last scenario hangs on purpose, to check that a hang ends the world with the hung
rank's traceback instead of stalling. The NCCL variant runs the same scenarios on 2 GPUs and
skips cleanly without them.
"""
from __future__ import annotations

import functools
import os
import traceback
from datetime import timedelta

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this build", allow_module_level=True)

from dist_utils import (  # noqa: E402  (after the availability check)
    Block,
    Scenario,
    build_model,
    count_block_calls,
    full_grads,
    local_batch,
    loss_fn,
    reference_grads,
    run_world,
)

from ckpt_compile.composable import checkpoint  # noqa: E402
from ckpt_compile.wrappers import (  # noqa: E402
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    offload_wrapper,
)

# How each scenario applies activation checkpointing to the blocks (by name, so scenario
# arguments pickle into the spawned ranks).
_WRAPPER_FNS = {
    "checkpoint_wrapper": checkpoint_wrapper,
    "checkpoint_wrapper_reentrant": functools.partial(
        checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT
    ),
    "offload_wrapper": offload_wrapper,
}


def _apply_checkpointing(model: torch.nn.Module, how: str) -> None:
    if how == "torch_checkpoint_wrapper":  # the reference: PyTorch's own wrapper
        from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers

        torch_wrappers.apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    elif how == "composable":
        for block in model.blocks:
            checkpoint(block)
    elif how == "none":
        pass
    else:
        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=_WRAPPER_FNS[how], check_fn=lambda m: isinstance(m, Block)
        )


def _rank_device(rank: int, device: str) -> torch.device:
    if device == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device(device)


# --- scenarios (run inside the spawned ranks) ---------------------------------------------


def _ddp_step(rank, world_size, out_dir, how, device="cpu"):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = _rank_device(rank, device)
    model = build_model()
    calls = count_block_calls(model)  # on the blocks themselves, before any wrapping
    _apply_checkpointing(model, how)
    ddp = DDP(model.to(dev), device_ids=[dev.index] if device == "cuda" else None)
    x, y = local_batch(rank, world_size, device=str(dev))
    loss_fn(ddp(x), y).backward()
    return {
        "grads": full_grads(ddp.module),
        "calls": list(calls),
        "block_types": [type(b).__name__ for b in model.blocks],
    }


def _shard(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """The FSDP2 recipe: checkpointing already applied, shard each block, then the root."""
    from torch.distributed.fsdp import fully_shard

    model.to(dev)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _fsdp2_step(rank, world_size, out_dir, how, device="cpu"):
    dev = _rank_device(rank, device)
    model = build_model()
    calls = count_block_calls(model)
    _apply_checkpointing(model, how)
    _shard(model, dev)
    x, y = local_batch(rank, world_size, device=str(dev))
    loss_fn(model(x), y).backward()
    return {
        "grads": full_grads(model),  # full_tensor(): a collective, run on every rank
        "calls": list(calls),
        "grad_types": sorted({type(p.grad).__name__ for p in model.parameters()}),
    }


def _fsdp2_shard_then_wrap(rank, world_size, out_dir, how, device="cpu"):
    """The other order: ``fully_shard`` the blocks first, then apply checkpointing.

    An exception is returned as data rather than raised: both ranks fail at the same point,
    and the world goes on to the scenarios after this one.
    """
    dev = _rank_device(rank, device)
    model = build_model()
    calls = count_block_calls(model)
    _shard(model, dev)
    try:
        _apply_checkpointing(model, how)
        x, y = local_batch(rank, world_size, device=str(dev))
        loss_fn(model(x), y).backward()
    except Exception:
        return {"error": traceback.format_exc()}
    return {"error": None, "grads": full_grads(model), "calls": list(calls)}


def _fsdp2_state_dict(rank, world_size, out_dir, device="cpu"):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)  # gathered, on every rank
    dev = _rank_device(rank, device)
    model = build_model()
    _apply_checkpointing(model, "checkpoint_wrapper")
    _shard(model, dev)
    sharded = get_model_state_dict(model)
    # Optimizer state is keyed by parameter name too: one step so that it exists.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: parameters unchanged
    x, y = local_batch(rank, world_size, device=str(dev))
    loss_fn(model(x), y).backward()
    optimizer.step()
    optimizer_keys = list(get_optimizer_state_dict(model, optimizer)["state"])
    ckpt_dir = os.path.join(out_dir, f"dcp_{device}")
    dcp.save(sharded, checkpoint_id=ckpt_dir)
    saved_keys = list(dcp.FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata)

    # Load into fresh models (other initial values) with each way of checkpointing, and
    # into one with none: the checkpoint's names are the unwrapped model's.
    loaded = {}
    for how in ("none", "checkpoint_wrapper", "composable"):
        other = build_model(seed=123)
        _apply_checkpointing(other, how)
        _shard(other, dev)
        state = get_model_state_dict(other)
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_model_state_dict(other, state)
        loaded[how] = {k: v.cpu() for k, v in get_model_state_dict(other, options=full).items()}
    return {
        "keys": list(sharded),
        "optimizer_keys": optimizer_keys,
        "key_types": sorted({type(v).__name__ for v in sharded.values()}),
        "saved_keys": saved_keys,
        "full": {k: v.cpu() for k, v in get_model_state_dict(model, options=full).items()},
        "loaded": loaded,
    }


def _hang_on_rank_0(rank, world_size, out_dir, device="cpu"):
    """Rank 0 waits in a barrier that rank 1 never joins: a hang.

    The group's collective timeout (3 s) bounds it; rank 0 then raises, and the world must
    end with its traceback while rank 1 waits at the next barrier.
    """
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))
    if rank == 0:
        dist.barrier(group=group)
    return {}


# --- the world and the tests --------------------------------------------------------------

DDP_WRAPPINGS = ("checkpoint_wrapper", "checkpoint_wrapper_reentrant", "offload_wrapper", "composable")
FSDP2_WRAPPINGS = (
    "checkpoint_wrapper",
    "checkpoint_wrapper_reentrant",
    "composable",
    "offload_wrapper",
    "torch_checkpoint_wrapper",
)

SHARD_THEN_WRAPPINGS = ("checkpoint_wrapper", "composable", "offload_wrapper")


def _scenarios(device: str) -> list[Scenario]:
    return [
        *(Scenario(f"ddp-{how}", _ddp_step, {"how": how, "device": device}) for how in DDP_WRAPPINGS),
        *(Scenario(f"fsdp2-{how}", _fsdp2_step, {"how": how, "device": device}) for how in FSDP2_WRAPPINGS),
        *(
            Scenario(f"fsdp2-shard-then-{how}", _fsdp2_shard_then_wrap, {"how": how, "device": device})
            for how in SHARD_THEN_WRAPPINGS
        ),
        Scenario("fsdp2-state-dict", _fsdp2_state_dict, {"device": device}),
        Scenario("deliberate-hang", _hang_on_rank_0, {"device": device}),  # keep it last
    ]


def _have_two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()


@pytest.fixture(scope="module", params=["gloo-cpu", "nccl-cuda"])
def world(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    if request.param == "nccl-cuda":
        if not _have_two_gpus():
            pytest.skip("the NCCL variant needs 2 CUDA GPUs and NCCL")
        return run_world(_scenarios("cuda"), out_dir, backend="nccl", timeout_s=240)
    return run_world(_scenarios("cpu"), out_dir, backend="gloo", timeout_s=240)


@pytest.fixture(scope="module")
def reference():
    return reference_grads()


def _assert_grads_match(results, reference):
    for rank, result in enumerate(results):
        grads = result["grads"]
        # Same names in the same order as the unwrapped model: no wrapper prefix anywhere.
        assert list(grads) == list(reference), f"rank {rank}"
        for name, expected in reference.items():
            torch.testing.assert_close(grads[name], expected, msg=lambda m: f"rank {rank}, {name}: {m}")


@pytest.mark.parametrize("how", DDP_WRAPPINGS)
def test_ddp_apply_activation_checkpointing_matches_single_process(world, reference, how):
    results = world.results(f"ddp-{how}")
    _assert_grads_match(results, reference)
    wrapper_type = {"offload_wrapper": "OffloadWrapperBlock", "composable": "Block"}.get(how, "CheckpointWrapperBlock")
    for result in results:
        assert result["block_types"] == [wrapper_type, wrapper_type]
        # checkpointed: forward + recomputation; offloaded: saved, not recomputed
        assert result["calls"] == ([1, 1] if how == "offload_wrapper" else [2, 2])


@pytest.mark.parametrize("how", FSDP2_WRAPPINGS)
def test_fsdp2_fully_shard_per_block_matches_single_process(world, reference, how):
    results = world.results(f"fsdp2-{how}")
    if how == "torch_checkpoint_wrapper":
        # PyTorch's wrapper gives the same gradients under other names: the wrapped blocks'
        # parameters are listed as blocks.<i>._checkpoint_wrapped_module.<name>.
        results = [_strip_torch_prefix(result) for result in results]
    _assert_grads_match(results, reference)
    for result in results:
        assert result["grad_types"] == ["DTensor"]  # really sharded
        assert result["calls"] == ([1, 1] if how == "offload_wrapper" else [2, 2])


def _strip_torch_prefix(result):
    leak = "._checkpoint_wrapped_module."
    names = list(result["grads"])
    assert sum(leak in name for name in names) == 12, names  # 6 per block: it does leak
    grads = {name.replace(leak, "."): grad for name, grad in result["grads"].items()}
    return {**result, "grads": grads}


@pytest.mark.parametrize(
    "how",
    [
        "checkpoint_wrapper",
        "composable",
        "offload_wrapper",
    ],
)
def test_fsdp2_checkpointing_applied_after_fully_shard(world, reference, how):
    results = world.results(f"fsdp2-shard-then-{how}")
    for rank, result in enumerate(results):
        assert result["error"] is None, f"rank {rank}:\n{result['error']}"
    _assert_grads_match(results, reference)
    for result in results:
        assert result["calls"] == ([1, 1] if how == "offload_wrapper" else [2, 2])


def test_fsdp2_state_dict_and_dcp_round_trip_keep_unwrapped_names(world):
    unwrapped = build_model().state_dict()
    for result in world.results("fsdp2-state-dict"):
        assert result["keys"] == list(unwrapped)
        assert result["optimizer_keys"] == list(unwrapped)  # all state here is parameters
        assert result["key_types"] == ["DTensor"]
        assert sorted(result["saved_keys"]) == sorted(unwrapped)
        for name, value in unwrapped.items():
            assert torch.equal(result["full"][name], value), name
        for how, state in result["loaded"].items():
            assert list(state) == list(unwrapped), how
            for name, value in unwrapped.items():
                # bit-exact round trip, from other initial values (seed 123)
                assert torch.equal(state[name], value), f"loaded into {how}: {name}"


def test_a_hang_fails_with_the_hung_ranks_traceback(world):
    # The scenarios before it left their results (the tests above); this one left none, and
    # the error names the rank, the scenario and the collective that timed out (not the
    # world's own, much longer, timeout).
    with pytest.raises(AssertionError, match="deliberate-hang") as info:
        world.results("deliberate-hang")
    message = str(info.value)
    assert "rank 0, scenario 'deliberate-hang' failed" in message
    assert "dist.barrier(group=group)" in message
    assert "Timed out waiting 3000ms" in message  # gloo's own words
