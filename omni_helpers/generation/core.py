"""The one generation call every entry point makes: conversations and settings in, answers out.

    answers = generate_answers(model, processor, conversations, settings, on_text=print_piece)

It is the seed's five steps, for a batch: the chat template, `process_mm_info` for the
media, the processor (left-padded, so that every row's prompt ends at the same place),
mindone's `generate` with the `thinker_*` / `talker_*` keywords written out below, and
the decoding of every row. The server runs the first three on rank 0 only
(`prepare_inputs`) and the rest on every rank (`generate_from_inputs`).

Request errors raise `RequestError`; metrics come back in each `Answer`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from omni_helpers.generation.inputs import to_mindspore, videos_to_numpy
from omni_helpers.generation.instruments import Instruments
from omni_helpers.generation.speech_stream import SPEECH_SAMPLE_RATE, AudioCallback
from omni_helpers.generation.streaming import StepStream, TextCallback
from omni_helpers.request.cancellation import Cancellation
from omni_helpers.request.conversation import Conversation
from omni_helpers.request.errors import RequestError
from omni_helpers.request.settings import GenerationSettings
from omni_helpers.request.validation import Context, check_context
from omni_helpers.runtime import seed_everything


@dataclass
class Answer:
    text: str
    waveform: Optional[np.ndarray]  # float32 in [-1, 1], 24 kHz mono; None without speech
    token_ids: list[int]  # the new tokens, up to and with the end-of-turn token
    metrics: dict[str, Any] = field(default_factory=dict)
    step_logits: Optional[np.ndarray] = None  # (tokens, vocab), with keep_logits=True
    first_token_at: Optional[float] = None  # seconds since the epoch
    held: Optional["DeferredSpeech"] = None  # a speaking row's speech still to come (`hold_speech`), for `speak_held`


@dataclass
class DeferredSpeech:
    """A speaking row's speech, deferred: what the talker needs of its thinker pass (`batched_speech.HeldSpeech`),
    when that generation began and its clock started (time.perf_counter)."""

    states: Any
    generating: float
    started: float


# on_answer(row, answer): a row's whole answer, called once the row is done
AnswerCallback = Callable[[int, Answer], None]
DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}  # an answer's text from its tokens


# ----------------------------------------------------------------------------- steps 1-3


def read_media(conversation: Conversation, use_audio_in_video: bool) -> tuple[list, list, list]:
    """One conversation's audio, images and video frames, decoded by qwen_omni_utils."""
    from qwen_omni_utils import process_mm_info

    try:
        audios, images, videos = process_mm_info(conversation, use_audio_in_video=use_audio_in_video)
    except Exception as error:  # any decoder's error: the media were checked, so this is rare
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RequestError(f"the media could not be decoded ({first_line}); check the files") from error
    return audios or [], images or [], videos or []


def prepare_inputs(processor, conversations: list[Conversation], settings: GenerationSettings) -> dict[str, np.ndarray]:
    """Chat template, media and processor for a batch: numpy arrays, one left-padded row per conversation."""
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    audios, images, videos = [], [], []
    for conversation in conversations:  # the processor takes each kind of media in the order of the texts
        found = read_media(conversation, settings.use_audio_in_video)
        audios, images, videos = audios + found[0], images + found[1], videos + found[2]
    inputs = processor(
        text=texts,
        audio=audios or None,
        images=images or None,
        videos=videos_to_numpy(videos) or None,
        return_tensors="np",
        padding=True,
        use_audio_in_video=settings.use_audio_in_video,
    )
    return dict(inputs)


# ----------------------------------------------------------------------------- steps 4-5


