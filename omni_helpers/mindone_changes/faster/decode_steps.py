"""The thinker's and the talker's decode steps without host reads (faster paths; installed by `fast_paths`).

mindone decides whether a step is the prompt or a decode step by reading `cache_position[0]`
to the host, and computes a decode step's rope positions after that read. Here the shapes
decide, and the positions are computed on the device (`decode_rope_positions`).

Each talker step chooses a frame's first code, then its code predictor adds the other
groups' codes one by one (15 in the released model), and the sum of the codes' embeddings
feeds the next step. mindone runs the predictor through a whole `generate` call per frame,
and decides prompt or decode twice per step by reading `cache_position[0]` to the host:

- `talker_prepare_inputs_for_generation` takes the decision from the shapes (the talker's
  prompt is several positions, a decode step feeds one) and runs the predictor with
  `predict_residual_codes`: a fixed number of steps, each code greedy or, while the talker
  samples, drawn as released (`speech_sampling`), no stopping test, no per-step setup, no read;
- `talker_decode_forward` is the talker's forward for a decode step: rope positions from
  `cache_position` and the stored deltas on the device, as mindone computes them after
  its read. Prompts go through mindone's forward.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import mint

from omni_helpers.mindone_changes.speech_sampling import frame_uniforms, residual_code, samples


def decode_rope_positions(cache_position, rope_deltas, batch: int, length: int):
    """A decode step's (3, batch, length) rope positions: its cache positions shifted by each row's
    stored delta, as mindone computes them. mindone keeps the deltas as floats, so the positions
    are floats too; the integers are cast explicitly (an implicit promotion costs a slow Cast
    kernel on CPU, the explicit one goes through the CPU fallbacks)."""
    delta = cache_position[0].to(rope_deltas.dtype) + rope_deltas
    positions = mint.arange(length).view(1, -1).expand((batch, -1)).to(delta.dtype).add(delta)
    return positions.unsqueeze(0).expand((3, -1, -1))


def thinker_prepare_inputs_for_generation(self, input_ids, cache_position=None, attention_mask=None, **kwargs):
    """mindone's thinker input preparation; a decode step (fewer cache positions than tokens so far)
    drops the media, encoded with the prompt already, and gets its rope positions from the device."""
    from mindone.transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    decoding = cache_position.shape[0] < input_ids.shape[1]
    model_inputs = super(modeling.Qwen3OmniMoeThinkerForConditionalGeneration, self).prepare_inputs_for_generation(
        input_ids, cache_position=cache_position, attention_mask=attention_mask, **kwargs
    )
    model_inputs["position_ids"] = None  # the prompt's: mindone computes its 3-D rope index in the forward
    if not decoding:
        return model_inputs
    for media in ("pixel_values", "pixel_values_videos", "input_features"):
        model_inputs[media] = None
    if self.rope_deltas is not None and attention_mask is not None:
        step_ids = model_inputs["input_ids"]
        model_inputs["position_ids"] = decode_rope_positions(cache_position, self.rope_deltas, *step_ids.shape)
    return model_inputs


def is_decode_step(cache_position) -> bool:
    """The talker's prompt is several positions (role, speaker, codec prefix); a decode step feeds one."""
    return cache_position is not None and cache_position.shape[0] == 1


def predict_residual_codes(predictor, embeds):
    """The code predictor's codes for one frame (greedy, or sampled as released while the talker samples), and
    the embedding of each code.

    `embeds` is (batch, 2, hidden): the talker's last hidden state and the embedding of the
    frame's first code. Returns codes (batch, groups - 1) and a list of (batch, 1, hidden)."""
    from mindone.transformers.cache_utils import DynamicCache

    batch, steps = embeds.shape[0], predictor.config.num_code_groups - 1
    cache = DynamicCache()
    attention_mask = mint.ones((batch, embeds.shape[1] + steps - 1), dtype=ms.int64)  # what `generate` would pass
    code_embeddings = predictor.get_input_embeddings()
    uniforms = frame_uniforms(batch, steps) if samples(predictor) else None
    codes, code_embeds = [], []
    for step in range(steps):
        length = embeds.shape[1] + step
        if step == 0:
            inputs = {"inputs_embeds": embeds, "cache_position": mint.arange(length)}
        else:
            inputs = {
                "input_ids": codes[-1],
                "generation_steps": step,
                "cache_position": mint.arange(length - 1, length),
            }
        outputs = predictor(
            **inputs, attention_mask=attention_mask[:, :length], past_key_values=cache, use_cache=True, return_dict=True
        )
        code = residual_code(outputs.logits[:, -1, :], None if uniforms is None else uniforms[:, step])[:, None]
        codes.append(code)
        code_embeds.append(code_embeddings[step](code))
    return mint.cat(codes, dim=-1), code_embeds


