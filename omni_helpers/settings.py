"""What to generate and how: one typed object that every entry point builds once.

The scripts build it from their flags (`cli.generation_settings`), the server from its
defaults and each request's own fields; the core (`core.generate_answers`) is the only
place that turns it into mindone's `generate` keywords.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .errors import RequestError

DEFAULT_SPEAKER = "Ethan"


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
    talker_do_sample: bool = False
    # inputs
    use_audio_in_video: bool = True
    # reseed every rank before this request (None: keep the random stream where it is)
    seed: Optional[int] = None

    def replace(self, **changes) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Raise RequestError for values no checkpoint could accept."""
        if self.max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens {self.max_new_tokens}: must be positive", "max_new_tokens")
        if self.return_audio and self.talker_max_new_tokens <= 0:
            raise RequestError(
                f"talker_max_new_tokens {self.talker_max_new_tokens}: must be positive", "talker_max_new_tokens"
            )
        if self.do_sample:
            if self.temperature <= 0:
                raise RequestError(f"temperature {self.temperature}: must be positive when sampling", "temperature")
            if not 0 < self.top_p <= 1:
                raise RequestError(f"top_p {self.top_p}: must be in (0, 1]", "top_p")
            if self.top_k <= 0:
                raise RequestError(f"top_k {self.top_k}: must be positive", "top_k")
