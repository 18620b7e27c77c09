"""Speech for every row of a batch (mindone 0.5.0 raises "does not support batched inference with audio
output"; newer transformers releases speak every row). Called by `mindone_fixes.generate` for batches of
two rows or more; a single row keeps mindone's own `generate`. A server defers speech (`think`, then
`speak` once rows of later thinker passes can speak with them: `mindone_fixes.generate_held_speech`), one row or many.

1. The thinker answers the batch as mindone runs it, keeping its hidden states.
2. Each row's talker prompt is the one mindone builds for the row alone (`prompt_plan`, kept with the row's
   states in a `HeldSpeech` by `think`, so that rows of several thinker passes can speak together): the row's own
   tokens, its left padding and everything after its end-of-turn token left out. The prompts are built at
   once, left-padded into one batch (`talker_prompts`: each row's text still to be spoken padded on the right
   with the padding embedding, which is what a single row adds once its text has run out).
3. The talker generates for all rows: each row stops at its own end code, the loop gives it padding after
   that.
4. The rows' codes go through code2wav as one batch, each row cut at its own end (code2wav is causal: what
   follows a row's end changes none of its samples): its waveform is its own length.

Rows are independent in every forward, so a row's codes and speech are those it gets alone, and a row that
ends early changes nothing for the others (tests/mindone_changes/test_batched_speech.py).

`speaking_rows` names the rows that speak when not all do (a server's batch mixes requests with and without
speech): the thinker answers every row, the talker and code2wav run over the speaking rows only, with only
their media's shapes (`media_entries`), and the other rows' waveforms are None.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    thinker_result, held = think(
        model, thinker_generate, input_ids, thinker_eos_token_id, talker_kwargs, speaking_rows, **kwargs
    )
    rows = list(range(input_ids.shape[0])) if speaking_rows is None else list(speaking_rows)
    waveforms = dict(zip(rows, speak(model, held, speaker, talker_kwargs)))
    return thinker_result, tuple(waveforms.get(row) for row in range(input_ids.shape[0]))


@dataclass
class HeldSpeech:
    """What one speaking row's speech needs of its thinker pass, so that rows of several passes can speak in one
    talker batch (`speak`): its talker prompt's plan, its thinker input embeddings and hidden states at the
    talker's layer over its own positions (no padding), and its media's entries of the talker's keywords."""

    plan: PromptPlan
    embed: ms.Tensor  # (positions, hidden)
    hidden: ms.Tensor  # (positions, hidden)
    media: dict  # MEDIA_SHAPES keys: this row's entries


def think(model, thinker_generate, input_ids, thinker_eos_token_id, talker_kwargs, speaking_rows=None, **kwargs):
    """The thinker's pass over every row, as mindone runs it, keeping its hidden states: (thinker result, a
    `HeldSpeech` for each row of `speaking_rows` (None: every row), in order)."""
    config = model.config
    keep_states = {"thinker_output_hidden_states": True, "thinker_return_dict_in_generate": True}
    thinker_result, _ = thinker_generate(
        input_ids=input_ids, return_audio=False, thinker_eos_token_id=thinker_eos_token_id, **{**kwargs, **keep_states}
    )
    layers = list(zip(*thinker_result.hidden_states))  # per layer, the steps' states
    thinker_embed = mint.cat(layers[0], dim=1)
    thinker_hidden = mint.cat(layers[config.talker_config.accept_hidden_layer], dim=1)
    prompt_ids = input_ids.asnumpy()
    rows = list(range(len(prompt_ids))) if speaking_rows is None else list(speaking_rows)
    padding = (kwargs["attention_mask"].asnumpy() == 0).sum(1).tolist()
    sequences = thinker_result.sequences.asnumpy()
    ends = prompt_ids.shape[1] + np.array(row_lengths(sequences[:, prompt_ids.shape[1] :], thinker_eos_token_id))
    counts = [media_counts(ids, config.thinker_config, kwargs.get("use_audio_in_video", False)) for ids in prompt_ids]
    return thinker_result, [
        HeldSpeech(
            prompt_plan(config, prompt_ids[row, padding[row] :], sequences[row, padding[row] : ends[row]]),
            thinker_embed[row, padding[row] :],
            thinker_hidden[row, padding[row] :],
            media_entries(talker_kwargs, counts, row),
        )
        for row in rows
    ]


