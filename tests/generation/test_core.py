"""The generation core (omni_helpers/generation/core.py): a request that would outgrow the model's context is refused once
its prompt is counted, before anything is allocated for it."""

from __future__ import annotations

import pytest

from omni_helpers.request.errors import RequestError
from omni_helpers.request.settings import GenerationSettings

CONTEXT = 32768  # the tiny checkpoint's max_position_embeddings, thinker and talker


def test_a_prompt_and_its_new_tokens_must_fit_the_thinkers_context(mindone):
    from omni_helpers.generation.core import generate_answers, prepare_inputs

    conversation = [{"role": "user", "content": "hi"}]
    prompt = prepare_inputs(mindone.processor, [conversation], GenerationSettings())["input_ids"].shape[1]
    with pytest.raises(RequestError) as refused:
        generate_answers(
            mindone.model, mindone.processor, [conversation], GenerationSettings(max_new_tokens=CONTEXT - prompt + 1)
        )
    assert str(refused.value) == (
        f"--max_new_tokens {CONTEXT - prompt + 1}: the thinker's context holds {CONTEXT} positions "
        f"(max_position_embeddings) and this prompt takes {prompt}; ask for at most {CONTEXT - prompt}"
    )


def test_a_prompt_longer_than_the_context_is_refused(mindone):
    from omni_helpers.generation.core import generate_answers

    conversation = [{"role": "user", "content": "rain " * CONTEXT}]
    with pytest.raises(
        RequestError, match=f"the prompt is [0-9]+ tokens, more than the thinker's context of {CONTEXT}"
    ):
        generate_answers(mindone.model, mindone.processor, [conversation], GenerationSettings(max_new_tokens=8))


def test_speech_must_fit_the_talkers_context(mindone):
    from omni_helpers.generation.core import generate_answers

    settings = GenerationSettings(max_new_tokens=8, return_audio=True, talker_max_new_tokens=CONTEXT - 20)
    with pytest.raises(
        RequestError, match=f"--talker_max_new_tokens {CONTEXT - 20}: the talker's context holds {CONTEXT}"
    ):
        generate_answers(mindone.model, mindone.processor, [[{"role": "user", "content": "hi"}]], settings)
