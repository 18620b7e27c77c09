"""Faster paths through mindone, installed on every device (`--variant stock` in the benchmark
turns them off). Each gives the same results as the code it replaces; the parity tests run
with them installed and tests/test_fast_paths.py compares them with mindone's own code.

- Attention masks. For eager attention mindone evaluates the mask function once per key
  position in a Python loop (`masking_utils._vmap_patch`), several operations each, on
  every forward: decode cost grows with the context through host work alone. Mask
  functions are elementwise in their four index arguments, so one call with broadcast
  index tensors gives the whole mask in a constant number of operations.
"""

from __future__ import annotations

from .patching import PatchSet

FAST_PATHS = PatchSet("fast paths")


def install_fast_paths() -> list[str]:
    """Install every faster path; returns the names of what was replaced."""
    return FAST_PATHS.install()


@FAST_PATHS.replaces("mindone.transformers.masking_utils:_vmap_patch")
def broadcast_mask(mask_function, batch_arange, head_arange, cache_position, kv_arange, bh_indices: bool = True):
    """The mask `mask_function(b, h, q, kv)` for every index at once, by broadcasting."""
    q_len, kv_len = cache_position.shape[0], kv_arange.shape[0]
    if bh_indices:
        batch, heads = batch_arange.shape[0], head_arange.shape[0]
        mask = mask_function(
            batch_arange.reshape(-1, 1, 1, 1),
            head_arange.reshape(1, -1, 1, 1),
            cache_position.reshape(1, 1, -1, 1),
            kv_arange.reshape(1, 1, 1, -1),
        )
        return mask.broadcast_to((batch, heads, q_len, kv_len))
    mask = mask_function(batch_arange, head_arange, cache_position.reshape(-1, 1), kv_arange.reshape(1, -1))
    return mask.broadcast_to((q_len, kv_len))