def generate_keywords(
    settings: GenerationSettings,
    config,
    text_streamer: Optional[StepStream],
    cancellation: Optional[Cancellation] = None,
    keep_logits: bool = False,
) -> dict[str, Any]:
    """mindone's `generate` keywords: `thinker_*` and `talker_*` go to each stage (a bare
    `max_new_tokens` would not reach the thinker). The thinker's end-of-turn id comes from
    the checkpoint; mindone hard-codes the released one (151645). A streamer watches the
    thinker only when its text is streamed (it costs a host read per step); a cancellation
    rides along as both stages' stopping criterion (read by the loop, see cancellation.py)."""
    keywords: dict[str, Any] = {
        "use_audio_in_video": settings.use_audio_in_video,
        "return_audio": settings.return_audio,
        "thinker_max_new_tokens": settings.max_new_tokens,
        "thinker_eos_token_id": config.im_end_token_id,
        "thinker_do_sample": settings.do_sample,
        "thinker_return_dict_in_generate": True,
        **({"thinker_streamer": text_streamer} if text_streamer is not None else {}),
        **({"thinker_output_logits": True} if keep_logits else {}),
    }
    if cancellation is not None:
        from mindone.transformers.generation.stopping_criteria import StoppingCriteriaList

        keywords["thinker_stopping_criteria"] = StoppingCriteriaList([cancellation])
    if settings.do_sample:
        keywords.update(
            thinker_temperature=settings.temperature, thinker_top_p=settings.top_p, thinker_top_k=settings.top_k
        )
    if settings.return_audio:
        keywords.update(
            speaker=settings.speaker,
            talker_max_new_tokens=settings.talker_max_new_tokens,
            talker_do_sample=settings.talker_do_sample,
            talker_temperature=settings.talker_temperature,
            talker_top_k=settings.talker_top_k,
            talker_top_p=settings.talker_top_p,
            talker_repetition_penalty=settings.talker_repetition_penalty,
        )
        if cancellation is not None:
            keywords["talker_stopping_criteria"] = keywords["thinker_stopping_criteria"]
    return keywords


def generate_from_inputs(
    model,
    processor,
    inputs: dict[str, np.ndarray],
    settings: GenerationSettings,
    on_text: Optional[TextCallback] = None,
    keep_logits: bool = False,
    started: Optional[float] = None,
    on_audio: Optional[AudioCallback] = None,
    cancellation: Optional[Cancellation] = None,
    speaking_rows: Optional[list[int]] = None,
    on_answer: Optional[AnswerCallback] = None,
    hold_speech: bool = False,
) -> list[Answer]:
    """Generate for prepared inputs (every msrun rank calls this with the same inputs and settings,
    with `on_audio` on all of them or none: streamed speech runs code2wav as the talker goes, and
    with a `cancellation` on all of them or none). With `settings.return_audio`, the rows in
    `speaking_rows` speak (None: every row), the others answer in text only, in the same thinker
    forward. With `on_text` and `on_answer`, a row that does not speak is answered as soon as the
    thinker has finished, while the talker still speaks for the others (the same `Answer` is
    returned at the end). With `hold_speech`, only the thinker runs: each speaking row's answer is its text, with
    its speech to come (`Answer.held`) from `speak_held`, which may speak rows of several generations at once.
    Raises `errors.Cancelled` once cancelled."""
    if settings.seed is not None:
        seed_everything(settings.seed)
    rows, prompt_length = inputs["input_ids"].shape
    speaking = (list(range(rows)) if speaking_rows is None else speaking_rows) if settings.return_audio else []
    held = speaking if hold_speech else []  # the rows whose speech comes later
    speaking = [] if hold_speech else speaking
    instruments = Instruments(model, processor.tokenizer, speaking, rows, on_text, on_audio, started)
    early: dict[int, Answer] = {}  # the silent rows' answers, given as the thinker finished

    def answer(row: int, text: str, waveform=None, step_logits=None, finished: Optional[float] = None) -> Answer:
        prompt_tokens = int(inputs["attention_mask"][row].sum())
        return Answer(
            text=text,
            waveform=waveform,
            token_ids=instruments.thinker.tokens[row],
            metrics=instruments.metrics(row, prompt_tokens, seconds_of(waveform), finished),
            step_logits=step_logits,
            first_token_at=instruments.thinker.first_token_at,
        )

    def answer_silent_rows() -> None:
        silent = [row for row in range(rows) if row not in speaking]
        texts = processor.batch_decode([instruments.thinker.tokens[row] for row in silent], **DECODE)
        for row, text in zip(silent, texts):
            early[row] = answer(row, text, finished=time.perf_counter())
            on_answer(row, early[row])

    # 4. generate: the thinker's tokens, then (with speech) the talker's codes and code2wav's waveform
    with instruments:
        if on_answer is not None and on_text is not None and 0 < len(speaking) < rows and not keep_logits:
            instruments.thinker.on_end = answer_silent_rows  # the streamer's end: the thinker's tokens are all in
        asked = settings if speaking or held else settings.without_speech()  # `speaking_rows` may name none
        keywords = generate_keywords(asked, model.config, instruments.text_streamer, cancellation, keep_logits)
        if 0 < len(speaking) < rows:
            keywords["speaking_rows"] = speaking
        if held:
            keywords.update(hold_speech=True, speaking_rows=held)
        result, speech = model.generate(**to_mindspore(inputs, model.dtype), **keywords)
    waveforms = [None] * rows if held else row_waveforms(speech, rows)

    # 5. decode every row's new tokens
    new_tokens = result.sequences.asnumpy()[:, prompt_length:]
    instruments.finish(new_tokens, waveforms)
    texts = processor.batch_decode(new_tokens, **DECODE)
    logits = np.stack([logit.asnumpy() for logit in result.logits], axis=1) if keep_logits else None
    answers = [
        early.get(row) or answer(row, texts[row], waveforms[row], None if logits is None else logits[row])
        for row in range(rows)
    ]
    for row, states in zip(held, speech if held else []):
        answers[row].held = DeferredSpeech(states, instruments.generating, instruments.started)
    return answers


