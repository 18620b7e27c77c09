"""Speech for every row of a batch (mindone 0.5.0 raises "does not support batched inference with audio
output"; newer transformers releases speak every row). Called by `mindone_fixes.generate` for batches of
two rows or more; a single row keeps mindone's own `generate`.

1. The thinker answers the batch as mindone runs it, keeping its hidden states.
2. Each row's talker prompt is built as mindone builds it for a single row (`talker_prompt`): the row's
   own tokens, its left padding and everything after its end-of-turn token left out.
3. The prompts are left-padded into one batch (each row's text still to be spoken padded on the right
   with the padding embedding, which is what a single row adds once its text has run out), and the talker
   generates for all rows: each row stops at its own end code, the loop gives it padding after that.
4. The rows' codes go through code2wav as one batch, each row cut at its own end (code2wav is causal: what
   follows a row's end changes none of its samples): its waveform is its own length.

Rows are independent in every forward, so a row's codes and speech are those it gets alone, and a row that
ends early changes nothing for the others (tests/mindone_changes/test_batched_speech.py).

`speaking_rows` names the rows that speak when not all do (a server's batch mixes requests with and without
speech): the thinker answers every row, the talker and code2wav run over the speaking rows only, with only
their media's shapes (`media_of_rows`), and the other rows' waveforms are None.
"""

from __future__ import annotations

from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import mint, ops

CHUNK_FRAMES, LEFT_CONTEXT_FRAMES = 300, 25  # mindone's `generate` decodes speech in these chunks


def generate(
    model,
    thinker_generate,
    input_ids,
    speaker: str,
    thinker_eos_token_id: int,
    talker_kwargs: dict,
    speaking_rows: Optional[list[int]] = None,
    **kwargs,
):
    """(thinker result, one waveform (1, 1, samples) per row, None for a row not in `speaking_rows` (None: every
    row speaks)). `thinker_generate(**kwargs)` runs mindone's `generate` without speech; `talker_kwargs` are the
    talker's `generate` keywords as mindone builds them."""
    config = model.config
    keep_states = {"thinker_output_hidden_states": True, "thinker_return_dict_in_generate": True}
    thinker_result, _ = thinker_generate(
        input_ids=input_ids, return_audio=False, thinker_eos_token_id=thinker_eos_token_id, **{**kwargs, **keep_states}
    )
    speaker_id = config.talker_config.speaker_id.get(speaker.lower())
    layers = list(zip(*thinker_result.hidden_states))  # per layer, the steps' states
    thinker_embed = mint.cat(layers[0], dim=1)
    thinker_hidden = mint.cat(layers[config.talker_config.accept_hidden_layer], dim=1)
    tts_bos, tts_eos, tts_pad = model.talker.text_projection(
        model.thinker.get_input_embeddings()(
            ms.Tensor([[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]], input_ids.dtype)
        )
    ).chunk(3, dim=1)

    prompt_ids = input_ids.asnumpy()
    rows = list(range(len(prompt_ids))) if speaking_rows is None else list(speaking_rows)
    if len(rows) < len(prompt_ids):
        talker_kwargs = media_of_rows(talker_kwargs, prompt_ids, rows, config, kwargs.get("use_audio_in_video", False))
    padding = (kwargs["attention_mask"].asnumpy() == 0).sum(1).tolist()
    answer_lengths = row_lengths(thinker_result.sequences.asnumpy()[:, prompt_ids.shape[1] :], thinker_eos_token_id)
    prompts = []
    for row in rows:
        pad, end = padding[row], prompt_ids.shape[1] + answer_lengths[row]  # the row's prompt and answer, no padding
        prompts.append(
            talker_prompt(
                model,
                prompt_ids[row, pad:],
                thinker_result.sequences[row : row + 1, pad:end],
                thinker_embed[row : row + 1, pad : end - 1],  # the last token never went through the thinker
                thinker_hidden[row : row + 1, pad : end - 1],
                speaker_id,
                (tts_bos, tts_eos, tts_pad),
            )
        )
    embeds, ids, mask, trailing = left_padded(prompts, tts_pad)
    talker_result = model.talker.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        trailing_text_hidden=trailing,
        tts_pad_embed=tts_pad,
        talker_input_ids=ids,
        **talker_kwargs,
    )
    codes = mint.stack([step[-1] for step in talker_result.hidden_states if step[-1] is not None], dim=1)
    codes = codes.transpose(1, 2)  # (rows, groups, frames)
    frames = row_frames(talker_result.sequences.asnumpy(), talker_kwargs["eos_token_id"], codes.shape[2])
    waveforms = dict(zip(rows, row_waveforms(model.code2wav, codes, frames)))
    return thinker_result, tuple(waveforms.get(row) for row in range(len(prompt_ids)))


