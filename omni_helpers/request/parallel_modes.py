"""How the model is spread over msrun's workers: `--parallel {zero3,expert,none}`.

- zero3: mindone's ZeRO-3 (`prepare_network`). Each Linear and Conv weight is split in N
  along its first dimension and all-gathered every time it is used, so every forward
  receives the weights it touches from the other ranks. For one decoded token that is
  every attention and router weight, the chosen experts and the LM head: 5.67 GiB sent
  plus received per rank at full size in bf16, on 2 ranks (scripts/plan_memory.py).
- expert: each rank keeps the shared parts (embeddings, attention, routers, encoders,
  code2wav) and 1/N of the experts of every MoE layer, thinker and talker. A MoE layer
  adds up the ranks' partial outputs with one all-reduce of its hidden states: 8 KiB per
  token and layer at full size (384 KiB per token). Every rank runs the same generation.
- none: the whole model in every process.

This module is the bookkeeping only (no MindSpore import, so flags can name the modes);
`loading.shard_model` applies a mode to a loaded model.
"""

from __future__ import annotations

from typing import Optional

PARALLEL_MODES = ("zero3", "expert", "none")


def resolve_parallel(requested: Optional[str], world_size: int) -> str:
    """The mode to run: ZeRO-3 by default under msrun with several workers; one process has nothing to split."""
    if world_size == 1:
        return "none"
    return requested or "zero3"


def expert_range(num_experts: int, rank: int, world_size: int) -> range:
    """The contiguous block of experts rank `rank` keeps (the first ranks take one more when N does not divide)."""
    share, extra = divmod(num_experts, world_size)
    start = rank * share + min(rank, extra)
    return range(start, start + share + (rank < extra))