# an answer's figures that its speech gives, when spoken after its text (`speak_held`)
SPEECH_FIGURES = (
    "talker_codec_frames",
    "talker_frames_per_second",
    "audio_seconds",
    "talker_steps",
    "first_audio_step",
)


def speak_held(
    model,
    processor,
    answers: list[Answer],
    settings: GenerationSettings,
    on_audio: Optional[AudioCallback] = None,
    cancellation: Optional[Cancellation] = None,
) -> list[Answer]:
    """The speech held by `answers` (`generate_from_inputs(..., hold_speech=True)`, from one generation or several),
    in one talker batch with `settings`' speech settings (every msrun rank calls this with the same answers, and
    `on_audio` on all of them or none): each answer with its waveform, and its figures to the speech's end.
    `on_audio(k, samples)` streams the k-th answer's speech. Raises `errors.Cancelled` once cancelled."""
    from omni_helpers.mindone_changes.mindone_fixes import generate_held_speech

    rows = len(answers)
    started = min(answer.held.started for answer in answers)
    instruments = Instruments(model, processor.tokenizer, list(range(rows)), rows, None, on_audio, started)
    keywords = generate_keywords(settings, model.config, None, cancellation)
    talker = {key: value for key, value in keywords.items() if key.startswith("talker_") or key == "speaker"}
    with instruments:
        speech = generate_held_speech(model, [answer.held.states for answer in answers], **talker)
    waveforms = [waveform.reshape(-1).float().asnumpy() for waveform in speech]
    instruments.finish(np.zeros((rows, 0), np.int64), waveforms)
    spoken = []
    for row, (answer, waveform) in enumerate(zip(answers, waveforms)):
        figures = instruments.metrics(row, 0, seconds_of(waveform))
        metrics = {**answer.metrics, **{key: figures.get(key) for key in SPEECH_FIGURES if key in figures}}
        seconds, audio = instruments.finished - answer.held.generating, metrics["audio_seconds"]
        metrics.update(
            generate_seconds=round(seconds, 3), real_time_factor=round(seconds / audio, 3) if audio else None
        )
        first_audio = instruments.speech.rows[row].first_audio_time if instruments.speech else None
        if first_audio is not None:
            metrics["time_to_first_audio_seconds"] = round(first_audio - answer.held.started, 3)
        spoken.append(dataclasses.replace(answer, waveform=waveform, metrics=metrics, held=None))
    return spoken


def row_waveforms(speech, rows: int) -> list[Optional[np.ndarray]]:
    """Each row's waveform: mindone's `generate` returns one (1, 1, samples) tensor for a single row, and one per
    row (each its own length) for a batch (`mindone_changes.batched_speech`); None for a row without speech."""
    if speech is None:
        return [None] * rows
    speech = [speech] if rows == 1 else list(speech)
    return [None if waveform is None else waveform.reshape(-1).float().asnumpy() for waveform in speech]


def seconds_of(waveform: Optional[np.ndarray]) -> float:
    return 0.0 if waveform is None else len(waveform) / SPEECH_SAMPLE_RATE


def generate_answers(
    model,
    processor,
    conversations: list[Conversation],
    settings: GenerationSettings,
    on_text: Optional[TextCallback] = None,
    keep_logits: bool = False,
    on_audio: Optional[AudioCallback] = None,
) -> list[Answer]:
    """The whole flow for a batch of conversations: one `Answer` per conversation, in order."""
    started = time.perf_counter()
    inputs = prepare_inputs(processor, conversations, settings)
    check_context(settings, Context.of(model.config.to_dict()), prompt_tokens=inputs["input_ids"].shape[1])
    return generate_from_inputs(model, processor, inputs, settings, on_text, keep_logits, started, on_audio)
