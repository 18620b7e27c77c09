"""Faster paths through mindone, installed on every device (`--variant stock` in the benchmark
turns them off). Each gives the same results as the code it replaces; the parity tests run
with them installed and tests/mindone_changes/faster/test_fast_paths.py compares them with mindone's own code.

- Attention masks. For eager attention mindone evaluates the mask function once per key
  position in a Python loop (`masking_utils._vmap_patch`), several operations each, on
  every forward: decode cost grows with the context through host work alone. Mask
  functions are elementwise in their four index arguments, so one call with broadcast
  index tensors gives the whole mask in a constant number of operations. With flash
  attention, a decode step's mask (one causal query, the newest token) is its padding mask.
- MoE dispatch. mindone's sparse MoE blocks (thinker and talker) loop over experts with
  two host synchronisations each. Here decode steps run the chosen experts from device
  indices (no host read at all; the experts are stacked at load, `sparse_moe.stack_experts`)
  and prompts run each chosen expert once, grouped on the device in Ascend's MoE kernels
  (`sparse_moe.dispatch_grouped`, no host read either).
- Decode steps without host reads (`decode_steps`). mindone decides whether a step is the
  prompt or a decode step by reading `cache_position[0]` to the host, in the thinker's and
  the talker's input preparation and in the talker's forward; the shapes say the same, and a
  decode step's rope positions are computed on the device, as mindone computes them after
  its read. The talker's code predictor (15 codes per frame in the released model) runs as a
  fixed greedy loop instead of a whole `generate` call per frame, as mindone's is greedy.
- Compiled decode steps (`decode_graph`): with `--parallel none`, the thinker's decode step
  and the talker's frame step (its code predictor included) run as one `mindspore.jit` graph
  each, on KV caches written in place, instead of hundreds of PyNative launches.
- Compiled prompts and encoders (`prompt_graph`, `encoder_graph`): the thinker's text layers
  for a prompt (where running every expert costs at most 4x the routed work: small expert
  counts), the vision encoder's blocks and mergers, and the audio encoder each run as one
  graph per power-of-two bucket of positions, up to 2,048.
- Positions on the host (`host_positions`): the 3-D rope index and the vision encoder's patch
  positions computed in numpy, instead of Python walks with device operations and reads.
- The generation loop (`decode_loop`): one host read per step, the stopping test; mindone's
  loop also reads the attention mask's length every step. The end-token test is a comparison
  and an `any` instead of `mindspore.numpy.isin`'s twenty-odd operations, and the talker's
  suppressed codes are masked by a mask built once per request instead of at every frame.
  mindone's checks of the special tokens at the start of every `generate` run on the
  generation config's numbers instead of reading the new tensors back (four reads).
- The thinker's prompt bookkeeping on the host (`thinker_prompt`): placeholders found and
  counted in numpy, every modality's features merged by one gather; the processor's ids, masks
  and grids are read from the host copies their tensors keep (`host_positions.with_host_copy`).
- On CPU only: each operation runs in the calling thread (`pynative_synchronize`).
  PyNative normally hands every launch to a pipeline of threads and returns at once; on a
  CPU, with operations as small as the ones mindone's generation loop issues, the
  hand-offs cost more than the work (on 2 cores the tiny checkpoint decodes 14.4 tokens/s
  synchronously against 2.7). On Ascend the pipeline is what keeps the NPU busy while
  Python prepares the next launch, so it stays.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import mint

from omni_helpers.mindone_changes.faster import (
    decode_loop,
    decode_steps,
    encoder_graph,
    host_positions,
    prompt_graph,
    thinker_prompt,
)
from omni_helpers.mindone_changes.library_names import AUDIO_FORWARD, FLASH_MASKS, GENERATION, MODELING, ROPE_INDEX
from omni_helpers.parallel.sparse_moe import sparse_moe_forward
from omni_helpers.patching import PatchSet

FAST_PATHS = PatchSet("fast paths", package="mindone", written_for="0.5.0")
THINKER = f"{MODELING}.Qwen3OmniMoeThinkerForConditionalGeneration"
TALKER = f"{MODELING}.Qwen3OmniMoeTalkerForConditionalGeneration"


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


@FAST_PATHS.replaces_entry(FLASH_MASKS, "flash_attention_2")
def flash_attention_mask(
    batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """A decode step's flash-attention mask from its padding mask: one causal query, the newest
    token, sees every key its padding mask keeps. Three operations instead of the mask function
    evaluated over every key (by `mindone_fixes.flash_attention_mask`, which this falls back to)."""
    if not decode_step_mask_applies(cache_position, kv_length, kv_offset, mask_function, attention_mask):
        full = FAST_PATHS.original_entry(FLASH_MASKS, "flash_attention_2")
        return full(batch_size, cache_position, kv_length, kv_offset, mask_function, attention_mask, **kwargs)
    mask = attention_mask.astype(ms.bool_)[:, None, None, :]
    return mask | ~mask.any(axis=-1, keep_dims=True)  # as the full mask opens a row that sees nothing


def decode_step_mask_applies(cache_position, kv_length: int, kv_offset: int, mask_function, attention_mask) -> bool:
    """A generation step's single causal query over keys that a 2-D padding mask covers exactly."""
    from mindone.transformers import masking_utils

    return (
        cache_position.shape[0] == 1
        and mask_function in (None, masking_utils.causal_mask_function)
        and attention_mask is not None
        and attention_mask.ndim == 2
        and attention_mask.shape[-1] == kv_length
        and kv_offset == 0
    )


