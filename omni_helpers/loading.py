"""Loading the processor and the model, and sharding the model across msrun workers."""

from __future__ import annotations

import argparse


def load_processor(model_name: str, min_pixels: int, max_pixels: int):
    from mindone.transformers import Qwen3OmniMoeProcessor

    return Qwen3OmniMoeProcessor.from_pretrained(model_name, min_pixels=min_pixels, max_pixels=max_pixels)


def load_model(args: argparse.Namespace, with_talker: bool):
    """Load the checkpoint in `args.dtype`; drop the talker (about 10 GB at full size) unless speech is wanted."""
    import mindspore as ms
    from mindone.transformers import Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        args.model_name,
        dtype=getattr(ms, args.dtype),
        attn_implementation=args.attn_implementation,
        use_safetensors=not args.allow_pickle_weights,
    )
    if not with_talker and model.has_talker:
        model.disable_talker()
    return model


def shard_zero3(model):
    """ZeRO-3 across the msrun workers: each rank keeps 1/N of every weight and gathers it when used."""
    from mindspore.communication import GlobalComm

    from mindone.trainers.zero import prepare_network

    return prepare_network(model, zero_stage=3, optimizer_parallel_group=GlobalComm.WORLD_COMM_GROUP)
