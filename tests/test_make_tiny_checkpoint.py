"""The tiny checkpoint: deterministic, small, complete, with token ids that agree with its tokenizer."""

from __future__ import annotations

import json

from scripts.make_tiny_checkpoint import SPEAKERS, build_checkpoint


def test_same_seed_same_bytes_and_small(tiny_checkpoint, tmp_path):
    build_checkpoint(tmp_path, seed=0)
    for path in sorted(tiny_checkpoint.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    assert sum(p.stat().st_size for p in tiny_checkpoint.iterdir()) < 100 * 2**20


def test_config_ids_are_the_tokenizers(tiny_checkpoint):
    from transformers import AutoTokenizer

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tok.convert_tokens_to_ids
    assert config["im_start_token_id"] == ids("<|im_start|>") and config["im_end_token_id"] == ids("<|im_end|>")
    assert [config[f"{r}_token_id"] for r in ("system", "user", "assistant")] == [
        ids(r) for r in ("system", "user", "assistant")
    ]
    assert [tok.encode(r) for r in ("system", "user", "assistant")] == [
        [ids("system")],
        [ids("user")],
        [ids("assistant")],
    ]
    thinker = config["thinker_config"]
    for key, token in [
        ("audio_token_id", "<|audio_pad|>"),
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("audio_start_token_id", "<|audio_start|>"),
    ]:
        assert thinker[key] == ids(token) == config["talker_config"][key]
    assert thinker["text_config"]["vocab_size"] == len(tok)
    talker = config["talker_config"]
    assert set(talker["speaker_id"]) == set(SPEAKERS) >= {"ethan", "chelsie"}
    vocab = talker["text_config"]["vocab_size"]
    assert all(vocab - 1024 <= talker[k] < vocab for k in ("codec_pad_id", "codec_bos_id", "codec_eos_token_id"))


def test_processor_loads_with_every_part(tiny_checkpoint):
    from mindone.transformers import Qwen3OmniMoeProcessor

    processor = Qwen3OmniMoeProcessor.from_pretrained(tiny_checkpoint)
    assert processor.feature_extractor.feature_size == 128 and processor.feature_extractor.sampling_rate == 16000
    assert processor.image_processor.patch_size == 16 and processor.image_processor.merge_size == 2
    assert processor.video_processor.temporal_patch_size == 2
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>hi<|im_end|>\n<|im_start|>assistant\n"
