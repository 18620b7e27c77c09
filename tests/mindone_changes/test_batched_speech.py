"""Speech for every row of a batch (omni_helpers/mindone_changes/batched_speech.py): each row's answer, codes and
waveform are those it gets alone, from mindone at batch 1 and from the reference, when one row's answer and
speech end earlier than the other's; streamed, each row is handed its own speech up to its own end
(omni_helpers/generation/speech_stream.py)."""

from __future__ import annotations

import numpy as np
import pytest

from omni_helpers.request.settings import GenerationSettings
from tests.reference import batch_inputs, request_conversation

NEW_TOKENS, TALKER_FRAMES = 8, 10


def speak(mindone, checkpoint, conversations, settings, on_audio=None):
    """The answers to a batch of conversations, and the codes (groups, frames) code2wav decoded for each row, up to
    its end code (the rows go through code2wav as one batch);
    `on_audio(row, samples)` streams each row's speech."""
    from omni_helpers.generation.core import generate_from_inputs
    from omni_helpers.measuring.forward_taps import listen

    mindone.codes_seen.clear()
    inputs = batch_inputs(checkpoint, conversations, False)
    logits = []  # the talker's, (rows, vocab) per step: random weights choose the same codes from many inputs
    taps = listen(
        mindone.model.talker, after=lambda cell, args, outputs: logits.append(outputs.logits[:, -1].asnumpy())
    )
    try:
        answers = generate_from_inputs(mindone.model, mindone.processor, inputs, settings, on_audio=on_audio)
    finally:
        for tap in taps:
            tap.remove()
    for answer, row_logits in zip(answers, np.stack(logits, axis=1)):
        answer.talker_logits = row_logits  # (steps, vocab)
    if on_audio is not None:  # the streams answer generate's own code2wav pass
        return answers, None
    decoded = mindone.codes_seen[-len(conversations) :]  # generate's own code2wav call: each row's (groups, frames)
    end_code = mindone.model.config.talker_config.codec_eos_token_id
    ends = [np.flatnonzero(codes[0] == end_code) for codes in decoded]  # a row's frames end at its end code
    return answers, [codes[:, : end[0] if len(end) else None] for codes, end in zip(decoded, ends)]


def speak_alone(mindone, checkpoint, conversations, settings):
    alone = [speak(mindone, checkpoint, [conversation], settings) for conversation in conversations]
    return [answers[0] for answers, _ in alone], [codes[0] for _, codes in alone]


