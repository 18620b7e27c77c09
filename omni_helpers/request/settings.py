"""What to generate and how: one typed object that every entry point builds once.

The scripts build it from their flags (`cli.generation_settings`), the server from its
defaults and each request's own fields; the core (`core.generate_answers`) is the only
place that turns it into mindone's `generate` keywords.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from omni_helpers.request.errors import RequestError

DEFAULT_SPEAKER = "Ethan"
# How each setting is spelled where the user gave it, so that an error names what they typed.
FLAG_NAMES = {
    "max_new_tokens": "--max_new_tokens",
    "talker_max_new_tokens": "--talker_max_new_tokens",
    "temperature": "--temperature",
    "top_p": "--top_p",
    "top_k": "--top_k",
    "talker_temperature": "--talker_temperature",
    "talker_top_k": "--talker_top_k",
    "talker_top_p": "--talker_top_p",
    "talker_repetition_penalty": "--talker_repetition_penalty",
    "speaker": "--speaker",
    "return_audio": "--return_audio",
    "batch_size": "--batch_size",
}


@dataclass(frozen=True)
class GenerationSettings:
    # the thinker (text)
    max_new_tokens: int = 1024
    do_sample: bool = False  # greedy unless asked: how Instruct is evaluated
    temperature: float = 0.6  # the recommended sampling values, used only with do_sample
    top_p: float = 0.95
    top_k: int = 20
    # the talker (speech)
    return_audio: bool = False
    speaker: str = DEFAULT_SPEAKER
    talker_max_new_tokens: int = 4096
    talker_do_sample: bool = False  # greedy unless asked: the path verified against the reference (README)
    talker_temperature: float = 0.9  # the released sampling of speech (transformers' defaults), with
    talker_top_k: int = 50  # talker_do_sample; the code predictor then samples too (top-k 50, top-p 0.8)
    talker_top_p: float = 1.0
    talker_repetition_penalty: float = 1.05  # over the codes spoken so far, greedy or not
    # inputs
    use_audio_in_video: bool = True
    # reseed every rank before this request (None: keep the random stream where it is)
    seed: Optional[int] = None

    def replace(self, **changes) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def without_speech(self) -> "GenerationSettings":
        """What the thinker runs with: these settings with the talker's left at their defaults, no speech asked."""
        defaults = GenerationSettings()
        return self.replace(**{name: getattr(defaults, name) for name in SPEECH_SETTINGS})

    def check(self, names: dict[str, str] = FLAG_NAMES) -> None:
        """Raise RequestError for values no checkpoint could accept (`names`: how the user spelled each)."""

        def bad(setting: str, value, problem: str):
            raise RequestError(f"{names[setting]} {value}: {problem}", names[setting].lstrip("-"))

        if self.max_new_tokens <= 0:
            bad("max_new_tokens", self.max_new_tokens, "must be positive")
        if self.return_audio and self.talker_max_new_tokens <= 0:
            bad("talker_max_new_tokens", self.talker_max_new_tokens, "must be positive")
        if self.do_sample:
            if self.temperature <= 0:
                bad("temperature", self.temperature, "must be positive when sampling")
            if not 0 < self.top_p <= 1:
                bad("top_p", self.top_p, "must be in (0, 1]")
            if self.top_k <= 0:
                bad("top_k", self.top_k, "must be positive")
        if self.return_audio:
            if self.talker_repetition_penalty <= 0:
                bad("talker_repetition_penalty", self.talker_repetition_penalty, "must be positive (1.0: none)")
            if self.talker_do_sample:
                if self.talker_temperature <= 0:
                    bad("talker_temperature", self.talker_temperature, "must be positive when sampling")
                if not 0 < self.talker_top_p <= 1:
                    bad("talker_top_p", self.talker_top_p, "must be in (0, 1]")
                if self.talker_top_k <= 0:
                    bad("talker_top_k", self.talker_top_k, "must be positive")


SPEECH_SETTINGS = (  # the talker's: a row without speech ignores them
    "return_audio",
    "speaker",
    "talker_max_new_tokens",
    "talker_do_sample",
    "talker_temperature",
    "talker_top_k",
    "talker_top_p",
    "talker_repetition_penalty",
)
