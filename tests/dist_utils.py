"""Helpers for the distributed tests: spawn a gloo world, a tiny model, a reference step.

A *world* is ``world_size`` processes started with ``torch.multiprocessing`` (spawn), each
running a list of scenarios one after the other in one process group: spawning costs
~15 s of imports on this machine, so one world serves a whole group of tests. Each
scenario is a top-level function ``fn(rank, world_size, out_dir, **kwargs) -> dict``; its
result is saved per rank as soon as it returns, so a scenario that fails or hangs does
not hide the results of the ones before it. Everything is bounded: the process group has
a collective timeout, and the parent stops waiting (and kills the ranks) after
``timeout_s``, so a hang fails the test instead of stalling CI.

The reference is a single process running the *unwrapped* model on the whole global
batch: with a mean loss and equal shards, DDP's averaged gradients and FSDP2's
reduce-scattered (averaged) gradients equal the gradient of that loss.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL = 16
N_BLOCKS = 2
GLOBAL_BATCH = 8
DTYPE = torch.float64  # gloo reduces float64 too: gradients compare to ~1e-15
MODEL_SEED = 0
DATA_SEED = 1
# Collective timeout inside the world: a rank left waiting for its peer fails this fast.
# Generous, as the two ranks compile at their own pace on a shared, loaded machine.
COLLECTIVE_TIMEOUT_S = 120


class Block(nn.Module):
    """Pre-norm residual MLP block, the unit that gets checkpointed and sharded."""

    def __init__(self, d: int = D_MODEL) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int = D_MODEL, n_blocks: int = N_BLOCKS) -> None:
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def build_model(seed: int = MODEL_SEED, d_model: int = D_MODEL) -> Net:
    """The same initial parameters in every process (and in the reference)."""
    torch.manual_seed(seed)
    return Net(d_model).to(DTYPE)


def global_batch(device: str = "cpu", d_model: int = D_MODEL) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(GLOBAL_BATCH, d_model, generator=gen, dtype=DTYPE)
    y = torch.randn(GLOBAL_BATCH, 1, generator=gen, dtype=DTYPE)
    return x.to(device), y.to(device)


def local_batch(rank: int, world_size: int, device: str = "cpu",
                d_model: int = D_MODEL) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal share of the global batch (rows rank*n .. rank*n + n)."""
    x, y = global_batch(device, d_model)
    n = GLOBAL_BATCH // world_size
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)  # a mean: averaging over ranks gives the global mean


def reference_grads(d_model: int = D_MODEL) -> dict[str, torch.Tensor]:
    """Gradients of the unwrapped, unsharded model on the whole global batch."""
    model = build_model(d_model=d_model)
    x, y = global_batch(d_model=d_model)
    loss_fn(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def count_block_calls(model: nn.Module) -> list[int]:
    """Attach a forward pre-hook counter to every Block; the list fills in as they run.

    A checkpointed block runs twice per step (forward, then recomputation in backward),
    an ordinary one once: the count shows checkpointing really happened.
    """
    counts = [0] * N_BLOCKS
    blocks = [m for m in model.modules() if type(m) is Block]
    if len(blocks) != N_BLOCKS:
        raise AssertionError(f"expected {N_BLOCKS} Block modules, found {len(blocks)}")
    for i, block in enumerate(blocks):

        def hook(_module, _args, i=i):
            counts[i] += 1

        block.register_forward_pre_hook(hook)
    return counts


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a full plain tensor (DTensor shards gathered)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            raise AssertionError(f"parameter {name} has no gradient after backward")
        grad = p.grad
        if hasattr(grad, "full_tensor"):  # a DTensor under FSDP2: a collective, all ranks
            grad = grad.full_tensor()
        grads[name] = grad.detach().cpu().clone()
    return grads


# --- running a world ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    fn: Callable[..., dict[str, Any]]  # top-level function: it is pickled by name
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


class World:
    """What a finished (or failed, or timed-out) world left behind."""

    def __init__(self, out_dir: str, world_size: int, error: str | None, wall_s: float) -> None:
        self.out_dir = out_dir
        self.world_size = world_size
        self.error = error
        self.wall_s = wall_s

    def results(self, name: str) -> list[dict[str, Any]]:
        """Per-rank results of scenario ``name``; fails the test with the world's error."""
        return [saved["result"] for saved in self._load(name)]

    def seconds(self, name: str) -> list[float]:
        """Per-rank wall time of scenario ``name`` (for reports, never asserted)."""
        return [saved["seconds"] for saved in self._load(name)]

    def _load(self, name: str) -> list[dict[str, Any]]:
        paths = [os.path.join(self.out_dir, f"{name}.rank{r}.pt") for r in range(self.world_size)]
        if all(os.path.exists(p) for p in paths):
            return [torch.load(p, weights_only=False) for p in paths]
        raise AssertionError(
            f"scenario {name!r} left no result on every rank; the world ended with:\n{self.error}"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(scenarios: list[Scenario], out_dir: str | os.PathLike | None = None,
              world_size: int = 2, timeout_s: float = 150.0, backend: str = "gloo") -> World:
    """Spawn ``world_size`` ranks that run ``scenarios`` in order; wait at most ``timeout_s``.

    Results (and anything the scenarios write) go to ``out_dir`` (a new temporary folder
    when ``None``). The free port is found before the ranks start: should another process
    take it in between, the world is started once more on a new port.
    """
    out_dir = os.fspath(out_dir) if out_dir is not None else tempfile.mkdtemp(prefix="ckpt_compile_dist_")
    world = _run_once(scenarios, out_dir, world_size, timeout_s, backend)
    if world.error is not None and "EADDRINUSE" in world.error:
        world = _run_once(scenarios, out_dir, world_size, timeout_s, backend)
    return world


def _run_once(scenarios: list[Scenario], out_dir: str, world_size: int, timeout_s: float,
              backend: str) -> World:
    import torch.multiprocessing as mp

    start = time.monotonic()
    context = mp.start_processes(
        _rank_main,
        args=(world_size, free_port(), out_dir, scenarios, backend),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    error = None
    try:
        while not context.join(timeout=max(0.5, timeout_s - (time.monotonic() - start))):
            if time.monotonic() - start >= timeout_s:
                error = f"timed out after {timeout_s:.0f} s (ranks killed): a hang"
                break
    except Exception as e:  # ProcessRaisedException / ProcessExitedException: has the traceback
        error = f"{type(e).__name__}: {e}"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)
    return World(out_dir, world_size, error, time.monotonic() - start)


def _rank_main(rank: int, world_size: int, port: int, out_dir: str,
               scenarios: list[Scenario], backend: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two ranks share two cores with everything else
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for scenario in scenarios:
            start = time.perf_counter()
            try:
                result = scenario.fn(rank, world_size, out_dir, **scenario.kwargs)
            except Exception as e:
                raise RuntimeError(
                    f"rank {rank}, scenario {scenario.name!r} failed:\n{traceback.format_exc()}"
                ) from e
            seconds = time.perf_counter() - start
            torch.save({"result": result, "seconds": seconds},
                       os.path.join(out_dir, f"{scenario.name}.rank{rank}.pt"))
            dist.barrier()  # the next scenario starts together on every rank
    finally:
        dist.destroy_process_group()
