"""Measure the cost of each generated token, stock mindone against this project's faster path
and against the transformers (PyTorch) reference, in one process and one run; or, under
msrun, the two ways of spreading the model over the workers.

    python scripts/benchmark.py --model_name tiny_ckpt --device_target CPU \
        --prompt_tokens 64 256 --new_tokens 16 --repeats 3 --variant all --json bench.json
    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=bench_log --join=True \
        scripts/benchmark.py --model_name tiny_ckpt --device_target CPU --variant zero3 expert --json bench.json

Workloads (fixed seed, greedy): text only at each --prompt_tokens length, and image +
audio + question with speech output. For each variant it reports medians over the
repeats: thinker prefill seconds, thinker decode tokens/s, talker frames/s, and for the
MindSpore variants on text workloads the operations launched per decoded token (counted by
MindSpore's profiler: ops of a run of N tokens minus those of the prefill alone, over N-1;
CPU only). With
`--variant all` it also prints the ratios optimized/stock and optimized/reference
measured in this run. On Ascend with a real checkpoint the reference is skipped.

`zero3` and `expert` (the scripts' `--parallel` modes, with the faster path) need msrun
with two or more workers; for them it also reports each rank's parameter bytes and the
bytes each rank sent plus received in the collectives per decoded token, and with both
the ratios expert/zero3. Rank 0 prints and writes the figures.
Figures are printed, never asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
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


SINGLE_PROCESS = ["stock", "optimized", "reference"]
DISTRIBUTED = ["zero3", "expert"]
LOWER_IS_BETTER = ("prefill_seconds", "ops_per_decoded_token", "communicated_bytes_per_decoded_token", "parameter_bytes")


def mindspore_run(model, inputs, new_tokens: int, return_audio: bool, talker_frames: int) -> dict:
    from omni_helpers.generation import progress_to_stderr
    from omni_helpers.inputs import to_mindspore

    ms_inputs = to_mindspore(inputs, model.dtype)
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


def launched_ops(run) -> int:
    """Operations MindSpore launched while `run()` ran, counted from its profiler's CPU op timeline."""
    from mindspore.profiler import Profiler

    with tempfile.TemporaryDirectory() as folder:
        profiler = Profiler(output_path=folder)
        run()
        profiler.stop()
        profiler.analyse()
        total = 0
        for timeline in Path(folder).glob("**/FRAMEWORK/cpu_op_execute_timestamp_*.txt"):
            for line in timeline.read_text().splitlines():
                fields = line.split(";")
                total += len(fields[2].split()) if len(fields) >= 3 else 0  # one timestamp per launch
    return total


def ops_per_decoded_token(model, inputs, new_tokens: int) -> float:
    """(ops for prefill + new_tokens-1 decode steps - ops for prefill alone) / (new_tokens - 1)."""
    with_decode = launched_ops(lambda: mindspore_run(model, inputs, new_tokens, False, 0))
    prefill_only = launched_ops(lambda: mindspore_run(model, inputs, 1, False, 0))
    return round((with_decode - prefill_only) / (new_tokens - 1), 1)


