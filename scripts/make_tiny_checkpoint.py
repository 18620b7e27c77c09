"""Build a tiny random-weight Qwen3-Omni checkpoint and processor, offline.

The checkpoint has every stage of the released model (thinker with audio and vision
towers and a MoE text model, talker with its code predictor, code2wav) at toy sizes,
so that mindone's model and the transformers reference can run it on a CPU in seconds.
Random weights speak nonsense: this exists for tests and the demo, not for answers.

    python scripts/make_tiny_checkpoint.py --output tiny_ckpt [--seed 0]
    python scripts/make_tiny_checkpoint.py --output tiny_thinking --variant thinking
    python scripts/make_tiny_checkpoint.py --output tiny_captioner --variant captioner

Variants, like the released checkpoints: instruct has the talker and code2wav (speech);
thinking and captioner have neither (`enable_audio_output` false, no talker weights).
The released configs do not name their kind, their names do: keep "captioner" in the
folder name of a Captioner, which takes one audio and no prompt. Each variant draws its
own random weights. Same seed and variant, same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# A tokenizer small enough to build here: byte-level BPE with merges for a few words.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
]
# The role words must each be one token: the talker reads the token after <|im_start|>.
WORDS = [
    "system",
    "user",
    "assistant",
    "What",
    "what",
    "can",
    "you",
    "see",
    "and",
    "hear",
    "Answer",
    "in",
    "one",
    "short",
    "sentence",
    "the",
    "is",
    "this",
    "video",
    "audio",
    "image",
    "Describe",
    "sound",
    "helpful",
    "are",
    "a",
    "of",
    "to",
]
SPEAKERS = {"chelsie": 0, "ethan": 1, "aiden": 2}

# Official structure: <|im_start|>role\n ... <|im_end|>\n per message, media before text
# in a turn, and <|im_start|>assistant\n as the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] in ['audio', 'image', 'video'] -%}"
    "{%- if item['type'] == 'audio' -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CODEBOOK_SIZE = 64  # codec codes 0..63; the talker's last 1024 ids are its special tokens


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges = []

    def add_merge(left: str, right: str) -> None:
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))

    for word in WORDS:
        for end in range(2, len(word) + 1):
            add_merge(word[: end - 1], word[end - 1])
        add_merge("\u0120", word)  # the word after a space
    model = models.BPE(vocab=vocab, merges=merges)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "audio_token": "<|audio_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
            "audio_bos_token": "<|audio_start|>",
            "audio_eos_token": "<|audio_end|>",
        },
        model_max_length=32768,
        padding_side="left",
    )
    return fast


VARIANTS = ("instruct", "thinking", "captioner")
TOPOLOGIES = ("tiny", "released")


def released_topology(config: dict) -> dict:
    """The released Instruct checkpoint's depths, expert counts and head counts (48 thinker layers of
    128 experts, top 8, 32 query and 4 key/value heads; the talker's 20 layers of 128 experts, top 6;
    the encoders' and code2wav's depths), at narrow widths: what a decode step launches and reads back
    to the host, at full size, on a CPU with a few hundred MB."""
    thinker, talker = config["thinker_config"], config["talker_config"]
    narrow_rope = {**thinker["text_config"]["rope_scaling"], "mrope_section": [2, 1, 1]}  # head_dim 8: 4 rotary pairs
    thinker["text_config"].update(rope_scaling=narrow_rope)
    talker["text_config"].update(rope_scaling=narrow_rope)
    thinker["text_config"].update(
        num_hidden_layers=48,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=8,
        moe_intermediate_size=16,
    )
    thinker["audio_config"].update(encoder_layers=32, encoder_attention_heads=20, d_model=40, encoder_ffn_dim=80)
    thinker["vision_config"].update(depth=27, num_heads=16, hidden_size=64, deepstack_visual_indexes=[8, 16, 24])
    talker.update(accept_hidden_layer=24, num_code_groups=16)
    talker["text_config"].update(
        num_hidden_layers=20,
        num_experts=128,
        num_experts_per_tok=6,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=8,
        moe_intermediate_size=16,
    )
    talker["code_predictor_config"].update(
        num_hidden_layers=5, num_attention_heads=16, num_key_value_heads=8, head_dim=8, num_code_groups=16
    )
    config["code2wav_config"].update(
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, num_quantizers=16
    )
    return config


VARIANT_SEED_OFFSET = {"instruct": 0, "thinking": 100, "captioner": 200}  # each variant its own weights


def build_config(tokenizer, variant: str = "instruct") -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + ["system", "user", "assistant"]}
    vocab_size = len(tokenizer)
    media_ids = {
        "audio_token_id": ids["<|audio_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "audio_start_token_id": ids["<|audio_start|>"],
        "audio_end_token_id": ids["<|audio_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "position_id_per_seconds": 13,
        "seconds_per_chunk": 2,
    }
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "interleaved": True, "rope_theta": 1000000}
    thinker_hidden = 64
    talker_vocab = CODEBOOK_SIZE + 1024
    first_special = CODEBOOK_SIZE  # codec specials sit in the suppressed range [vocab-1024, vocab)
    return {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "model_type": "qwen3_omni_moe",
        "enable_audio_output": variant == "instruct",
        "im_start_token_id": ids["<|im_start|>"],
        "im_end_token_id": ids["<|im_end|>"],
        "system_token_id": ids["system"],
        "user_token_id": ids["user"],
        "assistant_token_id": ids["assistant"],
        "tts_pad_token_id": ids["<tts_pad>"],
        "tts_bos_token_id": ids["<tts_text_bos>"],
        "tts_eos_token_id": ids["<tts_text_eod>"],
        "thinker_config": {
            **media_ids,
            "vision_end_token_id": ids["<|vision_end|>"],
            "user_token_id": ids["user"],
            "initializer_range": 0.02,
            "audio_config": {
                "num_mel_bins": 128,
                "d_model": 32,
                "encoder_layers": 1,
                "encoder_attention_heads": 2,
                "encoder_ffn_dim": 64,
                "max_source_positions": 1500,
                "n_window": 50,  # the processor assumes 100 mel frames (1 s) per chunk
                "n_window_infer": 800,
                "conv_chunksize": 500,
                "downsample_hidden_size": 8,
                "output_dim": thinker_hidden,
                "activation_function": "gelu",
            },
            "vision_config": {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "patch_size": 16,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "out_hidden_size": thinker_hidden,
                "num_position_embeddings": 256,
                "deepstack_visual_indexes": [0, 1],
                "hidden_act": "gelu_pytorch_tanh",
                "in_channels": 3,
            },
            "text_config": {
                "vocab_size": vocab_size,
                "hidden_size": thinker_hidden,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "moe_intermediate_size": 32,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000,
                "rope_scaling": rope,
                "tie_word_embeddings": False,
            },
        },
        "talker_config": {
            **media_ids,
            "accept_hidden_layer": 1,
            "thinker_hidden_size": thinker_hidden,
            "num_code_groups": 4,
            "spatial_merge_size": 2,
            "codec_pad_id": first_special + 0,
            "codec_bos_id": first_special + 1,
            "codec_eos_token_id": first_special + 2,
            "codec_nothink_id": first_special + 7,
            "codec_think_bos_id": first_special + 8,
            "codec_think_eos_id": first_special + 9,
            "speaker_id": {name: first_special + 16 + i for name, i in SPEAKERS.items()},
            "initializer_range": 0.02,
            "text_config": {
                "vocab_size": talker_vocab,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "moe_intermediate_size": 32,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "shared_expert_intermediate_size": 32,
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000,
                "rope_scaling": rope,
            },
            "code_predictor_config": {
                "vocab_size": CODEBOOK_SIZE,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "num_code_groups": 4,
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000,
            },
        },
        "code2wav_config": {
            "codebook_size": CODEBOOK_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "num_quantizers": 4,
            "decoder_dim": 32,
            "sliding_window": 72,
            "upsample_rates": [8, 5, 4, 3],  # with upsampling_ratios: 1920 samples per frame
            "upsampling_ratios": [2, 2],
            "max_position_embeddings": 8000,
            "rope_theta": 10000,
            "rms_norm_eps": 1e-5,
            "layer_scale_initial_scale": 0.01,
        },
    }


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen3OmniMoeProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    vision = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std)
    image_processor = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=256 * 256, **vision)
    video_processor = Qwen2VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128}, **vision)
    feature_extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    return Qwen3OmniMoeProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def shape_weights(model, seed: int) -> None:
    """Scale two groups of random weights so that tests can tell right from wrong.

    - Output heads (thinker lm_head, talker codec head, code predictor heads): with the
      default 0.02 init every logit is near zero and the top two can differ by less than
      float32 noise; unit-variance heads spread the logits so greedy choices are clear.
    - code2wav: at 0.02 init its many layers shrink the signal to about 1e-7, which no
      one could tell from silence; scaling each weight by 1/sqrt(fan_in) keeps unit gain
      up to the last layer, which is turned down so the clamp to [-1, 1] never bites.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    heads = [model.thinker.lm_head]
    if model.has_talker:
        heads += [model.talker.codec_head, *model.talker.code_predictor.lm_head]
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        if not model.has_talker:
            return
        for name, weight in model.code2wav.named_parameters():
            if weight.ndim >= 2 and "code_embedding" not in name:
                fan_in = weight[0].numel()
                weight.copy_(torch.randn(weight.shape, generator=generator) / fan_in**0.5)
        # The last convolution sets the loudness: about 0.15 RMS, well inside the [-1, 1] clamp.
        model.code2wav.decoder[-1].conv.weight.mul_(0.01)


