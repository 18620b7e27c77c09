"""Fixes for bugs in mindone 0.5.0's Qwen3-Omni, applied on every device.

Each fix replaces one mindone function where mindone and the transformers reference
disagree because mindone is wrong; each has a test that fails without it
(tests/mindone_changes/test_mindone_fixes.py) and a line in the README's known issues.

- Audio longer than one encoder chunk (n_window * 2 mel frames: 1 s in the released
  config). `Qwen3OmniMoeAudioEncoder.construct` builds its chunk lengths with
  `ms.tensor([n] * chunk_num.sum())`, where `list * Tensor` multiplies elementwise
  instead of repeating the list (TensorScatterUpdate "indices out of range" on
  MindSpore 2.7.1, TypeError on 2.10); it then splits with `.item()` of a
  many-element tensor and keeps the padded frames of the last chunk. The replacement
  does the chunk bookkeeping on the host, as the reference does with Python lists.
- A video whose soundtrack is not used (`use_audio_in_video=False`, every silent or muted
  clip). `get_rope_index` times each video's seconds-per-grid with
  `second_per_grids[i].cpu()`, a PyTorch idiom: MindSpore tensors have no `.cpu()`, so
  the request fails after the model has loaded, on any device. The replacement hands
  mindone's own function a sequence whose items answer `.cpu()` with the same tensor.
- Flash attention (`attn_implementation="flash_attention_2"`, what Ascend runs) drops three
  masks that eager attention keeps, so that the two paths compute different things:
  - the text models' mask (thinker, talker, code predictor, code2wav): mindone's
    flash mask function returns the 2-D padding mask or None, which its flash wrapper
    then treats as a (query, key) matrix. A left-padded batch gets wrong (or refused)
    masks and code2wav's sliding window (72 frames) is lost: speech longer than 5.8 s
    differs. The fix gives flash attention the same boolean mask eager attention gets
    (causal, padding, sliding window), with rows that see nothing opened up (padding
    queries), so that no row's softmax is undefined.
  - the vision encoder's per-image and per-frame blocks (`cu_seqlens`): its flash branch
    attends across all images and frames of a request. The fix passes the block-diagonal
    mask.
  - the audio encoder's attention windows (`n_window_infer` mel frames, 8 s in the
    released config): the replacement encoder above passes them as a mask on every path,
    which is what transformers' flash path computes (its eager path, never calling
    `_prepare_attention_mask`, attends across the whole audio).
- Speech not as released. `generate` keeps the code predictor greedy while the talker
  samples (transformers samples it: top-k 50, top-p 0.8), and refuses a batch with speech.
  The replacement `generate` has the code predictor sample while the talker does
  (`speech_sampling`), and speaks every row of a batch (`batched_speech`); one row keeps
  mindone's own path (tests/mindone_changes/test_speech_sampling.py, test_batched_speech.py).
- The generation loop prints a progress line per decoding step on stdout, which the
  scripts keep for the answer; the lines go to stderr instead (under msrun both land in
  the worker's log).
"""

from __future__ import annotations

import sys

import mindspore as ms
import numpy as np
from mindspore import mint, ops

from omni_helpers.mindone_changes import batched_speech
from omni_helpers.mindone_changes.library_names import AUDIO_FORWARD, FLASH_MASKS, GENERATION, MODELING, ROPE_INDEX
from omni_helpers.mindone_changes.speech_sampling import code_predictor_sampling, frame_uniforms, residual_code, samples
from omni_helpers.patching import PatchSet

MINDONE_FIXES = PatchSet("mindone fixes", package="mindone", written_for="0.5.0")


def install_mindone_fixes() -> list[str]:
    """Install every fix for mindone's own bugs; returns the names of what was replaced."""
    return MINDONE_FIXES.install()


