"""Chat Completions bodies to conversations and settings (omni_helpers/serving/openai_api.py), without a server:
each bad part is refused by its own check, with its own parameter."""

from __future__ import annotations

import pytest

from omni_helpers.request.errors import RequestError
from omni_helpers.request.settings import GenerationSettings
from omni_helpers.serving.openai_api import parse_chat_request

DEFAULTS = GenerationSettings(max_new_tokens=64, talker_max_new_tokens=100)


def parse(content, tmp_path, **fields):
    return parse_chat_request({"messages": [{"role": "user", "content": content}], **fields}, DEFAULTS, tmp_path, None)


def test_a_part_of_an_unknown_type_beside_text_is_refused_by_name(tmp_path):
    with pytest.raises(RequestError) as refused:
        parse([{"type": "text", "text": "What is in this file?"}, {"type": "file", "file": {}}], tmp_path)
    assert refused.value.param == "messages[0].content[1].type"
    assert (
        str(refused.value) == "content part type 'file' is not supported; use text, image_url, input_audio or video_url"
    )


def test_media_come_before_text_whatever_order_the_parts_have(tmp_path):
    chat = parse(
        [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}],
        tmp_path,
    )
    assert [item["type"] for item in chat.conversation[0]["content"]] == ["image", "text"]


def test_speech_settings_come_from_the_request_or_the_servers_defaults(tmp_path):
    chat = parse("hi", tmp_path, modalities=["text", "audio"], audio={"voice": "Chelsie"}, talker_max_new_tokens=7)
    assert (chat.settings.return_audio, chat.settings.speaker, chat.settings.talker_max_new_tokens) == (
        True,
        "Chelsie",
        7,
    )
    plain = parse("hi", tmp_path, max_tokens=5)
    assert (plain.settings.return_audio, plain.settings.max_new_tokens, plain.settings.talker_max_new_tokens) == (
        False,
        5,
        100,
    )
    with pytest.raises(RequestError, match="talker_max_new_tokens must be int"):
        parse("hi", tmp_path, talker_max_new_tokens="long")


def test_speech_sampling_comes_from_the_request_or_the_servers_defaults_and_bad_values_are_named(tmp_path):
    from omni_helpers.serving.openai_api import API_NAMES

    speech = {"modalities": ["text", "audio"]}
    chat = parse("hi", tmp_path, **speech, talker_do_sample=True, talker_top_k=20, talker_repetition_penalty=1.2)
    released = (True, 0.9, 20, 1.0, 1.2)  # what the request did not name is the server's (transformers' values)
    assert (
        chat.settings.talker_do_sample,
        chat.settings.talker_temperature,
        chat.settings.talker_top_k,
        chat.settings.talker_top_p,
        chat.settings.talker_repetition_penalty,
    ) == released
    assert parse("hi", tmp_path, **speech).settings.talker_do_sample is False  # the server's default: greedy
    with pytest.raises(RequestError) as refused:
        parse("hi", tmp_path, **speech, talker_do_sample=True, talker_top_p=1.5).settings.check(API_NAMES)
    assert (str(refused.value), refused.value.param) == ("talker_top_p 1.5: must be in (0, 1]", "talker_top_p")
    with pytest.raises(RequestError, match="talker_do_sample must be bool"):
        parse("hi", tmp_path, **speech, talker_do_sample="yes")
