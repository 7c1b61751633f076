"""``python -m ckpt_compile memory module:factory``: the step peak of a model's training step.

Prints ``cc.estimate_memory``'s table (peak, where it sits, what holds it) and, with
``--out DIR``, writes ``memory.json`` and the picture ``memory.html`` there.
"""
from __future__ import annotations

import functools

__all__: list[str] = []

OPTIMIZERS = ("adamw", "sgd", "none")


def add_parser(sub) -> None:
    memory = sub.add_parser(
        "memory", help="estimate the peak memory of one training step (fake tensors, no compute)",
        description="Import FACTORY (module:function or path/to/file.py:function), call it with "
        "no arguments; it returns (model, example_inputs). Prints "
        "ckpt_compile.estimate_memory(model, *example_inputs, optimizer=...): the peak of live "
        "tensor bytes over one steady-state training step (forward, loss, backward, optimizer "
        "step), the phase and module where it sits, and what holds it. The model must return "
        "a scalar loss or an object with .loss.",
    )
    memory.add_argument("factory", metavar="module:factory")
    memory.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                        help="adamw (default: torch.optim.AdamW), sgd (SGD with momentum 0.9) or none")
    memory.add_argument("--world-size", type=int, default=1, metavar="N",
                        help="one rank's peak under FSDP2 fully_shard over N ranks (default 1)")
    memory.add_argument("--out", default=None, help="also write memory.json and memory.html (the picture) here")
    memory.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")


def _optimizer(name: str):
    import torch

    if name == "adamw":
        return torch.optim.AdamW
    if name == "sgd":
        return functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    return None


def run(args, call_factory, out_folder, usage_error) -> int:
    import json

    import ckpt_compile as cc

    if args.world_size < 1:
        raise usage_error(f"--world-size must be at least 1, got {args.world_size}")
    out_dir = out_folder(args.out)
    model, inputs = call_factory(args.factory)
    try:
        step = cc.estimate_memory(model, *inputs, optimizer=_optimizer(args.optimizer), world_size=args.world_size)
    except (TypeError, ValueError) as e:  # ours: one line that names the fix
        raise usage_error(str(e).strip().splitlines()[0]) from e
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise usage_error(f"memory({args.factory}) failed: {type(e).__name__}: {first}") from e
    print(json.dumps(step.to_dict(), sort_keys=True) if args.json else step)
    if out_dir is not None:
        (out_dir / "memory.json").write_text(json.dumps(step.to_dict(), indent=1, sort_keys=True))
        print(f"wrote {out_dir / 'memory.json'}")
        print(f"wrote {cc.write_picture(step, out_dir / 'memory.html')}")
    return 0
