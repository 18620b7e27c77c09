"""The --parallel modes' bookkeeping: which mode runs, and which experts each rank keeps."""

from __future__ import annotations

import pytest

from omni_helpers.request.parallel_modes import expert_range, resolve_parallel


@pytest.mark.parametrize("num_experts,world_size", [(4, 2), (4, 3), (128, 2), (128, 3), (6, 4), (3, 3)])
def test_each_expert_on_exactly_one_rank_in_contiguous_near_equal_shares(num_experts, world_size):
    shares = [expert_range(num_experts, rank, world_size) for rank in range(world_size)]
    assert [e for share in shares for e in share] == list(range(num_experts))
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # rank 0 holds the most


def test_default_mode_is_zero3_under_msrun_and_none_in_one_process():
    assert resolve_parallel(None, world_size=2) == "zero3"
    assert resolve_parallel("expert", world_size=2) == "expert"
    assert resolve_parallel("none", world_size=4) == "none"
    assert resolve_parallel("expert", world_size=1) == "none"  # nothing to split
    assert resolve_parallel(None, world_size=1) == "none"
