"""Speech sampled as the released model samples it (omni_helpers/mindone_changes/speech_sampling.py): the
distributions against transformers' own logits processors, the draws against the distributions, and whole
sampled answers (the same seed, the same speech; compiled steps as PyNative ones)."""

from __future__ import annotations

import numpy as np
import pytest

from omni_helpers.request.settings import GenerationSettings
from tests.reference import batch_inputs, flatter_code_predictor, request_conversation

TALKER_FRAMES = 6


def random_logits(rows: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Logits of different spreads, one row sharply peaked, as a trained head gives."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * np.linspace(1.0, 6.0, rows)[:, None]
    logits[0, rng.integers(vocab)] += 25.0
    return logits


def test_the_code_predictors_distribution_is_transformers_top_k_50_top_p_0_8(runtime_cpu):
    import mindspore as ms
    import torch
    from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

    from omni_helpers.mindone_changes.speech_sampling import (
        CODE_PREDICTOR_TOP_K,
        CODE_PREDICTOR_TOP_P,
        filtered_probabilities,
    )

    logits = random_logits(6, 2048)  # the released code predictor's vocabulary
    ours = filtered_probabilities(ms.Tensor(logits), CODE_PREDICTOR_TOP_K, CODE_PREDICTOR_TOP_P).asnumpy()
    warpers = LogitsProcessorList([TopKLogitsWarper(50), TopPLogitsWarper(0.8)])  # transformers' talker passes these
    theirs = warpers(None, torch.from_numpy(logits)).softmax(-1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-6
    assert ((ours > 0) == (theirs > 0)).all() and (ours > 0).sum(1).max() <= 50 and (ours > 0).sum(1).min() >= 1


def test_the_draws_follow_the_distribution(runtime_cpu):
    """20,000 draws from seeded uniforms, by `draw` (what both the PyNative and the compiled steps call): their
    frequencies fit the filtered distribution (chi-square), and no code outside it is ever drawn."""
    import mindspore as ms
    from scipy.stats import chisquare

    from omni_helpers.mindone_changes.speech_sampling import draw, filtered_probabilities

    draws = 20_000
    logits = np.random.default_rng(1).normal(size=(1, 2048)).astype(np.float32)  # some 40 codes kept
    probabilities = filtered_probabilities(ms.Tensor(logits), 50, 0.8).asnumpy()[0]
    uniforms = np.random.default_rng(5).random(draws).astype(np.float32)
    codes = draw(ms.Tensor(np.tile(probabilities, (draws, 1))), ms.Tensor(uniforms)).asnumpy()
    counts = np.bincount(codes, minlength=probabilities.size)
    kept = probabilities > 0
    assert counts[~kept].sum() == 0 and kept.sum() > 20
    expected = probabilities[kept].astype(np.float64) / probabilities[kept].astype(np.float64).sum() * draws
    assert chisquare(counts[kept], expected).pvalue > 1e-3


def test_the_talkers_processors_are_transformers_with_the_settings_asked_for(mindone, tiny_checkpoint, sample_media):
    """The logits processors the generation loop runs for the talker (captured from a sampled answer, with
    settings other than the defaults, so that each is seen to arrive) against transformers' own, on the same
    logits and the same codes spoken so far: the probabilities they leave within 1e-6."""
    import mindspore as ms
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from omni_helpers.generation.core import generate_from_inputs
    from omni_helpers.mindone_changes.faster import decode_loop

    captured, run_loop = {}, decode_loop.sample

    def capturing(model, input_ids, logits_processor, *args, **kwargs):
        captured[type(model).__name__] = logits_processor
        return run_loop(model, input_ids, logits_processor, *args, **kwargs)

    settings = GenerationSettings(
        max_new_tokens=4,
        return_audio=True,
        talker_max_new_tokens=3,
        talker_do_sample=True,
        talker_temperature=0.7,
        talker_top_k=40,
        talker_top_p=0.9,
        talker_repetition_penalty=1.3,
        seed=0,
    )
    inputs = batch_inputs(tiny_checkpoint, [request_conversation("text", sample_media)], False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_loop, "sample", capturing)
        generate_from_inputs(mindone.model, mindone.processor, inputs, settings)
    processors = captured["Qwen3OmniMoeTalkerForConditionalGeneration"]

    talker = mindone.model.config.talker_config
    vocab = talker.text_config.vocab_size
    suppressed = [code for code in range(vocab - 1024, vocab) if code != talker.codec_eos_token_id]
    logits = random_logits(2, vocab, seed=2)
    spoken = np.random.default_rng(3).integers(0, vocab - 1024, size=(2, 7))
    ours = processors(ms.Tensor(spoken), ms.Tensor(logits))
    ours = ms.ops.softmax(ours.astype(ms.float32), -1).asnumpy()
    transformers_processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            SuppressTokensLogitsProcessor(suppressed),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(40),
            TopPLogitsWarper(0.9),
        ]
    )
    theirs = transformers_processors(torch.from_numpy(spoken), torch.from_numpy(logits)).softmax(-1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-6
    assert ((ours > 0) == (theirs > 0)).all()


def sampled_speech(mindone, inputs, seed: int, compiled: bool = True, sample: bool = True):
    """One answer's codes (groups, frames) and waveform, sampled as released (or greedy)."""
    from omni_helpers.generation.core import generate_from_inputs
    from omni_helpers.mindone_changes.faster import decode_graph

    settings = GenerationSettings(
        max_new_tokens=6, return_audio=True, talker_max_new_tokens=TALKER_FRAMES, talker_do_sample=sample, seed=seed
    )
    with pytest.MonkeyPatch.context() as patch:
        if not compiled:
            patch.setattr(decode_graph, "applies", lambda *args: False)
        mindone.codes_seen.clear()
        answer = generate_from_inputs(mindone.model, mindone.processor, inputs, settings)[0]
    return mindone.codes_seen[-1], answer.waveform


def test_sampled_speech_is_the_same_for_a_seed_compiled_or_not_and_samples_every_code(
    mindone, tiny_checkpoint, sample_media
):
    """The same seed gives the same codes and waveform twice, and the compiled talker step (code predictor
    inside) the PyNative step's; another seed other codes; the residual codes are sampled, not greedy."""
    inputs = batch_inputs(tiny_checkpoint, [request_conversation("image_audio", sample_media)], False)
    with flatter_code_predictor(mindone.model):
        codes, wav = sampled_speech(mindone, inputs, seed=11)
        again_codes, again_wav = sampled_speech(mindone, inputs, seed=11)
        pynative_codes, pynative_wav = sampled_speech(mindone, inputs, seed=11, compiled=False)
        other_codes, _ = sampled_speech(mindone, inputs, seed=12)
        greedy_codes, _ = sampled_speech(mindone, inputs, seed=11, sample=False)
    assert codes.shape == (mindone.model.config.talker_config.num_code_groups, TALKER_FRAMES - 1)
    assert np.array_equal(codes, again_codes) and np.array_equal(wav, again_wav)
    assert np.array_equal(codes, pynative_codes) and np.abs(wav - pynative_wav).max() <= 1e-5
    assert not np.array_equal(codes, other_codes)
    assert (codes[1:] != greedy_codes[1:]).mean() > 0.5  # the residual codes are drawn


def test_the_code_predictor_samples_only_while_the_talker_does(mindone):
    """One frame's residual codes from the same talker state: greedy (and the same for any seed) unless the
    talker samples; then drawn, so that two seeds give other codes, and the same seed the same."""
    import mindspore as ms

    from omni_helpers.mindone_changes.faster.decode_steps import predict_residual_codes
    from omni_helpers.mindone_changes.speech_sampling import code_predictor_sampling

    predictor = mindone.model.talker.code_predictor
    hidden = predictor.config.hidden_size
    embeds = ms.Tensor(np.random.default_rng(4).normal(size=(2, 2, hidden)).astype(np.float32))

    def codes(seed: int, sampling: bool) -> np.ndarray:
        ms.set_seed(seed)
        with code_predictor_sampling(mindone.model, sampling):
            return predict_residual_codes(predictor, embeds)[0].asnumpy()

    with flatter_code_predictor(mindone.model):
        greedy = codes(1, False)
        assert np.array_equal(greedy, codes(2, False))
        first, second = codes(1, True), codes(2, True)
        assert np.array_equal(first, codes(1, True))
    assert (first != second).mean() > 0.5 and (first != greedy).mean() > 0.5