def speak(model, held: list[HeldSpeech], speaker: str, talker_kwargs: dict) -> tuple:
    """The speech of `held` rows, from one thinker pass or several, as one talker batch: one waveform (1, 1,
    samples) per row, each the one the row gets alone. `talker_kwargs`: the talker's `generate` keywords; the
    media's shapes are the rows' own."""
    config = model.config
    speaker_id = config.talker_config.speaker_id.get(speaker.lower())
    specials = [[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]]
    tts_bos, tts_eos, tts_pad = model.talker.text_projection(
        model.thinker.get_input_embeddings()(ms.Tensor(specials, ms.int64))
    ).chunk(3, dim=1)
    starts = np.cumsum([0] + [row.embed.shape[0] for row in held])[:-1]  # each row's first position in the stack
    embeds, ids, mask, trailing = talker_prompts(
        model,
        [row.plan for row in held],
        starts,
        mint.cat([row.embed for row in held]),
        mint.cat([row.hidden for row in held]),
        speaker_id,
        (tts_bos, tts_eos, tts_pad),
    )
    talker_kwargs = {key: value for key, value in talker_kwargs.items() if key not in MEDIA_SHAPES}
    talker_result = model.talker.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        trailing_text_hidden=trailing,
        tts_pad_embed=tts_pad,
        talker_input_ids=ids,
        **talker_kwargs,
        **joined_media(held),
    )
    codes = mint.stack([step[-1] for step in talker_result.hidden_states if step[-1] is not None], dim=1)
    codes = codes.transpose(1, 2)  # (rows, groups, frames)
    frames = row_frames(talker_result.sequences.asnumpy(), talker_kwargs["eos_token_id"], codes.shape[2])
    return row_waveforms(model.code2wav, codes, frames)


MEDIA_SHAPES = {  # the talker's keywords that hold one entry per medium, and the medium they count
    "image_grid_thw": "images",
    "video_grid_thw": "videos",
    "video_second_per_grid": "videos",
    "audio_feature_lengths": "audios",
}


def media_entries(talker_kwargs: dict, counts: list[dict[str, int]], row: int) -> dict:
    """`row`'s entries (`counts`: each row's media) in the batch's talker media keywords. The talker's position
    index takes each row's media from these lists in row order, so a row takes its own entries along; a kind the
    row lacks is left out, as a batch without it never had it."""
    kept = {}
    for key, kind in MEDIA_SHAPES.items():
        if key not in talker_kwargs:
            continue
        first = sum(count[kind] for count in counts[:row])
        if counts[row][kind]:
            entries = ms.Tensor(list(range(first, first + counts[row][kind])), ms.int32)
            kept[key] = mint.index_select(talker_kwargs[key], 0, entries)
    return kept


def joined_media(held: list[HeldSpeech]) -> dict:
    """The talker's media keywords for `held` rows spoken together: each row's entries, in row order."""
    keys = [key for key in MEDIA_SHAPES if any(key in row.media for row in held)]
    return {key: mint.cat([row.media[key] for row in held if key in row.media]) for key in keys}


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


@dataclass
class PromptPlan:
    """Where one row's talker prompt comes from, by position in the row's own prompt and answer (no padding), as
    mindone builds it for a single row: the user turns (a medium's positions from the thinker's hidden states
    through the talker's `hidden_projection`, any other from its embeddings through `text_projection`), then the
    assistant turn, the last (`text_projection` of its embeddings: three positions, four of padding, one of
    text-begins and one more, with the codec's six special codes added to the last six; the rest of the answer
    is the text still to be spoken, then text-ends)."""

    ids: np.ndarray  # the talker's input ids: the user turns' tokens, then nine of padding
    user: np.ndarray  # the user turns' positions, in order
    heard: np.ndarray  # of them, those holding a medium
    answer: np.ndarray  # the assistant turn's positions that went through the thinker (all but the last)


def prompt_plan(config, prompt_ids: np.ndarray, sequence: np.ndarray) -> PromptPlan:
    """A row's `PromptPlan` from its prompt's ids and its whole sequence (the prompt and the answer up to its end)."""
    starts = np.flatnonzero(prompt_ids == config.im_start_token_id).tolist() + [len(sequence)]
    user, answer = [], np.zeros(0, np.int64)
    for turn, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        role, last = prompt_ids[start + 1], turn == len(starts) - 2
        if role == config.user_token_id:
            user.append(np.arange(start, end))
        elif role == config.assistant_token_id and last:
            answer = np.arange(start, len(sequence) - 1)  # the last token never went through the thinker
        elif role not in (config.system_token_id, config.assistant_token_id):
            raise AssertionError("expected a role after <|im_start|> (system, user or assistant)")
    if len(answer) < 4:  # where mindone's single row adds its nine codec embeddings to nine positions
        raise ValueError(f"an answer of {len(answer) - 2} token(s) is too short to speak: the talker needs two or more")
    user = np.concatenate(user) if user else np.zeros(0, np.int64)
    thinker = config.thinker_config
    heard = np.isin(sequence[user], [thinker.audio_token_id, thinker.image_token_id, thinker.video_token_id])
    ids = np.concatenate([sequence[user], np.full(9, config.tts_pad_token_id)]).astype(np.int32)
    return PromptPlan(ids, user, heard, answer)