MEDIA_SHAPES = {  # the talker's keywords that hold one entry per medium, and the medium they count
    "image_grid_thw": "images",
    "video_grid_thw": "videos",
    "video_second_per_grid": "videos",
    "audio_feature_lengths": "audios",
}


def media_of_rows(talker_kwargs: dict, prompt_ids: np.ndarray, rows: list[int], config, use_audio_in_video) -> dict:
    """`talker_kwargs` with the media shapes of `rows` only. The talker's position index takes each row's media
    from these lists in row order, so a row left out must take its entries along; a kind no kept row has is
    left out, as a batch without it never had it."""
    counts = [media_counts(ids, config.thinker_config, use_audio_in_video) for ids in prompt_ids]
    kept = dict(talker_kwargs)
    for key, kind in MEDIA_SHAPES.items():
        if key not in kept:
            continue
        firsts = np.cumsum([0] + [count[kind] for count in counts])
        entries = [entry for row in rows for entry in range(firsts[row], firsts[row + 1])]
        kept.pop(key)
        if entries:
            kept[key] = mint.index_select(talker_kwargs[key], 0, ms.Tensor(entries, ms.int32))
    return kept


def media_counts(ids: np.ndarray, thinker_config, use_audio_in_video: bool) -> dict[str, int]:
    """A prompt row's images, videos and audios, counted as mindone's `get_rope_index` counts them: an audio per
    audio-start token, an image or video per vision-start token followed by its kind's token (a video heard with
    its soundtrack: by the audio-start token)."""
    after_vision = ids[1:][ids[:-1] == thinker_config.vision_start_token_id]
    video_mark = thinker_config.audio_start_token_id if use_audio_in_video else thinker_config.video_token_id
    return {
        "images": int((after_vision == thinker_config.image_token_id).sum()),
        "videos": int((after_vision == video_mark).sum()),
        "audios": int((ids == thinker_config.audio_start_token_id).sum()),
    }


def row_lengths(new_tokens: np.ndarray, eos_token_id: int) -> list[int]:
    """Each row's answer: its new tokens up to and with its first end token (all of them if none)."""
    return [int(np.argmax(row == eos_token_id)) + 1 if (row == eos_token_id).any() else len(row) for row in new_tokens]


def row_frames(first_codes: np.ndarray, eos_code: int, frames: int) -> list[int]:
    """Each row's frames: those before its end code (the talker's last choice never becomes a frame)."""
    return [min(int(np.argmax(row == eos_code)), frames) if (row == eos_code).any() else frames for row in first_codes]


