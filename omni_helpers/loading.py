"""Loading the processor and the model, and spreading the model over msrun's workers.

mindone is imported inside the functions: by then `patches.install_patches` has quieted
the libraries it drags in (see quiet.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mindspore as ms

from omni_helpers.parallel.expert_parallel import keep_local_experts
from omni_helpers.parallel.sparse_moe import stack_experts
from omni_helpers.runtime import out_of_garbage_collection, progress


def load_processor(path: Path, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
    """The checkpoint's processor (with image limits, if given), padding on the left so that
    batched prompts end together."""
    from mindone.transformers import Qwen3OmniMoeProcessor

    progress(f"loading the processor from {path}")
    limits = {} if min_pixels is None else {"min_pixels": min_pixels, "max_pixels": max_pixels}
    processor = Qwen3OmniMoeProcessor.from_pretrained(path, **limits)
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(path: Path, dtype: str, attn_implementation: str, with_talker: bool, allow_pickle_weights: bool = False):
    """Load the checkpoint in `dtype`; drop the talker (about 10 GB at full size) unless speech is wanted."""
    from mindone.transformers import Qwen3OmniMoeForConditionalGeneration

    weights = sum(file.stat().st_size for file in Path(path).glob("*.safetensors")) / 2**30
    progress(f"loading the model's weights ({weights:.1f} GiB of safetensors) in {dtype}")
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        path,
        dtype=getattr(ms, dtype),
        attn_implementation=attn_implementation,
        use_safetensors=not allow_pickle_weights,
    )
    if not with_talker and model.has_talker:
        model.disable_talker()
    return model


def shard_model(model, runtime, stack: bool = True):
    """Apply `runtime.parallel` to a freshly loaded model, before its first forward; unless `stack` is
    False (stock mindone, the benchmark's baseline), stack the experts of every MoE block (under
    ZeRO-3, each rank's shards of them) so that decode steps route on the device."""
    progress(f"spreading the model over {runtime.world_size} rank(s): --parallel {runtime.parallel}")
    if runtime.parallel == "zero3":
        from mindone.trainers.zero import prepare_network
        from mindspore.communication import GlobalComm

        # each rank keeps 1/N of every weight and gathers it when used; the experts' shards are then stacked
        model = prepare_network(model, zero_stage=3, optimizer_parallel_group=GlobalComm.WORLD_COMM_GROUP)
        if stack:
            stack_experts(model, zero3_world_size=runtime.world_size)
    else:
        if runtime.parallel == "expert":
            keep_local_experts(model, runtime.rank, runtime.world_size)
        if stack:
            stack_experts(model)
    out_of_garbage_collection()
    progress("the model is loaded")
    return model
