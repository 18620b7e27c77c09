"""Loading the processor and the model (omni_helpers.parallel spreads it over msrun's workers)."""

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