def talker_prompts(model, plans, starts, thinker_embed, thinker_hidden, speaker_id, tts_embeds):
    """The talker prompts of rows (their `plans`) as one batch, each as mindone builds it for the row alone:
    (embeds (rows, t, hidden) and ids (rows, t), padded on the left with zeros; the mask (rows, t); the text still
    to be spoken (rows, n, hidden), padded on the right with the padding embedding). `thinker_embed` and
    `thinker_hidden` (positions, hidden) hold every row's positions, row after row, each from `starts`. Every row's
    positions are projected at once (the user turns' through both projections, the answers' through
    `text_projection`) into one table of embeddings, and each prompt gathered from it by indices built on the host:
    mindone's own reads the host several times per row (each turn's length, its media mask's `any` and counts)."""
    talker = model.talker
    users = np.concatenate([start + plan.user for start, plan in zip(starts, plans)])
    answers = np.concatenate([start + plan.answer for start, plan in zip(starts, plans)])
    bos, eos, pad = (embed.reshape(1, -1) for embed in tts_embeds)
    zeros = mint.zeros_like(pad)
    table = mint.cat(  # the users' positions as text, the answers', the users' as media, the specials, zeros
        [
            talker.text_projection(positions_of(thinker_embed, np.concatenate([users, answers]))),
            talker.hidden_projection(positions_of(thinker_hidden, users)),
            bos,
            eos,
            pad,
            zeros,
        ]
    )
    heard_at = len(users) + len(answers)  # where the users' positions as media start
    bos_at, eos_at, pad_at, zero_at = heard_at + len(users) + np.arange(4)
    user_at = np.cumsum([0] + [len(plan.user) for plan in plans])
    answer_at = len(users) + np.cumsum([0] + [len(plan.answer) for plan in plans])
    prompts, spoken = [], []
    for k, plan in enumerate(plans):
        user = user_at[k] + np.arange(len(plan.user))
        answer = answer_at[k] + np.arange(len(plan.answer))
        user = np.where(plan.heard, user + heard_at, user)
        prompts.append(np.concatenate([user, answer[:3], [pad_at] * 4, [bos_at], answer[3:4]]))
        spoken.append(np.concatenate([answer[4:], [eos_at]]))
    longest, longest_spoken = max(map(len, prompts)), max(map(len, spoken))
    prompts = np.stack([np.pad(row, (longest - len(row), 0), constant_values=zero_at) for row in prompts])
    spoken = np.stack([np.pad(row, (0, longest_spoken - len(row)), constant_values=pad_at) for row in spoken])
    config = model.config.talker_config
    codes = [config.codec_nothink_id, config.codec_think_bos_id, config.codec_think_eos_id, speaker_id]
    codes += [config.codec_pad_id, config.codec_bos_id]
    codec = mint.cat([zeros, talker.get_input_embeddings()(ms.Tensor(codes, ms.int64))])
    added = np.zeros_like(prompts)
    added[:, -6:] = np.arange(1, 7)  # the six special codes, on the last six positions of every row's prompt
    ids = np.stack([np.pad(plan.ids, (longest - len(plan.ids), 0)) for plan in plans])
    mask = np.stack([np.pad(np.ones(len(plan.ids), np.int64), (longest - len(plan.ids), 0)) for plan in plans])
    embeds = entries_of(table, prompts) + entries_of(codec, added)
    return embeds, ms.Tensor(ids), ms.Tensor(mask), entries_of(table, spoken)


def positions_of(states, at: np.ndarray):
    """The states (positions, hidden) at `at`: (len(at), hidden)."""
    return mint.index_select(states, 0, ms.Tensor(at))


def entries_of(table, at: np.ndarray):
    """The table's rows at `at` (any shape), in that shape plus the table's width."""
    return mint.index_select(table, 0, ms.Tensor(at.reshape(-1))).reshape(*at.shape, -1)


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
