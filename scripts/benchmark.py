"""Measure the cost of each generated token, stock mindone against this project's faster path
and against the transformers (PyTorch) reference, in one process and one run.

    python scripts/benchmark.py --model_name tiny_ckpt --device_target CPU \
        --prompt_tokens 64 256 --new_tokens 16 --repeats 3 --variant all --json bench.json

Workloads (fixed seed, greedy): text only at each --prompt_tokens length, and image +
audio + question with speech output. For each variant it reports medians over the
repeats: thinker prefill seconds, thinker decode tokens/s, talker frames/s. With
`--variant all` it also prints the ratios optimized/stock and optimized/reference
measured in this run. On Ascend with a real checkpoint the reference is skipped.
Figures are printed, never asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni_helpers.metrics import count_forwards  # noqa: E402

FILLER = " the sound of a short sentence and the image"


def text_conversation(tokenizer, prompt_tokens: int) -> list[dict]:
    """A user turn whose rendered prompt is about `prompt_tokens` tokens long."""
    words, text = FILLER.split(), "Describe"
    while len(tokenizer(text).input_ids) + 8 < prompt_tokens:
        text += " " + words[len(text) % len(words)]
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def media_conversation(media: dict[str, Path]) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(media["image"])},
                {"type": "audio", "audio": str(media["audio"])},
                {"type": "text", "text": "What can you see and hear?"},
            ],
        }
    ]


def mindspore_run(model, inputs, new_tokens: int, return_audio: bool, talker_frames: int) -> dict:
    import mindspore as ms

    from omni_helpers.generation import progress_to_stderr
    from omni_helpers.inputs import to_mindspore

    ms_inputs = to_mindspore(inputs, ms.float32 if model.dtype == ms.float32 else model.dtype)
    with count_forwards(model.thinker) as thinker, count_forwards(getattr(model, "talker", None)) as talker:
        with progress_to_stderr():
            model.generate(
                **ms_inputs,
                return_audio=return_audio,
                thinker_max_new_tokens=new_tokens,
                thinker_eos_token_id=model.config.im_end_token_id,
                thinker_return_dict_in_generate=True,
                talker_do_sample=False,
                talker_max_new_tokens=talker_frames,
            )
    return summarize(thinker, talker)


def reference_run(model, inputs, new_tokens: int, return_audio: bool, talker_frames: int) -> dict:
    import torch

    torch_inputs = {}
    for key, value in inputs.items():
        tensor = torch.from_numpy(value)
        torch_inputs[key] = tensor.float() if tensor.is_floating_point() else tensor.long()
    with count_forwards_torch(model.thinker) as thinker, count_forwards_torch(model.talker) as talker:
        with torch.no_grad():
            model.generate(
                **torch_inputs,
                return_audio=return_audio,
                thinker_max_new_tokens=new_tokens,
                thinker_eos_token_id=model.config.im_end_token_id,
                thinker_return_dict_in_generate=True,
                thinker_do_sample=False,
                talker_do_sample=False,
                talker_max_new_tokens=talker_frames,
            )
    return summarize(thinker, talker)


class count_forwards_torch:
    """`count_forwards` for a torch module, through a forward pre/post hook pair."""

    def __init__(self, module):
        from omni_helpers.metrics import ForwardTimes

        self.module, self.times, self.handles, self.start = module, ForwardTimes(), [], 0.0

    def __enter__(self):
        def before(*_):
            self.start = time.perf_counter()

        def after(*_):
            self.times.record(time.perf_counter() - self.start)

        self.handles = [self.module.register_forward_pre_hook(before), self.module.register_forward_hook(after)]
        return self.times

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def summarize(thinker, talker) -> dict:
    talker_seconds = talker.prefill_seconds + talker.decode_seconds
    return {
        "prefill_seconds": thinker.prefill_seconds,
        "decode_tokens_per_second": thinker.decode_steps / thinker.decode_seconds if thinker.decode_seconds else None,
        "talker_frames_per_second": len(talker.calls) / talker_seconds if talker_seconds else None,
    }


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--device_target", choices=["Ascend", "CPU"], default="CPU")
    parser.add_argument("--prompt_tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--talker_frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["stock", "optimized", "reference", "all"], default="all")
    parser.add_argument("--media_dir", default=None, help="sample media (built in a temporary folder if not given)")
    parser.add_argument("--json", required=True, help="where to write the figures")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import mindspore as ms
    from mindone.transformers import Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeProcessor

    from omni_helpers.fast_paths import FAST_PATHS
    from omni_helpers.runtime import setup_runtime
    from scripts.make_sample_media import build_media
    from tests.reference import processor_inputs

    setup_runtime(args.device_target, seed=0)
    variants = ["stock", "optimized", "reference"] if args.variant == "all" else [args.variant]
    if args.device_target != "CPU" and "reference" in variants:
        variants.remove("reference")  # the PyTorch reference runs on CPU only here
    media_dir = Path(args.media_dir) if args.media_dir else Path(tempfile.mkdtemp())
    if not (media_dir / "audio.wav").exists():
        build_media(media_dir)
    media = {name: media_dir / f"{name}.{ext}" for name, ext in (("image", "png"), ("audio", "wav"))}

    processor = Qwen3OmniMoeProcessor.from_pretrained(args.model_name)
    workloads = {f"text_{n}": (text_conversation(processor.tokenizer, n), False) for n in args.prompt_tokens}
    workloads["image_audio_speech"] = (media_conversation(media), True)
    prepared = {name: (processor_inputs(args.model_name, conv, False), speech) for name, (conv, speech) in workloads.items()}

    dtype = ms.float32 if args.device_target == "CPU" else ms.bfloat16
    attention = "eager" if args.device_target == "CPU" else "flash_attention_2"
    ms_model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(args.model_name, dtype=dtype, attn_implementation=attention)
    torch_model = None
    if "reference" in variants:
        import torch
        from transformers import Qwen3OmniMoeForConditionalGeneration as TorchModel

        torch_model = TorchModel.from_pretrained(args.model_name, dtype=torch.float32, attn_implementation="eager").eval()

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "device_target": args.device_target,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "workloads": {},
    }
    for name, (inputs, speech) in prepared.items():
        row = {"prompt_tokens": int(inputs["input_ids"].shape[1])}
        for variant in variants:
            if variant == "stock":
                FAST_PATHS.uninstall()
            elif variant == "optimized":
                FAST_PATHS.install()
            runs = []
            for _ in range(args.repeats):
                if variant == "reference":
                    runs.append(reference_run(torch_model, inputs, args.new_tokens, speech, args.talker_frames))
                else:
                    runs.append(mindspore_run(ms_model, inputs, args.new_tokens, speech, args.talker_frames))
            row[variant] = {key: median([r[key] for r in runs]) for key in runs[0]}
            print(f"{name:>20} {variant:>9}: {row[variant]}", flush=True)
        if "stock" in row and "optimized" in row:
            row["optimized_over_stock"] = ratio(row["optimized"], row["stock"])
        if "reference" in row and "optimized" in row:
            row["optimized_over_reference"] = ratio(row["optimized"], row["reference"])
        report["workloads"][name] = row
    FAST_PATHS.install()
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {r: v[r] for r in v if r.startswith("optimized_over")} for k, v in report["workloads"].items()}, indent=2))
    return report


def ratio(a: dict, b: dict) -> dict:
    """a/b for speeds, b/a for prefill seconds: above 1 means `a` is faster."""
    out = {}
    for key in a:
        if a[key] and b[key]:
            out[key] = round(b[key] / a[key] if key.endswith("seconds") else a[key] / b[key], 3)
    return out


if __name__ == "__main__":
    main()