def test_each_row_speaks_as_it_would_alone_and_one_that_ends_early_changes_nothing(
    mindone, reference, tiny_checkpoint, sample_media
):
    # a greeting and image + audio: the tiny talker's first codes part ways from the fourth frame on
    conversations = [[{"role": "user", "content": "Hi"}], request_conversation("image_audio", sample_media)]
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, return_audio=True, talker_max_new_tokens=TALKER_FRAMES)
    with pytest.MonkeyPatch.context() as patch:
        # Random weights never choose the end tokens: the text row's third token is named the end of the turn,
        # then a first code the text row speaks (and the other row does not, by then) the end of the speech.
        first, _ = speak_alone(mindone, tiny_checkpoint, conversations, settings)
        ends = {"turn": first[0].token_ids[2]}
        assert ends["turn"] not in first[1].token_ids[:3], "pick another token: both rows would end together"
        for config in (mindone.model.config, reference.model.config):
            patch.setattr(config, "im_end_token_id", ends["turn"])
        _, codes = speak_alone(mindone, tiny_checkpoint, conversations, settings)
        text_row, other_row = codes[0][0], codes[1][0]
        ends["frame"] = next(
            frame
            for frame in range(2, len(text_row))
            if text_row[frame] not in text_row[:frame] and text_row[frame] not in other_row[: frame + 1]
        )
        for config in (mindone.model.config, reference.model.config):
            patch.setattr(config.talker_config, "codec_eos_token_id", int(text_row[ends["frame"]]))
        alone, alone_codes = speak_alone(mindone, tiny_checkpoint, conversations, settings)
        batch, batch_codes = speak(mindone, tiny_checkpoint, conversations, settings)
        streamed = ([], [])  # each row's speech as it was streamed
        streamed_batch, _ = speak(
            mindone, tiny_checkpoint, conversations, settings, lambda row, samples: streamed[row].append(samples)
        )
        references = [
            reference.generate(batch_inputs(tiny_checkpoint, [c], False), False, NEW_TOKENS, True, TALKER_FRAMES)
            for c in conversations
        ]

    assert batch[0].token_ids[-1] == ends["turn"] and len(batch[0].token_ids) <= 3 < len(batch[1].token_ids)
    assert batch_codes[0].shape[1] == ends["frame"] < batch_codes[1].shape[1]  # the text row's speech ended early
    for row, (ours, solo, theirs) in enumerate(zip(batch, alone, references, strict=True)):
        assert ours.token_ids == solo.token_ids == theirs.tokens.tolist(), row
        assert np.array_equal(batch_codes[row], alone_codes[row]) and np.array_equal(batch_codes[row], theirs.codes)
        steps = batch_codes[row].shape[1] + 1  # the steps the row spoke in (then its end code)
        assert np.abs(ours.talker_logits[:steps] - solo.talker_logits[:steps]).max() <= 1e-5, row
        assert len(ours.waveform) == len(solo.waveform) == len(theirs.wav), row
        assert np.abs(ours.waveform - solo.waveform).max() <= 1e-5, row
        assert np.abs(ours.waveform - theirs.wav).max() <= 1e-3, row  # eager on both sides (tests/script_runs.py)
        assert ours.metrics["audio_seconds"] == pytest.approx(len(ours.waveform) / 24000, abs=1e-3)
        # streamed, each row its own speech, up to its own end: the same samples, the row's first from its 4th frame;
        # the answer's waveform is what was streamed (generate's own decode answered from the streams)
        joined = np.concatenate(streamed[row])
        assert len(joined) == len(ours.waveform) and np.abs(joined - ours.waveform).max() <= 5e-5, row
        assert np.array_equal(streamed_batch[row].waveform, joined) and streamed_batch[row].token_ids == ours.token_ids
    assert ends["frame"] < 4 < batch_codes[1].shape[1]  # the text row ended before the first emission, the other not
    assert len(streamed[1]) >= 2 and streamed_batch[1].metrics["first_audio_step"] == 5


def talker_logits_of(mindone, run):
    """`run()`'s result, and the talker's logits (rows, steps, vocab) over its steps."""
    from omni_helpers.measuring.forward_taps import listen

    logits = []
    taps = listen(
        mindone.model.talker, after=lambda cell, args, outputs: logits.append(outputs.logits[:, -1].asnumpy())
    )
    try:
        result = run()
    finally:
        for tap in taps:
            tap.remove()
    return result, np.stack(logits, axis=1)