# ----------------------------------------------------------------------------- MoE dispatch


@FAST_PATHS.replaces(
    f"{MODELING}.Qwen3OmniMoeThinkerTextSparseMoeBlock:construct",
    f"{MODELING}.Qwen3OmniMoeTalkerTextSparseMoeBlock:construct",
)
def sparse_moe_construct(self, hidden_states):
    return sparse_moe_forward(self, hidden_states)


# ----------------------------------------------------------------------------- decode-step bookkeeping


@FAST_PATHS.replaces(f"{GENERATION}.GenerationMixin:_cache_dependant_input_preparation")
def cache_dependant_input_preparation(self, input_ids, inputs_embeds, cache_position):
    """The tokens a step still has to process: the last `len(cache_position)` ones (the cache
    positions of a step are always the last positions so far), without reading them."""
    if inputs_embeds is not None and input_ids.shape[1] == 0:
        inputs_embeds = inputs_embeds[:, -cache_position.shape[0] :]
    elif inputs_embeds is not None or input_ids.shape[1] != cache_position.shape[0]:
        input_ids = input_ids[:, -cache_position.shape[0] :]
    return inputs_embeds, input_ids


@FAST_PATHS.replaces(f"{THINKER}:prepare_inputs_for_generation")
def thinker_prepare_inputs_for_generation(
    self,
    input_ids,
    past_key_values=None,
    attention_mask=None,
    inputs_embeds=None,
    cache_position=None,
    position_ids=None,
    use_cache=True,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    input_features=None,
    feature_attention_mask=None,
    use_audio_in_video=False,
    video_second_per_grid=None,
    **kwargs,
):
    """(mindone's parameters, spelled out: `generate` checks its keywords against them)"""
    return decode_steps.thinker_prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=past_key_values,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        cache_position=cache_position,
        position_ids=position_ids,
        use_cache=use_cache,
        pixel_values=pixel_values,
        pixel_values_videos=pixel_values_videos,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        input_features=input_features,
        feature_attention_mask=feature_attention_mask,
        use_audio_in_video=use_audio_in_video,
        video_second_per_grid=video_second_per_grid,
        **kwargs,
    )


@FAST_PATHS.replaces(f"{THINKER}:construct")
def thinker_construct(
    self,
    input_ids=None,
    input_features=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    feature_attention_mask=None,
    audio_feature_lengths=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    rope_deltas=None,
    labels=None,
    use_cache=None,
    output_router_logits=None,
    use_audio_in_video=None,
    cache_position=None,
    video_second_per_grid=None,
    decode_graph=None,
    **kwargs,
):
    """mindone's thinker forward, with its parameters spelled out (`generate` checks its keywords against
    them); a decode step the generation loop hands a compiled graph (`decode_graph`) runs as that graph."""
    arguments = {name: value for name, value in locals().items() if name not in ("self", "kwargs", "decode_graph")}
    if decode_graph is not None:
        return decode_graph.forward({**arguments, **kwargs})
    if kwargs.get("return_dict", True) is not False and thinker_prompt.applies(self, arguments):
        kwargs.pop("return_dict", None)  # what mindone's `can_return_tuple` takes before its forward runs
        return thinker_prompt.forward(self, **thinker_prompt.used(arguments), **kwargs)
    return FAST_PATHS.original(f"{THINKER}:construct")(self, **arguments, **kwargs)