def summarize(thinker, talker) -> dict:
    talker_seconds = talker.prefill_seconds + talker.decode_seconds
    return {
        "prefill_seconds": thinker.prefill_seconds,
        "decode_tokens_per_second": thinker.decode_steps / thinker.decode_seconds if thinker.decode_seconds else None,
        "talker_frames_per_second": len(talker.calls) / talker_seconds if talker_seconds else None,
        "communicated_bytes_per_decoded_token": thinker.decode_bytes / thinker.decode_steps if thinker.decode_steps else None,
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
    parser.add_argument("--variant", nargs="+", choices=[*SINGLE_PROCESS, *DISTRIBUTED, "all"], default=["all"],
                        help="all: stock optimized reference; zero3 and expert need msrun with 2+ workers")
    parser.add_argument("--media_dir", default=None, help="sample media (built in a temporary folder if not given)")
    parser.add_argument("--json", required=True, help="where to write the figures")
    parser.add_argument("--no-count_ops", dest="count_ops", action="store_false",
                        help="skip counting operations per decoded token (two extra profiled runs per workload)")
    return parser.parse_args(argv)


def chosen_variants(args, world_size: int) -> list[str]:
    variants = list(dict.fromkeys(v for chosen in args.variant for v in (SINGLE_PROCESS if chosen == "all" else [chosen])))
    if args.device_target != "CPU" and "reference" in variants:
        variants.remove("reference")  # the PyTorch reference runs on CPU only here
    if world_size == 1 and set(variants) & set(DISTRIBUTED):
        sys.exit("error: --variant zero3/expert spread the model over msrun's workers; "
                 "run the benchmark under msrun --worker_num=2 (or more)")  # fmt: skip
    return variants


def model_for(variant: str) -> str:
    """Which loaded model a variant runs: stock and optimized share the unsharded one ("none")."""
    return variant if variant in ("reference", *DISTRIBUTED) else "none"


def load_model_for(key: str, model_name: str, device_target: str, runtime):
    """The PyTorch reference, or mindone's model loaded as the scripts load it and spread over the ranks as `key` says."""
    if key == "reference":
        import torch
        from transformers import Qwen3OmniMoeForConditionalGeneration as TorchModel

        return TorchModel.from_pretrained(model_name, dtype=torch.float32, attn_implementation="eager").eval()
    from omni_helpers.cli import resolve_precision
    from omni_helpers.loading import load_model
    from omni_helpers.parallel import shard_model

    settings = argparse.Namespace(
        model_name=model_name, device_target=device_target, dtype=None, attn_implementation=None, allow_pickle_weights=False
    )
    model = load_model(resolve_precision(settings), with_talker=True)
    return shard_model(model, dataclasses.replace(runtime, parallel=key))


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mindone.transformers import Qwen3OmniMoeProcessor

    from omni_helpers.fast_paths import install_fast_paths, uninstall_fast_paths
    from omni_helpers.metrics import parameter_bytes
    from omni_helpers.runtime import setup_runtime
    from scripts.make_sample_media import build_media
    from tests.reference import processor_inputs

    # zero3 needs MindSpore's data-parallel context; expert and none run the same with it set
    runtime = setup_runtime(args.device_target, seed=0, parallel="zero3" if "zero3" in args.variant else None)
    variants = chosen_variants(args, runtime.world_size)
    say = print if runtime.is_main_process else (lambda *_, **__: None)
    media_dir = Path(args.media_dir) if args.media_dir else Path(tempfile.mkdtemp())
    if not (media_dir / "audio.wav").exists():
        build_media(media_dir)
    media = {name: media_dir / f"{name}.{ext}" for name, ext in (("image", "png"), ("audio", "wav"))}

    processor = Qwen3OmniMoeProcessor.from_pretrained(args.model_name)
    workloads = {f"text_{n}": (text_conversation(processor.tokenizer, n), False) for n in args.prompt_tokens}
    workloads["image_audio_speech"] = (media_conversation(media), True)
    prepared = {name: (processor_inputs(args.model_name, conv, False), speech) for name, (conv, speech) in workloads.items()}

    keys = dict.fromkeys(map(model_for, variants))  # each model loaded once, in order
    models = {key: load_model_for(key, args.model_name, args.device_target, runtime) for key in keys}

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "device_target": args.device_target,
        "world_size": runtime.world_size,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "workloads": {},
    }
    for name, (inputs, speech) in prepared.items():
        row = {"prompt_tokens": int(inputs["input_ids"].shape[1])}
        for variant in variants:
            if variant == "stock":
                uninstall_fast_paths()
            else:
                install_fast_paths(args.device_target)
            model = models[model_for(variant)]
            run = reference_run if variant == "reference" else mindspore_run
            runs = [run(model, inputs, args.new_tokens, speech, args.talker_frames) for _ in range(args.repeats)]
            row[variant] = {key: median([r[key] for r in runs]) for key in runs[0]}
            if variant in DISTRIBUTED:
                row[variant]["parameter_bytes"] = parameter_bytes(model)
            elif args.count_ops and args.device_target == "CPU" and variant != "reference" and not speech:
                row[variant]["ops_per_decoded_token"] = ops_per_decoded_token(model, inputs, args.new_tokens)
            say(f"{name:>20} {variant:>9}: {row[variant]}", flush=True)
        for better, baseline in (("optimized", "stock"), ("optimized", "reference"), ("expert", "zero3")):
            if better in row and baseline in row:
                row[f"{better}_over_{baseline}"] = ratio(row[better], row[baseline])
        report["workloads"][name] = row
    install_fast_paths(args.device_target)
    if runtime.is_main_process:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        ratios = {k: {r: v[r] for r in v if "_over_" in r} for k, v in report["workloads"].items()}
        print(json.dumps(ratios, indent=2))
    return report


def ratio(a: dict, b: dict) -> dict:
    """a/b for speeds, b/a for seconds, counts and bytes: above 1 means `a` is better."""
    out = {}
    for key in a.keys() & b.keys():
        if a[key] and b[key]:
            lower_is_better = key in LOWER_IS_BETTER
            out[key] = round(b[key] / a[key] if lower_is_better else a[key] / b[key], 3)
    return out


if __name__ == "__main__":
    main()