def test_rows_without_speech_share_the_thinker_and_the_talker_hears_only_the_speaking_rows_media(
    mindone, tiny_checkpoint, sample_media
):
    from omni_helpers.generation.core import generate_from_inputs

    question = {"type": "text", "text": "What can you see and hear?"}
    conversations = [  # the silent row's image and audio come first, and their shapes differ from the speaking row's
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(sample_media["image"])},
                    {"type": "audio", "audio": str(sample_media["audio"])},
                    question,
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(sample_media["image"]), "max_pixels": 56 * 56},
                    {"type": "audio", "audio": str(sample_media["audio"]), "audio_end": 1.0},
                    question,
                ],
            }
        ],
        [{"role": "user", "content": "Hi"}],
    ]
    speech = GenerationSettings(max_new_tokens=NEW_TOKENS, return_audio=True, talker_max_new_tokens=TALKER_FRAMES)
    speaks = [False, True, True]
    streamed = {0: [], 1: [], 2: []}
    answered_early = {}  # row: (its answer, how many pieces of speech had gone out by then)

    def answer_early(row, answer):
        answered_early[row] = answer, sum(len(pieces) for pieces in streamed.values())

    def run(rows, settings, **kwargs):
        inputs = batch_inputs(tiny_checkpoint, [conversations[row] for row in rows], False)
        return generate_from_inputs(mindone.model, mindone.processor, inputs, settings, **kwargs)

    batch, batch_logits = talker_logits_of(
        mindone,
        lambda: run(
            [0, 1, 2],
            speech,
            speaking_rows=[1, 2],
            on_audio=lambda row, samples: streamed[row].append(samples),
            on_text=lambda row, piece: None,
            on_answer=answer_early,
        ),
    )
    alone = [run([row], speech if speaks[row] else speech.replace(return_audio=False))[0] for row in (0, 2)]
    (alone_1,), alone_1_logits = talker_logits_of(mindone, lambda: run([1], speech))
    alone.insert(1, alone_1)

    for row, (ours, solo) in enumerate(zip(batch, alone, strict=True)):
        assert ours.token_ids == solo.token_ids, row
        if not speaks[row]:
            assert ours.waveform is None and not streamed[row] and ours.metrics["talker_codec_frames"] == 0
            assert "first_audio_step" not in ours.metrics
            continue
        assert len(ours.waveform) == len(solo.waveform) and np.abs(ours.waveform - solo.waveform).max() <= 1e-5, row
        assert np.abs(np.concatenate(streamed[row]) - ours.waveform).max() <= 5e-5, row
    # the talker ran two rows, the speaking ones; the image + audio row's logits are those it gets alone, which
    # only its own media's shapes give (the silent row's image and audio are larger)
    assert batch_logits.shape[0] == 2
    steps = alone_1_logits.shape[1]
    assert np.abs(batch_logits[0, :steps] - alone_1_logits[0]).max() <= 1e-5
    # the silent row was answered as the thinker finished, before any speech went out, with the answer returned
    assert list(answered_early) == [0] and answered_early[0] == (batch[0], 0)
    assert (
        batch[0].text == alone[0].text and batch[0].metrics["generate_seconds"] < batch[1].metrics["generate_seconds"]
    )


class TalkerPrompt(Exception):
    """Raised in place of the talker's `generate`, carrying the prompt it was given."""


def talker_prompts_of(mindone, checkpoint, conversations, settings, speaking_rows=None):
    """The prompt mindone's `generate` hands the talker for `conversations` (embeddings, ids, mask, the text still
    to be spoken), as numpy; the talker never runs."""
    from omni_helpers.generation.core import generate_from_inputs

    def stop(**keywords):
        names = ("inputs_embeds", "talker_input_ids", "attention_mask", "trailing_text_hidden")
        raise TalkerPrompt([None if keywords.get(name) is None else keywords[name].asnumpy() for name in names])

    inputs = batch_inputs(checkpoint, conversations, False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mindone.model.talker, "generate", stop)
        with pytest.raises(TalkerPrompt) as given:
            generate_from_inputs(mindone.model, mindone.processor, inputs, settings, speaking_rows=speaking_rows)
    return given.value.args[0]


def padding_embedding(model) -> np.ndarray:
    """The talker's embedding of the text-padding token, as mindone's `generate` projects it."""
    import mindspore as ms

    token = ms.Tensor([[model.config.tts_pad_token_id]], ms.int64)
    return model.talker.text_projection(model.thinker.get_input_embeddings()(token)).asnumpy()[0, 0]