@FAST_PATHS.replaces(ROPE_INDEX)
def get_rope_index(
    self,
    input_ids=None,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    use_audio_in_video=False,
    audio_seqlens=None,
    second_per_grids=None,
):
    """mindone's 3-D rope positions (thinker and talker), computed on the host in numpy (`host_positions`)."""
    if input_ids is None or attention_mask is None:  # the cases mindone's walk does not handle either
        return FAST_PATHS.original(ROPE_INDEX)(
            self,
            input_ids,
            image_grid_thw,
            video_grid_thw,
            attention_mask,
            use_audio_in_video,
            audio_seqlens,
            second_per_grids,
        )
    ids, images, videos, mask, audio_lengths, seconds = map(
        host_positions.on_host,
        (input_ids, image_grid_thw, video_grid_thw, attention_mask, audio_seqlens, second_per_grids),
    )
    positions, deltas = host_positions.rope_index(
        self.config, self.spatial_merge_size, ids, images, videos, mask, use_audio_in_video, audio_lengths, seconds
    )
    return ms.Tensor(positions), ms.Tensor(deltas)


@FAST_PATHS.replaces(AUDIO_FORWARD)
def audio_construct(self, input_features, feature_lens=None, aftercnn_lens=None):
    """The audio encoder (as `mindone_fixes` corrects it) as one compiled graph where it applies (`encoder_graph`)."""
    if feature_lens is not None and encoder_graph.audio_applies(self):
        outputs = encoder_graph.audio_forward(self, input_features, feature_lens)
        if outputs is not None:
            return outputs
    return FAST_PATHS.original(AUDIO_FORWARD)(self, input_features, feature_lens, aftercnn_lens)


VISION = f"{MODELING}.Qwen3OmniMoeVisionEncoder"


@FAST_PATHS.replaces(f"{VISION}:construct")
def vision_construct(self, hidden_states, grid_thw, **kwargs):
    """mindone's vision encoder; its blocks and mergers run as one compiled graph where it applies (`encoder_graph`)."""
    if encoder_graph.vision_applies(self):
        outputs = encoder_graph.vision_forward(self, hidden_states, grid_thw)
        if outputs is not None:
            return outputs
    return FAST_PATHS.original(f"{VISION}:construct")(self, hidden_states, grid_thw, **kwargs)


@FAST_PATHS.replaces(f"{VISION}:fast_pos_embed_interpolate")
def vision_position_embeddings(self, grid_thw):
    """Each patch's learned position embedding, interpolated to its frame's grid: the four neighbours'
    table rows and weights from the host (`host_positions`), one lookup and three adds on the device."""
    indices, weights = host_positions.interpolated_patch_positions(
        grid_thw.asnumpy(), self.num_grid_per_side, self.config.spatial_merge_size
    )
    embeds = self.pos_embed(ms.Tensor(indices)) * ms.Tensor(weights).to(self.pos_embed.weight.dtype)[:, :, None]
    return embeds[0] + embeds[1] + embeds[2] + embeds[3]  # mindone's order


@FAST_PATHS.replaces(f"{VISION}:rot_pos_emb")
def vision_rotary_embeddings(self, grid_thw):
    """Each patch's rotary frequencies for its (row, column), the coordinates from the host (`host_positions`)."""
    grid = grid_thw.asnumpy()
    table = self.rotary_pos_emb(int(grid[:, 1:].max()))  # (largest side, dim / 2)
    coordinates = ms.Tensor(host_positions.patch_coordinates(grid, self.spatial_merge_size))
    return ms.ops.gather(table, coordinates.reshape(-1), 0).reshape(coordinates.shape[0], -1)


@FAST_PATHS.replaces(f"{MODELING}.Qwen3OmniMoeThinkerTextModel:construct")
def thinker_text_construct(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    use_cache=None,
    cache_position=None,
    visual_pos_masks=None,
    deepstack_visual_embeds=None,
    output_hidden_states=None,
    **kwargs,
):
    """mindone's thinker text model; a prompt it covers runs as one compiled graph (`prompt_graph`)."""
    if position_ids is not None and prompt_graph.applies(self, inputs_embeds, past_key_values, use_cache, kwargs):
        outputs = prompt_graph.forward(
            self,
            inputs_embeds,
            attention_mask,
            position_ids,
            past_key_values,
            visual_pos_masks,
            deepstack_visual_embeds,
            output_hidden_states,
        )
        if outputs is not None:
            return outputs
    return FAST_PATHS.original(f"{MODELING}.Qwen3OmniMoeThinkerTextModel:construct")(
        self,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        cache_position=cache_position,
        visual_pos_masks=visual_pos_masks,
        deepstack_visual_embeds=deepstack_visual_embeds,
        output_hidden_states=output_hidden_states,
        **kwargs,
    )


@FAST_PATHS.replaces(f"{TALKER}:prepare_inputs_for_generation")
def talker_prepare_inputs_for_generation(
    self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, cache_position=None, **kwargs
):
    """(mindone's parameters, spelled out: `generate` checks its keywords against them)"""
    return decode_steps.talker_prepare_inputs_for_generation(
        self, input_ids, past_key_values, attention_mask, inputs_embeds, cache_position, **kwargs
    )