def talker_prepare_inputs_for_generation(
    self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, cache_position=None, **kwargs
):
    """The talker's step inputs; a decode step's embedding is the sum of the last frame's code embeddings
    (plus the next text position's hidden state, or the padding embedding once the text has run out)."""
    from mindone.transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    hidden_states = kwargs.pop("hidden_states", None)
    inputs = super(modeling.Qwen3OmniMoeTalkerForConditionalGeneration, self).prepare_inputs_for_generation(
        input_ids, past_key_values, attention_mask, inputs_embeds, cache_position, **kwargs
    )
    if not is_decode_step(cache_position):
        return inputs
    first_code = input_ids[:, -1:]
    first_embed = self.get_input_embeddings()(first_code)
    last_hidden = hidden_states[0][-1][:, -1:]  # the talker's last layer at its last position
    residual_codes, residual_embeds = predict_residual_codes(
        self.code_predictor, mint.cat((last_hidden, first_embed), dim=1)
    )
    step_embeds = mint.cat([first_embed, *residual_embeds], dim=1).sum(1, keepdim=True)
    step, text_hidden = kwargs.get("generation_step"), kwargs.get("trailing_text_hidden")
    if step < text_hidden.shape[1]:
        step_embeds = step_embeds + text_hidden[:, step].unsqueeze(1)
    else:
        step_embeds = step_embeds + kwargs.get("tts_pad_embed")
    inputs["inputs_embeds"] = step_embeds
    inputs["residual_codes"] = mint.cat((first_code, residual_codes), dim=-1)
    return inputs


def talker_decode_forward(self, original, kwargs: dict):
    """The talker's forward for one decode step (mindone's forward computes the same after reading
    `cache_position[0]`); anything else, or a call this does not cover, goes to `original`."""
    from mindone.transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    covered = (
        is_decode_step(kwargs.get("cache_position"))
        and kwargs.get("inputs_embeds") is not None
        and kwargs.get("attention_mask") is not None
        and self.rope_deltas is not None
        and kwargs.get("labels") is None
        and not kwargs.get("output_router_logits")
        and kwargs.get("return_dict", True) is not False
    )
    if not covered:
        return original(self, **kwargs)
    kwargs = dict(kwargs)
    inputs_embeds, cache_position = kwargs.pop("inputs_embeds"), kwargs.pop("cache_position")
    residual_codes, step = kwargs.pop("residual_codes", None), kwargs.pop("generation_step", None)
    for unused in (
        "return_dict",
        "input_ids",
        "position_ids",
        "labels",
        "output_router_logits",
        "use_audio_in_video",
        "audio_feature_lengths",
        "video_second_per_grid",
        "image_grid_thw",
        "video_grid_thw",
        "trailing_text_hidden",
        "tts_pad_embed",
        "talker_input_ids",
    ):
        kwargs.pop(unused, None)
    positions = decode_rope_positions(cache_position, self.rope_deltas, *inputs_embeds.shape[:2])
    outputs = self.model(
        input_ids=None, position_ids=positions, inputs_embeds=inputs_embeds, cache_position=cache_position, **kwargs
    )
    return modeling.Qwen3OmniMoeTalkerOutputWithPast(
        logits=self.codec_head(outputs.last_hidden_state),
        past_key_values=outputs.past_key_values,
        hidden_states=(outputs.hidden_states, residual_codes),  # mindone carries the frame's codes here
        generation_step=step + 1,
    )