def save_processor(processor, output: Path) -> None:
    """Save the processor so that `from_pretrained` restores every part.

    The feature extractor and the image processor both write preprocessor_config.json;
    the released checkpoints keep both sets of keys in that one file.
    """
    processor.save_pretrained(output)
    merged = processor.feature_extractor.to_dict()
    merged.update(processor.image_processor.to_dict())
    merged["processor_class"] = "Qwen3OmniMoeProcessor"
    (output / "preprocessor_config.json").write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def build_checkpoint(output: Path, seed: int = 0, variant: str = "instruct", topology: str = "tiny") -> None:
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    output.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    settings = build_config(tokenizer, variant)
    config = Qwen3OmniMoeConfig(**(released_topology(settings) if topology == "released" else settings))
    seed += VARIANT_SEED_OFFSET[variant]
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    shape_weights(model, seed)
    model.save_pretrained(output, safe_serialization=True)
    save_processor(build_processor(tokenizer), output)
    for name in ("generation_config.json",):  # carries library versions, not needed
        (output / name).unlink(missing_ok=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="instruct",
        help="instruct speaks; thinking and captioner have no talker, like the released ones",
    )
    parser.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default="tiny",
        help="released: the released checkpoint's depths, expert and head counts at narrow widths",
    )
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output = Path(args.output)
    build_checkpoint(output, args.seed, args.variant, args.topology)
    print(f"tiny {args.variant} checkpoint written to {output}")
    return output


if __name__ == "__main__":
    sys.exit(main() and 0)