def talker_prompt(model, prompt_ids, sequence, thinker_embed, thinker_hidden, speaker_id, tts_embeds):
    """One row's talker prompt, as mindone's `generate` builds it for a single row: (embeds (1, t, hidden),
    ids (1, t), the text still to be spoken (1, n, hidden)). Of the conversation's turns, the talker hears the
    user's (their words, and the thinker's states at their media) and speaks the last, the assistant's."""
    config = model.config
    tts_bos, tts_eos, tts_pad = tts_embeds
    starts = np.flatnonzero(prompt_ids == config.im_start_token_id).tolist() + [int(sequence.shape[1])]
    media = [config.thinker_config.audio_token_id, config.thinker_config.image_token_id]
    media.append(config.thinker_config.video_token_id)
    multimodal = ms.Tensor(np.isin(sequence.asnumpy(), media))
    embeds, ids, trailing = [], [], None
    for turn, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        role, last = prompt_ids[start + 1], turn == len(starts) - 2
        start_at, end_at = ms.Tensor(start, ms.int64), ms.Tensor(end, ms.int64)
        if role == config.user_token_id:
            embeds.append(model._get_talker_user_parts(start_at, end_at, multimodal, thinker_hidden, thinker_embed))
            ids.append(sequence[:, start:end])
        elif role == config.assistant_token_id and last:
            assistant_embeds, assistant_ids, trailing = model._get_talker_assistant_parts(
                start_at, end_at, speaker_id, thinker_embed, tts_pad, tts_bos, tts_eos
            )
            embeds.append(assistant_embeds)
            ids.append(assistant_ids)
        elif role not in (config.system_token_id, config.assistant_token_id):
            raise AssertionError("expected a role after <|im_start|> (system, user or assistant)")
    return mint.cat(embeds, dim=1), mint.cat([part.astype(ms.int32) for part in ids], dim=1), trailing


def left_padded(prompts, tts_pad):
    """The rows' talker prompts as one batch: embeds and ids padded on the left (mask 0), the text still to be
    spoken padded on the right with the padding embedding."""
    longest = max(embeds.shape[1] for embeds, _, _ in prompts)
    longest_text = max(text.shape[1] for _, _, text in prompts)
    embeds, ids, masks, texts = [], [], [], []
    for row_embeds, row_ids, text in prompts:
        pad = longest - row_embeds.shape[1]
        embeds.append(pad_left(row_embeds, pad))
        ids.append(pad_left(row_ids, pad))
        masks.append(pad_left(mint.ones(row_ids.shape, dtype=ms.int64), pad))
        missing = longest_text - text.shape[1]
        filler = [tts_pad.astype(text.dtype).broadcast_to((1, missing, text.shape[2]))] if missing else []
        texts.append(mint.cat([text, *filler], dim=1))
    return mint.cat(embeds, dim=0), mint.cat(ids, dim=0), mint.cat(masks, dim=0), mint.cat(texts, dim=0)


def pad_left(tensor, pad: int):
    """Zeros before the second axis of a (1, t) or (1, t, hidden) tensor."""
    widths = (pad, 0) if tensor.ndim == 2 else (0, 0, pad, 0)
    return mint.nn.functional.pad(tensor, widths) if pad else tensor


def row_waveforms(code2wav, codes, frames: list[int]) -> tuple:
    """Each row's codes up to its own end (`frames`), through code2wav as one batch: (1, 1, samples) per row, as
    mindone's `generate` decodes a row alone. code2wav is causal, so the frames a longer row adds after a row's end
    change none of its samples, and each row is cut to the length its own frames give (every code2wav call trims
    the same few samples from its end, once per `generate` chunk)."""
    longest = max(frames)
    whole = row_waveform(code2wav, codes[:, :, :longest])  # (rows, 1, samples)
    per_frame = int(code2wav.total_upsample)
    calls = lambda count: -(-count // CHUNK_FRAMES)  # code2wav calls `chunked_decode` makes for `count` frames
    trimmed = (longest * per_frame - whole.shape[-1]) // max(calls(longest), 1)
    return tuple(
        whole[row : row + 1, :, : count * per_frame - trimmed * calls(count)] for row, count in enumerate(frames)
    )


def row_waveform(code2wav, codes):
    """Codes (rows, groups, frames) through code2wav, as mindone's `generate` decodes them."""
    if codes.shape[2] == 0:
        return ops.zeros((codes.shape[0], 1, 0), ms.float32)
    return code2wav.chunked_decode(codes, chunk_size=CHUNK_FRAMES, left_context_size=LEFT_CONTEXT_FRAMES).float()
