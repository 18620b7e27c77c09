"""Run the same request through mindone (MindSpore CPU) and transformers (PyTorch CPU).

Both models load the same tiny checkpoint in float32 with eager attention and take the
same processor outputs (the project's core prepares them), so any difference comes from
the model code. mindone runs through the core's generation call, as the scripts do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from omni_helpers.request.settings import GenerationSettings


def request_conversation(kind: str, media: dict[str, Path]) -> list[dict]:
    """The requests of the parity tests: text only, image + audio + text, a video (heard with its
    soundtrack or not, as the caller's use_audio_in_video says: "silent_video" is the same clip)."""
    question = {"type": "text", "text": "What can you see and hear? Answer in one short sentence."}
    content = {
        "text": [question],
        "image_audio": [
            {"type": "image", "image": str(media["image"])},
            {"type": "audio", "audio": str(media["audio"])},
            question,
        ],
        # Small frames keep the video's token count (and the test) small.
        "video": [
            {"type": "video", "video": str(media["video"]), "min_pixels": 64 * 64, "max_pixels": 64 * 64},
            question,
        ],
    }[kind.replace("silent_", "")]
    return [{"role": "user", "content": content}]


def processor_inputs(
    checkpoint: Path, conversation: list[dict], use_audio_in_video: bool, **processor_kwargs
) -> dict[str, np.ndarray]:
    """Template, media and mindone's processor, through the core as the scripts do, with numpy outputs."""
    return batch_inputs(checkpoint, [conversation], use_audio_in_video, **processor_kwargs)


def batch_inputs(checkpoint: Path, conversations: list[list[dict]], use_audio_in_video: bool, **processor_kwargs):
    """Several conversations in one left-padded batch."""
    from omni_helpers.generation.core import prepare_inputs
    from omni_helpers.loading import load_processor

    processor = load_processor(checkpoint, **processor_kwargs)
    return prepare_inputs(processor, conversations, GenerationSettings(use_audio_in_video=use_audio_in_video))


def record_codes(code2wav, to_numpy) -> list[np.ndarray]:
    """Keep a copy of the codec codes (groups, frames) of each row each time code2wav decodes speech (a batch's
    rows are padded to its longest)."""
    seen: list[np.ndarray] = []
    decode = code2wav.chunked_decode

    def recording_decode(codes, *args, **kwargs):
        seen.extend(to_numpy(codes).copy())
        return decode(codes, *args, **kwargs)

    code2wav.chunked_decode = recording_decode
    return seen


def greedy_settings(
    config, use_audio_in_video: bool, new_tokens: int, return_audio: bool, talker_new_tokens: int
) -> dict:
    """The same greedy `generate` keywords for both implementations, with the thinker's logits kept."""
    return {
        "use_audio_in_video": use_audio_in_video,
        "return_audio": return_audio,
        "thinker_max_new_tokens": new_tokens,
        "thinker_eos_token_id": config.im_end_token_id,
        "thinker_return_dict_in_generate": True,
        "thinker_output_logits": True,
        "thinker_do_sample": False,
        "talker_do_sample": False,
        "talker_max_new_tokens": talker_new_tokens,
    }


@dataclass
class Generation:
    tokens: np.ndarray  # new thinker token ids, (new,)
    step_logits: np.ndarray  # thinker logits of every greedy step, (new, vocab)
    codes: np.ndarray | None = None  # talker codec codes, (groups, frames)
    wav: np.ndarray | None = None  # float waveform, 24 kHz
    extra: dict[str, Any] = field(default_factory=dict)


class Reference:
    """transformers' Qwen3-Omni on PyTorch, with its code predictor made greedy.

    In transformers the code predictor always samples (do_sample=True is hard-coded in the
    talker's forward); here it samples only with the talker (`--talker_do_sample`), so codes are
    compared greedy.

    With `audio_windows`, the audio encoder attends within its windows (`n_window_infer` mel
    frames) in eager mode too, as transformers' own flash path does: its eager path builds
    the block-diagonal mask (`_prepare_attention_mask`) but never passes it to the layers.
    """

    def __init__(self, checkpoint: Path, audio_windows: bool = False):
        import torch
        from transformers import Qwen3OmniMoeForConditionalGeneration

        torch.manual_seed(0)
        self.model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        if audio_windows:
            audio_tower = self.model.thinker.audio_tower

            def pass_the_window_mask(layer, args, kwargs):
                hidden_states, cu_seqlens = args[0], args[1]
                return args, {
                    **kwargs,
                    "attention_mask": audio_tower._prepare_attention_mask(hidden_states, cu_seqlens),
                }

            for layer in audio_tower.layers:
                layer.register_forward_pre_hook(pass_the_window_mask, with_kwargs=True)
        self.codes_seen: list[np.ndarray] = []
        if not self.model.has_talker:  # Thinking and Captioner
            return
        predictor = self.model.talker.code_predictor
        sampling_generate = predictor.generate

        def greedy_generate(*args, **kwargs):
            kwargs.update(do_sample=False, top_k=None, top_p=None)
            return sampling_generate(*args, **kwargs)

        predictor.generate = greedy_generate
        self.codes_seen = record_codes(self.model.code2wav, lambda codes: codes.numpy())

    def _torch_inputs(self, inputs):
        import torch

        out = {}
        for key, value in inputs.items():
            tensor = torch.from_numpy(np.asarray(value))
            out[key] = tensor.float() if tensor.is_floating_point() else tensor.long()
        return out

    def prefill_logits(self, inputs, use_audio_in_video: bool) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model.thinker(**self._torch_inputs(inputs), use_audio_in_video=use_audio_in_video)
        return out.logits[0].float().numpy()

    def generate(
        self, inputs, use_audio_in_video: bool, new_tokens: int, return_audio: bool, talker_new_tokens: int = 8
    ):
        import torch

        self.codes_seen.clear()
        settings = greedy_settings(self.model.config, use_audio_in_video, new_tokens, return_audio, talker_new_tokens)
        with torch.no_grad():
            result, wav = self.model.generate(**self._torch_inputs(inputs), **settings)
        prompt = inputs["input_ids"].shape[1]
        return Generation(
            tokens=result.sequences[0, prompt:].numpy(),
            step_logits=torch.cat(result.logits, dim=0).float().numpy(),
            codes=self.codes_seen[-1] if return_audio else None,
            wav=None if wav is None else wav.reshape(-1).float().numpy(),
        )


class MindOne:
    """mindone's Qwen3-Omni on MindSpore CPU, set up and called as the scripts do."""

    def __init__(self, checkpoint: Path, attn_implementation: str = "eager", stack_experts: bool = True):
        import mindspore as ms

        from omni_helpers.loading import load_model, load_processor, shard_model
        from omni_helpers.mindone_changes.patches import install_patches
        from omni_helpers.runtime import setup_runtime

        runtime = setup_runtime("CPU", seed=0)
        install_patches("CPU")
        self.ms = ms
        model = load_model(checkpoint, "float32", attn_implementation, with_talker=True)
        self.model = shard_model(
            model, runtime, stack=stack_experts
        )  # one process: the experts stacked, as the scripts run
        self.processor = load_processor(checkpoint)
        self.codes_seen = (
            record_codes(self.model.code2wav, lambda codes: codes.asnumpy()) if self.model.has_talker else []
        )

    def prefill_logits(self, inputs, use_audio_in_video: bool) -> np.ndarray:
        from omni_helpers.generation.inputs import to_mindspore

        out = self.model.thinker(**to_mindspore(inputs, self.ms.float32), use_audio_in_video=use_audio_in_video)
        return out.logits[0].asnumpy()

    def generate(
        self,
        inputs,
        use_audio_in_video: bool,
        new_tokens: int,
        return_audio: bool,
        talker_new_tokens: int = 8,
        sampling_seed: Optional[int] = None,
    ):
        """Greedy, or with `sampling_seed` both stages sample (the thinker with the recommended settings)."""
        from omni_helpers.generation.core import generate_from_inputs

        self.codes_seen.clear()
        sampling = {} if sampling_seed is None else {"do_sample": True, "talker_do_sample": True, "seed": sampling_seed}
        settings = GenerationSettings(
            max_new_tokens=new_tokens,
            return_audio=return_audio,
            talker_max_new_tokens=talker_new_tokens,
            use_audio_in_video=use_audio_in_video,
            **sampling,
        )
        answer = generate_from_inputs(self.model, self.processor, inputs, settings, keep_logits=True)[0]
        return Generation(
            tokens=np.array(answer.token_ids),
            step_logits=answer.step_logits,
            codes=self.codes_seen[-1] if return_audio else None,
            wav=answer.waveform,
        )


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference, relative to the largest reference magnitude."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def top2_margins(step_logits: np.ndarray) -> np.ndarray:
    """Gap between the best and second-best logit at every greedy step."""
    top2 = np.sort(step_logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def thinker_generate(
    mindone, inputs, new_tokens: int, monkeypatch, pynative=None, use_audio_in_video=False, **settings
):
    """The thinker's generate, returning every step's logits and hidden states; with `pynative` (a module
    of the project's compiled paths, `decode_graph` or `prompt_graph`) that path turned off."""
    import mindspore as ms

    from omni_helpers.generation.inputs import to_mindspore

    with monkeypatch.context() as patch:
        if pynative is not None:
            patch.setattr(pynative, "applies", lambda *args: False)
        return mindone.model.thinker.generate(
            **to_mindspore(inputs, ms.float32),
            max_new_tokens=new_tokens,
            return_dict_in_generate=True,
            output_hidden_states=True,
            output_logits=True,
            use_audio_in_video=use_audio_in_video,
            **settings,
        )


def unbuildable(kernel: str):
    """A graph-step builder whose step fails at its first call, as on a device without `kernel`."""

    def build(*args):
        def step(*inputs):
            raise RuntimeError(f"The kernel {kernel} unregistered")

        return step

    return build


def falls_back_once(run, owner, kind: str, capfd, kernel: str, what: str, instead: str) -> tuple:
    """Two calls of `run()` after the `kind` graph of `owner` failed to build (`unbuildable(kernel)`): the
    reason is kept on `owner` and said once on stderr, as "the compiled {what} did not build (...); {instead}".
    Returns both calls' results; the reason is cleared afterwards."""
    capfd.readouterr()
    try:
        results = (run(), run())
        reason = owner.__dict__.get(f"_{kind}_error")
    finally:
        owner.__dict__.pop(f"_{kind}_error", None)
    warnings = [line for line in capfd.readouterr().err.splitlines() if f"compiled {what} did not build" in line]
    assert len(warnings) == 1, warnings  # once: the second call does not try again
    assert warnings[0].startswith(f"warning: the compiled {what} did not build (RuntimeError: ")
    assert f"The kernel {kernel} unregistered" in warnings[0] and warnings[0].endswith(instead)
    assert reason.startswith("RuntimeError: ") and kernel in reason
    return results


def generate_both_ways(mindone, inputs, monkeypatch, path, **settings) -> tuple:
    """`mindone.generate(inputs, False, 4, return_audio=True, ...)` with a compiled path (`path`, a module of
    the project with an `applies`) in place, then with it turned off: (compiled, PyNative)."""
    runs = []
    for compiled in (True, False):
        with monkeypatch.context() as patch:
            if not compiled:
                patch.setattr(path, "applies", lambda *args: False)
            runs.append(mindone.generate(inputs, False, 4, return_audio=True, **settings))
    return tuple(runs)


@contextlib.contextmanager
def flatter_code_predictor(model, factor: float = 0.05):
    """The tiny code predictor's heads scaled down while in use: random weights make its logits so peaked
    (one code holds more than top-p 0.8) that sampling it would choose the greedy codes; scaled, top-k 50 and
    top-p 0.8 leave dozens of codes to draw from. Each rank scales its own part (ZeRO-3 shards alike)."""
    from mindspore import ops

    heads = [head.weight for head in model.talker.code_predictor.lm_head]
    kept = [head.value().copy() for head in heads]
    for head, weight in zip(heads, kept):
        ops.assign(head, weight * factor)
    try:
        yield
    finally:
        for head, weight in zip(heads, kept):
            ops.assign(head, weight)