@FAST_PATHS.replaces(f"{TALKER}:construct")
def talker_construct(
    self,
    input_ids=None,
    attention_mask=None,
    use_audio_in_video=None,
    audio_feature_lengths=None,
    video_second_per_grid=None,
    image_grid_thw=None,
    video_grid_thw=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    output_router_logits=None,
    cache_position=None,
    residual_codes=None,
    trailing_text_hidden=None,
    tts_pad_embed=None,
    generation_step=None,
    talker_input_ids=None,
    decode_graph=None,
    **kwargs,
):
    """mindone's talker forward, with its parameters spelled out (`generate` checks its keywords against
    them); a decode step runs without a host read, as a compiled graph when the loop hands one over."""
    arguments = {name: value for name, value in locals().items() if name not in ("self", "kwargs", "decode_graph")}
    if decode_graph is not None:
        return decode_graph.forward({**arguments, **kwargs})
    return decode_steps.talker_decode_forward(self, FAST_PATHS.original(f"{TALKER}:construct"), {**arguments, **kwargs})


# ----------------------------------------------------------------------------- the generation loop


@FAST_PATHS.replaces(f"{GENERATION}.GenerationMixin:_prepare_special_tokens")
def prepare_special_tokens(self, generation_config, kwargs_has_attention_mask=None, **ignore_kwargs):
    """mindone's (the same tensors and warnings), its checks made on the generation config's own numbers
    instead of reading the new tensors back: four host reads fewer per `generate` call (`decode_loop`)."""
    original = FAST_PATHS.original(f"{GENERATION}.GenerationMixin:_prepare_special_tokens")
    return decode_loop.prepare_special_tokens(self, generation_config, kwargs_has_attention_mask, original)


EOS_CRITERIA = "mindone.transformers.generation.stopping_criteria.EosTokenCriteria"


@FAST_PATHS.replaces(f"{EOS_CRITERIA}:__init__")
def eos_criteria_init(self, eos_token_id):
    """mindone's, taking the end tokens from the tensor's host copy where it has one (no host read)."""
    if isinstance(eos_token_id, ms.Tensor):
        eos_token_id = host_positions.on_host(eos_token_id)
    FAST_PATHS.original(f"{EOS_CRITERIA}:__init__")(self, eos_token_id)


@FAST_PATHS.replaces(f"{EOS_CRITERIA}:__call__")
def eos_reached(self, input_ids, scores, **kwargs):
    """Whether each row's last token is an end token: a comparison and an `any` (mindone's
    `mindspore.numpy.isin` launches about twenty operations per step)."""
    if not isinstance(input_ids, ms.Tensor):
        return FAST_PATHS.original(f"{EOS_CRITERIA}:__call__")(self, input_ids, scores, **kwargs)
    ends = ms.Tensor([self.eos_token_id], dtype=input_ids.dtype)
    return (input_ids[:, -1:] == ends).any(axis=-1)


SUPPRESS = "mindone.transformers.generation.logits_process.SuppressTokensLogitsProcessor"


@FAST_PATHS.replaces(f"{SUPPRESS}:__init__")
def suppress_tokens_init(self, suppress_tokens):
    """mindone's, keeping the token ids on the host too (the talker suppresses 1,023 of its codes)."""
    self.suppressed_ids = list(suppress_tokens)
    FAST_PATHS.original(f"{SUPPRESS}:__init__")(self, self.suppressed_ids)


@FAST_PATHS.replaces(f"{SUPPRESS}:__call__")
def suppress_tokens(self, input_ids, scores):
    """The suppressed tokens' scores set to -inf through a mask built once, on the host; mindone builds
    it at every step by comparing every id of the vocabulary with every suppressed id
    (`mindspore.numpy.isin`: 3 million comparisons per talker frame at the released sizes)."""
    vocab = scores.shape[-1]
    mask = self.__dict__.get("suppressed_mask")
    if mask is None or mask.shape[0] != vocab:
        ids = (
            self.suppressed_ids if hasattr(self, "suppressed_ids") else self.suppress_tokens.asnumpy()
        )  # made before install
        mask = self.suppressed_mask = ms.Tensor(np.isin(np.arange(vocab), np.asarray(ids, np.int64)))
    return mint.where(mask, -float("inf"), scores)


@FAST_PATHS.replaces(f"{GENERATION}.GenerationMixin:_sample")
def sample(
    self,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus=False,
    streamer=None,
    **model_kwargs,
):
    if not decode_loop.supports(self, generation_config, model_kwargs):
        original = FAST_PATHS.original(f"{GENERATION}.GenerationMixin:_sample")
        return original(
            self,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus,
            streamer,
            **model_kwargs,
        )
    return decode_loop.sample(
        self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, **model_kwargs
    )
