"""Where a trainer runs when a round is launched on several processes (`training.launch`, `accelerate launch`).

The launcher (torchrun underneath) gives every process RANK and WORLD_SIZE; the TRL/transformers trainers read
them and train data-parallel (DDP: NCCL on GPUs, gloo on CPUs; FSDP or DeepSpeed when an accelerate config file
says so). Outside a launch these are 0 and 1, and nothing here changes anything.
"""
from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """The process that writes files: the others hold the same weights (DDP keeps them in step)."""
    return os.environ.get("RANK", "0") == "0"


def per_device_batch(batch: int) -> int:
    """A trainer's per-device batch for a global batch of `batch`: the same optimizer steps, on the same number of
    examples each, whatever the number of processes."""
    return max(1, batch // world_size())


def wait_for_everyone() -> None:
    """Barrier: e.g. the reward model the main process saved is complete before another process reads it."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
