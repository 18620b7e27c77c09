"""Faster paths through mindone, installed on every device (`--variant stock` in the benchmark
turns them off). Each gives the same results as the code it replaces; the parity tests run
with them installed and tests/test_fast_paths.py compares them with mindone's own code.

- Attention masks. For eager attention mindone evaluates the mask function once per key
  position in a Python loop (`masking_utils._vmap_patch`), several operations each, on
  every forward: decode cost grows with the context through host work alone. Mask
  functions are elementwise in their four index arguments, so one call with broadcast
  index tensors gives the whole mask in a constant number of operations.
- MoE dispatch. mindone's sparse MoE blocks (thinker and talker) loop over experts with
  two host synchronisations each; `sparse_moe.dispatch_experts` reads the routing once.
- On CPU only: each operation runs in the calling thread (`pynative_synchronize`).
  PyNative normally hands every launch to a pipeline of threads and returns at once; on a
  CPU, with operations as small as the ones mindone's generation loop issues, the
  hand-offs cost more than the work (on 2 cores the tiny checkpoint decodes 14.4 tokens/s
  synchronously against 2.7). On Ascend the pipeline is what keeps the NPU busy while
  Python prepares the next launch, so it stays.
"""

from __future__ import annotations

from .patching import PatchSet
from .sparse_moe import sparse_moe_forward

FAST_PATHS = PatchSet("fast paths", package="mindone", written_for="0.5.0")
MODELING = "mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe"


def install_fast_paths(device_target: str) -> list[str]:
    """Install every faster path for `device_target`; returns the names of what was replaced."""
    run_synchronously(device_target == "CPU")
    return FAST_PATHS.install()


def uninstall_fast_paths() -> None:
    """Back to stock mindone (the benchmark's baseline; tests that show the paths change nothing)."""
    run_synchronously(False)
    FAST_PATHS.uninstall()


def run_synchronously(enabled: bool) -> None:
    """Run each MindSpore operation to completion in the calling thread (or go back to the asynchronous pipeline)."""
    import mindspore as ms

    ms.set_context(pynative_synchronize=enabled)


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


# ----------------------------------------------------------------------------- MoE dispatch


@FAST_PATHS.replaces(
    f"{MODELING}.Qwen3OmniMoeThinkerTextSparseMoeBlock:construct",
    f"{MODELING}.Qwen3OmniMoeTalkerTextSparseMoeBlock:construct",
)
def sparse_moe_construct(self, hidden_states):
    return sparse_moe_forward(self, hidden_states)