def conv_output_lengths(input_lengths: np.ndarray) -> np.ndarray:
    """Audio tokens produced from `input_lengths` mel frames (three stride-2 convolutions per 100-frame chunk)."""
    tail = input_lengths % 100
    tail_tokens = (((tail - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1
    return tail_tokens + (input_lengths // 100) * 13


def split_into_chunks(feature_lens: np.ndarray, chunk: int) -> list[int]:
    """Mel-frame lengths of the encoder chunks: whole chunks, then the remainder of each audio."""
    lengths = []
    for total in feature_lens.tolist():
        whole, rest = divmod(int(total), chunk)
        lengths += [chunk] * whole + ([rest] if rest else [])
    return lengths


def attention_windows(audio_tokens: np.ndarray, tokens_per_chunk: int, chunks_per_window: int) -> list[int]:
    """Token counts of the audio encoder's attention windows, audio after audio: whole windows
    of `tokens_per_chunk * chunks_per_window` tokens, then each audio's remainder (as the
    reference computes them: `tokens_per_chunk` is the longest chunk's count after the convolutions)."""
    window = tokens_per_chunk * chunks_per_window
    lengths = []
    for tokens in audio_tokens.tolist():
        lengths += [window] * (tokens // window) + ([tokens % window] if tokens % window else [])
    return lengths


def audio_chunks(input_features, chunk_lengths: list[int]):
    """(mel, frames) cut into chunks of `chunk_lengths` frames, each padded with zeros to the longest:
    (chunks, 1, mel, longest), by one gather from the host's frame indices (a zero column pads)."""
    mel, frames = input_features.shape
    longest = max(chunk_lengths)
    index = np.full((len(chunk_lengths), longest), frames, np.int64)  # column `frames` is the zero one
    for chunk, (start, length) in enumerate(zip(np.cumsum([0, *chunk_lengths[:-1]]).tolist(), chunk_lengths)):
        index[chunk, :length] = np.arange(start, start + length)
    with_zeros = mint.cat([input_features, mint.zeros((mel, 1), dtype=input_features.dtype)], 1)
    chunks = ops.gather(with_zeros, ms.Tensor(index.reshape(-1)), 1).reshape(mel, len(chunk_lengths), longest)
    return chunks.transpose(1, 0, 2).unsqueeze(1)


def real_token_rows(chunk_lengths: list[int], tokens_per_chunk: int) -> np.ndarray:
    """Rows of the chunks' flattened conv output that came from real frames (the last chunk may be short)."""
    tokens = conv_output_lengths(np.asarray(chunk_lengths, dtype=np.int64))
    return np.concatenate([i * tokens_per_chunk + np.arange(n) for i, n in enumerate(tokens.tolist())]).astype(np.int64)


def audio_windows(encoder, feature_lens: np.ndarray, tokens_per_chunk: int) -> np.ndarray:
    """The audio encoder's attention windows as cumulative token counts (int32, from 0): n_window_infer
    frames' worth of tokens, per audio."""
    boundaries = [0] + attention_windows(
        conv_output_lengths(feature_lens), tokens_per_chunk, encoder.n_window_infer // (encoder.n_window * 2)
    )
    return np.cumsum(boundaries).astype(np.int32)


def within_blocks(cu_seqlens: np.ndarray) -> np.ndarray:
    """(1, 1, T, T) boolean: True where query and key lie in the same block [cu[i], cu[i+1])."""
    block = np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens))
    return (block[:, None] == block[None, :])[None, None]


def window_mask(cu_seqlens: np.ndarray, attn_implementation: str, dtype):
    """The attention mask keeping each token within its window, as the attention path wants it:
    a boolean "may see" mask for flash attention, an additive one (0 or the most negative
    value) for eager; None for a single window."""
    if len(cu_seqlens) <= 2:
        return None
    keep = within_blocks(cu_seqlens)
    if attn_implementation == "flash_attention_2":
        return ms.Tensor(keep)
    minimum = float(np.finfo(np.float32).min) if dtype == ms.float32 else -65504.0
    return ms.Tensor(np.where(keep, 0.0, minimum).astype(np.float32)).astype(dtype)


@MINDONE_FIXES.replaces(AUDIO_FORWARD)
def audio_encoder_construct(self, input_features, feature_lens=None, aftercnn_lens=None):
    """The audio encoder's forward with the chunking done right for any audio length.

    input_features: (mel, frames) of all audios of the batch, concatenated;
    feature_lens: frames per audio.
    """
    from mindone.transformers.modeling_outputs import BaseModelOutput

    feature_lens_np = feature_lens.asnumpy().astype(np.int64)
    chunk_lengths = split_into_chunks(feature_lens_np, self.n_window * 2)
    padded = audio_chunks(input_features, chunk_lengths)
    embeds = []
    for group in padded.split(self.conv_chunksize, dim=0):
        x = mint.nn.functional.gelu(self.conv2d1(group))
        x = mint.nn.functional.gelu(self.conv2d2(x))
        x = mint.nn.functional.gelu(self.conv2d3(x))
        embeds.append(x)
    x = mint.cat(embeds, dim=0)
    b, c, f, t = x.shape
    x = self.conv_out(x.permute(0, 3, 1, 2).reshape(b, t, c * f))
    x = x + self.positional_embedding.positional_embedding[:t, :].unsqueeze(0).to(x.dtype)
    hidden_states = x.reshape(b * t, -1)[ms.Tensor(real_token_rows(chunk_lengths, t))]
    cu_seqlens_np = audio_windows(self, feature_lens_np, t)
    cu_seqlens = ms.Tensor(cu_seqlens_np)
    mask = window_mask(cu_seqlens_np, self.config._attn_implementation, hidden_states.dtype)

    for layer in self.layers:
        hidden_states = layer(hidden_states, cu_seqlens, attention_mask=mask)[0]
    hidden_states = self.ln_post(hidden_states)
    hidden_states = self.proj2(self.act(self.proj1(hidden_states)))
    return BaseModelOutput(last_hidden_state=hidden_states)


class _HostSeconds:
    """One video's seconds per temporal grid, as mindone's rope code reads it: `.cpu()` (a
    PyTorch idiom) gives the MindSpore tensor back, `.float()` converts as a tensor does."""

    def __init__(self, seconds):
        self.seconds = seconds

    def cpu(self):
        return self.seconds

    def float(self):
        return self.seconds.float()


@MINDONE_FIXES.replaces(ROPE_INDEX)
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
    """mindone's own 3-D rope index, given seconds per grid it can call `.cpu()` on.
    (The talker's get_rope_index calls this class's function by name, so it is fixed too.)"""
    if second_per_grids is not None:
        second_per_grids = [_HostSeconds(second_per_grids[i]) for i in range(second_per_grids.shape[0])]
    stock = MINDONE_FIXES.original(ROPE_INDEX)
    return stock(
        self,
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        use_audio_in_video,
        audio_seqlens,
        second_per_grids,
    )


@MINDONE_FIXES.adds(f"{GENERATION}:print")
def progress_to_stderr(*args, **kwargs):
    """The generation loop's `print` (one line per decoding step): to stderr, keeping stdout for answers."""
    kwargs.setdefault("file", sys.stderr)
    print(*args, **kwargs)


@MINDONE_FIXES.replaces_entry(FLASH_MASKS, "flash_attention_2")
def flash_attention_mask(
    batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """The boolean (batch, 1, query, key) mask eager attention would use, for flash attention."""
    from mindone.transformers import masking_utils

    kwargs.pop("allow_is_causal_skip", None)
    mask = masking_utils.sdpa_mask(
        batch_size,
        cache_position,
        kv_length,
        kv_offset,
        mask_function or masking_utils.causal_mask_function,
        attention_mask,
        allow_is_causal_skip=False,
        **kwargs,
    )
    sees_nothing = ~mask.any(axis=-1, keep_dims=True)  # a padding query: let it see all (its output is never read)
    return mask | sees_nothing


@MINDONE_FIXES.replaces(f"{MODELING}.Qwen3OmniMoeVisionAttention:construct")
def vision_attention_construct(
    self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs
):
    """mindone's vision attention; with flash attention, each image or frame block attends within itself."""
    if self.config._attn_implementation != "flash_attention_2":
        stock = MINDONE_FIXES.original(f"{MODELING}.Qwen3OmniMoeVisionAttention:construct")
        return stock(self, hidden_states, cu_seqlens, rotary_pos_emb, position_embeddings, **kwargs)
    from mindone.transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import apply_rotary_pos_emb_vision

    seq_length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
    query, key, value = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
    blocks = ms.Tensor(within_blocks(cu_seqlens.asnumpy()))
    attn_output, _ = ALL_ATTENTION_FUNCTIONS["flash_attention_2"](
        self, query, key, value, attention_mask=blocks, scaling=self.scaling, dropout=0.0, is_causal=False, **kwargs
    )
    return self.proj(attn_output.reshape(seq_length, -1).contiguous())


FULL_MODEL = f"{MODELING}.Qwen3OmniMoeForConditionalGeneration"
CODE_PREDICTOR = f"{MODELING}.Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration"


@MINDONE_FIXES.replaces(f"{FULL_MODEL}:generate")
@ms._no_grad()
def generate(
    self,
    input_ids=None,
    speaker: str = "Ethan",
    use_audio_in_video: bool = False,
    return_audio=None,
    thinker_max_new_tokens: int = 1024,
    thinker_eos_token_id: int = 151645,
    talker_max_new_tokens: int = 4096,
    talker_do_sample: bool = True,
    talker_top_k: int = 50,
    talker_top_p: float = 1.0,
    talker_temperature: float = 0.9,
    talker_repetition_penalty: float = 1.05,
    speaking_rows=None,
    hold_speech=False,
    **kwargs,
):
    """mindone's `generate` (its parameters and defaults, transformers'), with speech as released: while the
    talker samples, its code predictor samples too (`speech_sampling`); and speech for a batch of rows
    (`batched_speech`), which mindone refuses, or for some of them (`speaking_rows`, ours: None, every row).
    One row keeps mindone's own path. With `hold_speech` (ours) only the thinker runs, and the speaking rows'
    states come back in place of their speech, for `generate_held_speech` to speak later (with other passes' rows)."""
    stock = MINDONE_FIXES.original(f"{FULL_MODEL}:generate")
    speaks = self.has_talker if return_audio is None else return_audio
    arguments = dict(
        speaker=speaker,
        use_audio_in_video=use_audio_in_video,
        thinker_max_new_tokens=thinker_max_new_tokens,
        talker_max_new_tokens=talker_max_new_tokens,
        talker_do_sample=talker_do_sample,
        talker_top_k=talker_top_k,
        talker_top_p=talker_top_p,
        talker_temperature=talker_temperature,
        talker_repetition_penalty=talker_repetition_penalty,
        **kwargs,
    )
    if not speaks or not self.has_talker or (input_ids.shape[0] == 1 and not hold_speech):
        with code_predictor_sampling(self, bool(speaks and talker_do_sample)):
            return stock(
                self, input_ids, return_audio=return_audio, thinker_eos_token_id=thinker_eos_token_id, **arguments
            )
    talker_kwargs = talker_generate_keywords(self.config, arguments)
    thinker_arguments = {key: value for key, value in arguments.items() if not key.startswith("talker_")}
    speaker = thinker_arguments.pop("speaker")

    def thinker(**call):  # mindone's own generate, asked for the thinker alone
        return stock(self, **call)

    if hold_speech:
        return batched_speech.think(
            self, thinker, input_ids, thinker_eos_token_id, talker_kwargs, speaking_rows, **thinker_arguments
        )
    with code_predictor_sampling(self, talker_do_sample):
        return batched_speech.generate(
            self, thinker, input_ids, speaker, thinker_eos_token_id, talker_kwargs, speaking_rows, **thinker_arguments
        )


def generate_held_speech(model, held: list, speaker: str, **talker_arguments) -> tuple:
    """The speech of rows whose thinker passes held it (`generate(..., hold_speech=True)`), in one talker batch:
    one waveform (1, 1, samples) each. `talker_arguments`: `generate`'s `talker_*` keywords, its named ones all
    given (as `core.generate_keywords` gives them)."""
    with code_predictor_sampling(model, talker_arguments["talker_do_sample"]):
        return batched_speech.speak(model, held, speaker, talker_generate_keywords(model.config, talker_arguments))


def talker_generate_keywords(config, arguments: dict) -> dict:
    """The talker's `generate` keywords as mindone's `generate` builds them from its own: the sampling settings,
    the end code, the special codes suppressed, every other `talker_*` keyword, and the media's shapes."""
    talker = config.talker_config
    vocab = talker.text_config.vocab_size
    keywords = {
        "max_new_tokens": arguments["talker_max_new_tokens"],
        "do_sample": arguments["talker_do_sample"],
        "top_k": arguments["talker_top_k"],
        "top_p": arguments["talker_top_p"],
        "temperature": arguments["talker_temperature"],
        "repetition_penalty": arguments["talker_repetition_penalty"],
        "eos_token_id": talker.codec_eos_token_id,
        "suppress_tokens": [code for code in range(vocab - 1024, vocab) if code != talker.codec_eos_token_id],
        "output_hidden_states": True,
        "return_dict_in_generate": True,
    }
    named = ("talker_max_new_tokens", "talker_do_sample", "talker_top_k", "talker_top_p", "talker_temperature")
    named += ("talker_repetition_penalty",)
    for key, value in arguments.items():
        if key.startswith("talker_") and key not in named:
            keywords[key[len("talker_") :]] = value
    if arguments.get("feature_attention_mask") is not None:
        keywords["audio_feature_lengths"] = mint.sum(arguments["feature_attention_mask"], dim=1)
    for key in ("image_grid_thw", "video_grid_thw", "video_second_per_grid"):
        if key in arguments:
            keywords[key] = arguments[key]
    return keywords


@MINDONE_FIXES.replaces(f"{CODE_PREDICTOR}:generate")
def code_predictor_generate(self, *args, **kwargs):
    """mindone's talker asks its code predictor for greedy codes; while the talker samples, each is drawn as
    released instead, from the frame's uniforms, as the faster paths draw them (the same codes for a seed)."""
    if samples(self):
        from mindone.transformers.generation.logits_process import LogitsProcessorList

        uniforms = frame_uniforms(kwargs["inputs_embeds"].shape[0], kwargs["max_new_tokens"])  # as mindone calls it
        kwargs["logits_processor"] = LogitsProcessorList([DrawnAsReleased(uniforms)])
    return MINDONE_FIXES.original(f"{CODE_PREDICTOR}:generate")(self, *args, **kwargs)


class DrawnAsReleased:
    """A logits processor for the code predictor's greedy loop: each step's scores become the code drawn as
    released (`speech_sampling.residual_code`) and nothing else, which the greedy choice then takes."""

    def __init__(self, uniforms):
        self.uniforms, self.step = uniforms, 0

    def __call__(self, input_ids, scores):
        code = residual_code(scores, self.uniforms[:, self.step])
        self.step += 1
        chosen = mint.arange(scores.shape[-1]).reshape(1, -1) == code.reshape(-1, 1).astype(ms.int64)
        return mint.where(chosen, 0.0, float("-inf")).astype(scores.dtype)