def test_a_batchs_talker_prompts_are_those_mindone_builds_for_each_row_alone(mindone, tiny_checkpoint, sample_media):
    """Built for every speaking row at once (one projection per kind, then a gather), each row's talker prompt is
    the one mindone's own `generate` builds for the row alone, its left padding aside: media heard through the
    hidden states, a system turn and an earlier answer left out, the codec's special codes on the assistant part,
    and the text still to be spoken padded on the right with the padding embedding."""
    history = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count to three."},
    ]
    silent = [{"role": "user", "content": "Name a colour."}]  # the batch's first row: the talker's rows are the others
    conversations = [silent, request_conversation("image_audio", sample_media), [{"role": "user", "content": "Hi"}]]
    conversations.append(history)
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, return_audio=True, talker_max_new_tokens=TALKER_FRAMES)
    embeds, ids, mask, spoken = talker_prompts_of(mindone, tiny_checkpoint, conversations, settings, [1, 2, 3])
    pad = padding_embedding(mindone.model)
    lengths = []
    for batch_row, row in enumerate([1, 2, 3]):
        alone_embeds, alone_ids, _, alone_spoken = talker_prompts_of(
            mindone, tiny_checkpoint, [conversations[row]], settings
        )
        length, spoken_length = alone_ids.shape[1], alone_spoken.shape[1]
        assert mask[batch_row].sum() == length and not mask[batch_row, :-length].any()
        assert np.array_equal(ids[batch_row, -length:], alone_ids[0]) and not ids[batch_row, :-length].any()
        assert np.abs(embeds[batch_row, -length:] - alone_embeds[0]).max() <= 1e-6, row
        assert not embeds[batch_row, :-length].any()  # left padding: zeros
        assert np.abs(spoken[batch_row, :spoken_length] - alone_spoken[0]).max() <= 1e-6, row
        assert np.abs(spoken[batch_row, spoken_length:] - pad).max(initial=0.0) <= 1e-6, row
        lengths.append((length, spoken_length))
    prompts, texts = zip(*lengths)
    assert len(set(prompts)) > 1 and len(set(texts)) > 1  # some rows padded, on each side


def test_rows_of_separate_thinker_passes_speak_together_each_as_it_would_alone(mindone, tiny_checkpoint, sample_media):
    """Speech deferred (`generate_from_inputs(..., hold_speech=True)`, then `speak_held`, as a server defers it):
    the speaking rows of two thinker passes speak as one talker batch, each as it would alone. The first pass's
    speaking row hears small media beside a silent row with large ones; the second pass's rows are a greeting
    (left-padded in its pass) and full-size media: each row's talker logits, waveform and streamed speech are the
    ones it gets alone, which only its own media's shapes and its own positions give."""
    from omni_helpers.generation.core import generate_from_inputs, speak_held

    small, full = (request_conversation("image_audio", sample_media) for _ in range(2))
    small[0]["content"][0]["max_pixels"] = 56 * 56
    small[0]["content"][1]["audio_end"] = 1.0
    silent = request_conversation("image_audio", sample_media)  # larger media than the speaking row beside it
    greeting = [{"role": "user", "content": "Hi"}]
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, return_audio=True, talker_max_new_tokens=TALKER_FRAMES)

    def think(conversations, speaking_rows=None):
        inputs = batch_inputs(tiny_checkpoint, conversations, False)
        return generate_from_inputs(
            mindone.model, mindone.processor, inputs, settings, speaking_rows=speaking_rows, hold_speech=True
        )

    first, second = think([silent, small], [1]), think([greeting, full])
    assert first[0].held is None and first[0].waveform is None  # silent: answered whole by the thinker
    assert all(answer.held is not None and answer.waveform is None for answer in (first[1], *second))
    streamed = ([], [], [])
    spoken, logits = talker_logits_of(
        mindone,
        lambda: speak_held(
            mindone.model,
            mindone.processor,
            [first[1], *second],
            settings,
            on_audio=lambda row, samples: streamed[row].append(samples),
        ),
    )
    for row, conversation in enumerate([small, greeting, full]):
        inputs = batch_inputs(tiny_checkpoint, [conversation], False)
        (alone,), alone_logits = talker_logits_of(
            mindone, lambda: generate_from_inputs(mindone.model, mindone.processor, inputs, settings)
        )
        ours = spoken[row]
        assert ours.token_ids == alone.token_ids and ours.text == alone.text, row
        steps = alone_logits.shape[1]
        assert np.abs(logits[row, :steps] - alone_logits[0]).max() <= 1e-5, row
        assert len(ours.waveform) == len(alone.waveform) and np.abs(ours.waveform - alone.waveform).max() <= 1e-5, row
        assert np.abs(np.concatenate(streamed[row]) - ours.waveform).max() <= 5e-5, row
        assert ours.metrics["audio_seconds"] == alone.metrics["audio_seconds"] and ours.held is None
