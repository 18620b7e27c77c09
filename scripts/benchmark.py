"""Measure the cost of each generated token: stock mindone against this project's faster paths
and against the transformers (PyTorch) reference, in one process and one run; batches of
captions at several batch sizes; or, under msrun, the two ways of spreading the model.

    python scripts/benchmark.py --model_name tiny_ckpt --device_target CPU \
        --prompt_tokens 250 1000 --new_tokens 16 --repeats 3 --variant all --batch_sizes 1 4 8 --json bench.json
    python scripts/benchmark.py --topology released --device_target CPU --variant stock optimized \
        --prompt_tokens 32 --new_tokens 4 --repeats 1 --json bench_released.json
    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=bench_log --join=True \
        scripts/benchmark.py --model_name tiny_ckpt --device_target CPU --variant zero3 expert --json bench.json

The MindSpore variants run through the core (`omni_helpers.generation.core.generate_answers`), as the
scripts do, and their figures are the answers' own metrics. Workloads (fixed seed, greedy):
text only at each --prompt_tokens length, and image + audio + question with speech. For
each variant: medians over the repeats of the thinker's prefill seconds and decode
tokens/s, the talker's frames/s, and for the MindSpore variants on text workloads the
operations launched per decoded token (MindSpore's profiler: ops of a run of N tokens
minus those of the prefill alone, over N-1; CPU only). With `--variant all` it also prints
the ratios optimized/stock and optimized/reference measured in this run.

`--batch_sizes` captions the same set of recordings (8 lengths of the sample audio) at each
batch size with the faster paths, and reports decode tokens/s summed over the rows of a
batch and requests/s, with the ratios to batch size 1.

Host synchronisations (every read of a tensor's value to the host: what stalls an NPU's launch
pipeline) are counted per decoded token for the MindSpore variants, and per talker frame on
the speech workload; reads made by the CPU fallbacks' numpy kernels are counted apart (they
do not exist on Ascend). `--topology released` builds, in a temporary folder, a checkpoint
with the released Instruct checkpoint's depths, expert and head counts at narrow widths
(48 thinker layers of 128 experts, top 8; the talker's 20 of 128, top 6) and measures on it:
these counts are what carries to an NPU.

`zero3` and `expert` (the scripts' `--parallel` modes) need msrun with two or more workers;
for them it also reports each rank's parameter bytes and bytes sent plus received in the
collectives per decoded token, and the ratios expert/zero3. Rank 0 prints and writes.
Figures are printed, never asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
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

FILLER = " the sound of a short sentence and the image"
# optimized_loop, expert_loop: prompts' MoE layers as a host read and a loop over the chosen experts, not grouped
SINGLE_PROCESS = ["stock", "optimized", "optimized_loop", "reference"]
DISTRIBUTED = ["zero3", "expert", "zero3_pynative", "expert_pynative", "expert_loop"]  # *_pynative: compiled steps off
LOWER_IS_BETTER = (
    "prefill_seconds",
    "ops_per_decoded_token",
    "communicated_bytes_per_decoded_token",
    "parameter_bytes",
    "host_syncs_per_decoded_token",
    "host_syncs_per_talker_frame",
    "launches_per_decoded_token",
    "launches_per_talker_frame",
    "peak_host_memory_mb",
    "host_syncs_per_prompt",
    "launches_per_prompt_moe_layer",
)


# ----------------------------------------------------------------------------- workloads


def text_conversation(tokenizer, prompt_tokens: int) -> list[dict]:
    """A user turn whose rendered prompt is about `prompt_tokens` tokens long."""
    words, text = FILLER.split(), "Describe"
    while len(tokenizer(text).input_ids) + 8 < prompt_tokens:
        text += " " + words[len(text) % len(words)]
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def media_conversation(media_dir: Path) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(media_dir / "image.png")},
                {"type": "audio", "audio": str(media_dir / "audio.wav")},
                {"type": "text", "text": "What can you see and hear?"},
            ],
        }
    ]


def caption_conversations(media_dir: Path, count: int = 8) -> list[list[dict]]:
    """`count` recordings of different lengths (cuts of the sample audio), each alone, as the Captioner takes them."""
    import soundfile as sf

    wave, rate = sf.read(media_dir / "audio.wav")
    folder = Path(tempfile.mkdtemp(prefix="captions_"))
    conversations = []
    for i in range(count):
        path = folder / f"cut_{i}.wav"
        sf.write(path, wave[: int(rate * (0.5 + 2.0 * (i + 1) / count))], rate)
        conversations.append([{"role": "user", "content": [{"type": "audio", "audio": str(path)}]}])
    return conversations


# ----------------------------------------------------------------------------- runs


def settings_for(new_tokens: int, speech: bool, talker_frames: int):
    from omni_helpers.request.settings import GenerationSettings

    return GenerationSettings(
        max_new_tokens=new_tokens, return_audio=speech, talker_max_new_tokens=talker_frames, use_audio_in_video=False
    )


def mindspore_run(model, processor, inputs, new_tokens: int, speech: bool, talker_frames: int) -> dict:
    from omni_helpers.generation.core import generate_from_inputs

    metrics = generate_from_inputs(model, processor, inputs, settings_for(new_tokens, speech, talker_frames))[0].metrics
    return {
        "prefill_seconds": metrics["prefill_seconds"],
        "decode_tokens_per_second": metrics["thinker_decode_tokens_per_second"],
        "talker_frames_per_second": metrics["talker_frames_per_second"],
        "communicated_bytes_per_decoded_token": metrics["communicated_bytes_per_decoded_token"],
        "decoded_tokens": metrics["decoded_tokens"],  # fewer than asked when the answer ends early
        "talker_frames": metrics["talker_codec_frames"],
    }


def reference_run(model, processor, inputs, new_tokens: int, speech: bool, talker_frames: int) -> dict:
    """The PyTorch reference, timed by forward hooks as the core times mindone (`StepStream.watch`):
    prefill is the first forward, decode runs from its end to the last forward's end, and the
    talker from its first forward's start to its last forward's end (the loop's own work included)."""
    import torch

    from omni_helpers.generation.streaming import StepStream
    from omni_helpers.measuring.metrics import rate

    thinker, talker = StepStream(), StepStream()
    handles = thinker.watch(model.thinker) + talker.watch(model.talker)  # torch modules take the same hooks
    torch_inputs = {
        k: (torch.from_numpy(v).float() if v.dtype.kind == "f" else torch.from_numpy(v).long())
        for k, v in inputs.items()
    }
    # torch's default, one thread per core, whatever the process's OpenMP setting for MindSpore (`configure_openmp`);
    # the setting is the calling thread's, which MindSpore's own operations share, so it is put back after
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())
    try:
        with torch.no_grad():
            model.generate(
                **torch_inputs,
                return_audio=speech,
                thinker_max_new_tokens=new_tokens,
                thinker_eos_token_id=model.config.im_end_token_id,
                thinker_do_sample=False,
                talker_do_sample=False,
                talker_max_new_tokens=talker_frames,
            )
    finally:
        torch.set_num_threads(threads)
        for handle in handles:
            handle.remove()
    return {
        "prefill_seconds": thinker.prefill_seconds,
        "decode_tokens_per_second": rate(thinker.steps - 1, thinker.decode_seconds),
        "talker_frames_per_second": rate(talker.steps - 1, talker.seconds),
        "communicated_bytes_per_decoded_token": None,
    }


def launched_ops(run) -> tuple[int, dict]:
    """Operations MindSpore launched while `run()` ran, counted from its profiler's CPU op timeline,
    and the run's figures."""
    from mindspore.profiler import Profiler

    with tempfile.TemporaryDirectory() as folder:
        profiler = Profiler(output_path=folder)
        figures = run()
        profiler.stop()
        profiler.analyse()
        total = 0
        for timeline in Path(folder).glob("**/FRAMEWORK/cpu_op_execute_timestamp_*.txt"):
            for line in timeline.read_text().splitlines():
                fields = line.split(";")
                total += len(fields[2].split()) if len(fields) >= 3 else 0  # one timestamp per launch
    return total, figures


def host_syncs(run) -> tuple[int, int, dict]:
    """Host reads of tensor values while `run()` ran: (those an NPU would also make, the CPU fallbacks' own,
    the run's figures)."""
    from omni_helpers.measuring.host_syncs import counting_host_syncs

    with counting_host_syncs() as syncs:
        figures = run()
    cpu_only = sum(n for site, n in syncs.sites.items() if "cpu_fallbacks" in site)
    return syncs.count - cpu_only, cpu_only, figures


def launches(run) -> tuple[int, int, dict]:
    """Calls from Python that launched device work while `run()` ran, and how many of them were compiled steps:
    each PyNative operation, and each call of a compiled graph (`compiled.Graph.step`), one launch however many
    kernels it runs. MindSpore's profiler lists both kinds of kernel alike (a PyNative `ops.Gather` and a graph's
    gather are both "Default/Gather-opN"), so each step runs between two synchronisations and the kernels that
    started inside one are the graph's. CPU only."""
    from mindspore.common.api import _pynative_executor
    from mindspore.profiler import Profiler

    from omni_helpers.mindone_changes.faster import compiled

    spans = []  # (start, end) of each compiled step, in the profiler's clock (nanoseconds since the epoch)
    step = compiled.Graph.step

    def counted_step(graph, *arguments):
        _pynative_executor.sync()  # everything launched before the step has run
        start = time.time_ns()
        outputs = step(graph, *arguments)
        _pynative_executor.sync()
        spans.append((start, time.time_ns()))
        return outputs

    with tempfile.TemporaryDirectory() as folder:
        compiled.Graph.step = counted_step
        try:
            profiler = Profiler(output_path=folder)
            figures = run()
            profiler.stop()
        finally:
            compiled.Graph.step = step
        profiler.analyse()
        pynative = 0
        for timeline in Path(folder).glob("**/FRAMEWORK/cpu_op_execute_timestamp_*.txt"):
            for line in timeline.read_text().splitlines():
                fields = line.split(";")
                for launch in fields[2].split() if len(fields) >= 3 else ():  # "start,duration,..." per launch
                    started = int(launch.split(",")[0])
                    pynative += not any(start <= started <= end for start, end in spans)
    return pynative + len(spans), len(spans), figures


def launches_per_step(model, processor, inputs, new_tokens: int, frames: int = 0) -> dict:
    """Launches per decoded token (runs of N tokens and of 2), or with `frames` per talker frame (runs of F frames
    and of 2, the thinker's part the same); and how many of them were compiled steps. Both runs reach the first
    decode step, where the compiled graph's buffers are filled from the prompt's cache once per request (2 or 3
    launches per layer), so that one-time work is not counted per step."""
    if frames:
        many = launches(lambda: mindspore_run(model, processor, inputs, new_tokens, True, frames))
        few = launches(lambda: mindspore_run(model, processor, inputs, new_tokens, True, 2))
        total, graphs = per_step(many, few, "talker_frames")
        return {"launches_per_talker_frame": total, "compiled_steps_per_talker_frame": graphs}
    many = launches(lambda: mindspore_run(model, processor, inputs, new_tokens, False, 0))
    few = launches(lambda: mindspore_run(model, processor, inputs, max(1, min(2, new_tokens - 1)), False, 0))
    total, graphs = per_step(many, few, "decoded_tokens")
    return {"launches_per_decoded_token": total, "compiled_steps_per_decoded_token": graphs}


def per_step(many: tuple, few: tuple, steps: str, digits: int = 2) -> tuple[float, ...]:
    """Counts per step from two counted runs, each (count, ..., the run's figures): the counts'
    differences over the difference in steps taken."""
    taken = many[-1][steps] - few[-1][steps]
    return tuple(round((a - b) / taken, digits) for a, b in zip(many[:-1], few[:-1]))


def host_syncs_per_decoded_token(model, processor, inputs, new_tokens: int) -> dict:
    """(reads of a run of N tokens - reads of the prefill alone) / the decoding steps between them."""
    many = host_syncs(lambda: mindspore_run(model, processor, inputs, new_tokens, False, 0))
    one = host_syncs(lambda: mindspore_run(model, processor, inputs, 1, False, 0))
    device, cpu_only = per_step(many, one, "decoded_tokens")
    return {"host_syncs_per_decoded_token": device, "cpu_only_host_syncs_per_decoded_token": cpu_only}


def host_syncs_per_prompt(model, processor, inputs) -> dict:
    """Host reads of a run that stops at its first token: the prompt's forward and the loop's first step."""
    device, cpu_only, _ = host_syncs(lambda: mindspore_run(model, processor, inputs, 1, False, 0))
    return {"host_syncs_per_prompt": device, "cpu_only_host_syncs_per_prompt": cpu_only}


def launches_per_prompt_moe_layer(model, prompt_tokens: int) -> dict:
    """Launches of the thinker's first MoE layer on a prompt's worth of hidden states (random, the model's dtype)."""
    import mindspore as ms
    import numpy as np

    block = model.thinker.model.layers[0].mlp
    shape = (1, prompt_tokens, block.gate.weight.shape[1])
    x = ms.Tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).astype(block.gate.weight.dtype)

    def one_layer() -> dict:
        block(x)
        return {}

    one_layer()  # once before counting: first calls build caches
    total, _, _ = launches(one_layer)
    return {"launches_per_prompt_moe_layer": total}


def host_syncs_per_talker_frame(model, processor, inputs, new_tokens: int, frames: int) -> dict:
    """The same for the talker: runs of F frames and of 2 frames, the thinker's part the same."""
    many = host_syncs(lambda: mindspore_run(model, processor, inputs, new_tokens, True, frames))
    two = host_syncs(lambda: mindspore_run(model, processor, inputs, new_tokens, True, 2))
    device, cpu_only = per_step(many, two, "talker_frames")
    return {"host_syncs_per_talker_frame": device, "cpu_only_host_syncs_per_talker_frame": cpu_only}


def ops_per_decoded_token(model, processor, inputs, new_tokens: int) -> float:
    """(ops for prefill + the decode steps - ops for prefill alone) / the decode steps."""
    with_decode = launched_ops(lambda: mindspore_run(model, processor, inputs, new_tokens, False, 0))
    prefill_only = launched_ops(lambda: mindspore_run(model, processor, inputs, 1, False, 0))
    return per_step(with_decode, prefill_only, "decoded_tokens", digits=1)[0]


def batch_run(model, processor, conversations, batch_size: int, new_tokens: int) -> dict:
    """Caption every conversation, `batch_size` at a time: decode tokens/s summed over a batch's rows, requests/s."""
    from omni_helpers.generation.core import generate_answers

    decoded, decode_seconds, started = 0, 0.0, time.perf_counter()
    for start in range(0, len(conversations), batch_size):
        answers = generate_answers(
            model, processor, conversations[start : start + batch_size], settings_for(new_tokens, False, 0)
        )
        decoded += sum(a.metrics["decoded_tokens"] for a in answers)
        decode_seconds += answers[0].metrics["decode_seconds"]  # the batch's, carried by every row
    return {
        "decode_tokens_per_second": decoded / decode_seconds if decode_seconds else None,
        "requests_per_second": len(conversations) / (time.perf_counter() - started),
    }


def startup(model_name: str, media_dir: Path, device_target: str) -> dict:
    """Start-up as a user meets it: `--help`, a request refused by its checks, and two whole runs of
    omni_understanding.py (the first as cold as this machine allows: the files may be cached)."""
    import subprocess

    script = [sys.executable, str(ROOT / "omni_understanding.py")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def seconds(argv) -> float:
        began = time.perf_counter()
        subprocess.run(script + argv, capture_output=True, env=env, timeout=600)
        return round(time.perf_counter() - began, 3)

    figures = {
        "help_seconds": seconds(["--help"]),
        "refused_request_seconds": seconds(
            [
                "--device_target",
                device_target,
                "--model_name",
                model_name,
                "--image",
                str(media_dir / "missing.png"),
                "--prompt",
                "hi",
            ]
        ),
    }
    for run in ("first_run", "second_run"):
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                script
                + [
                    "--device_target",
                    device_target,
                    "--model_name",
                    model_name,
                    "--prompt",
                    "hi",
                    "--max_new_tokens",
                    "4",
                    "--output_dir",
                    out,
                ],
                capture_output=True,
                env=env,
                timeout=600,
            )
            metrics = json.loads((Path(out) / "result.json").read_text())["metrics"]
        figures[run] = {key: value for key, value in metrics.items() if key.startswith("startup_")}
    return figures


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def ratio(a: dict, b: dict) -> dict:
    """a/b for speeds, b/a for seconds, counts and bytes: above 1 means `a` is better."""
    out = {}
    for key in a.keys() & b.keys():
        if a[key] and b[key] and key not in ("decoded_tokens", "talker_frames"):  # counts of work, not figures of merit
            lower_is_better = key in LOWER_IS_BETTER
            out[key] = round(b[key] / a[key] if lower_is_better else a[key] / b[key], 3)
    return out


def timed(variant: str, model, processor, inputs, speech: bool, run, args) -> dict:
    """One variant's speeds on one workload: medians of the timed repeats."""
    from omni_helpers.measuring.metrics import parameter_bytes, peak_host_memory_mb

    # a first request compiles the graphs of its shape (all but stock) and warms caches: it is run once before
    # the timed repeats, and its decode rate reported apart (stock has nothing to compile)
    first = None if variant == "stock" else run(model, processor, inputs, args.new_tokens, speech, args.talker_frames)
    gc.collect()  # the compiler's garbage collected now, not in a timed run (a pass took tens of ms)
    runs = [run(model, processor, inputs, args.new_tokens, speech, args.talker_frames) for _ in range(args.repeats)]
    figures = {key: median([r[key] for r in runs]) for key in runs[0]}
    if first is not None:
        figures["first_request_decode_tokens_per_second"] = first["decode_tokens_per_second"]
        if speech:
            figures["first_request_talker_frames_per_second"] = first["talker_frames_per_second"]
    if variant in DISTRIBUTED:
        figures["parameter_bytes"] = parameter_bytes(model)
        figures["peak_host_memory_mb"] = peak_host_memory_mb()  # this rank's peak so far (see the README on order)
    return figures


def counted(variant: str, model, processor, inputs, speech: bool, args) -> dict:
    """One variant's counts on one workload: host reads, and on CPU operations and launches per step. They run
    after every timed run: MindSpore's profiler, once used, slows what runs after it."""
    figures = {}
    # an uncounted request first: the first text request after a speech request compiles some graphs once more
    # (seen on CPU: the compiler's constant folding reads tensors), which is not a per-step cost
    mindspore_run(model, processor, inputs, args.new_tokens, speech, args.talker_frames)
    if not speech:
        figures.update(host_syncs_per_decoded_token(model, processor, inputs, args.new_tokens))
        figures.update(host_syncs_per_prompt(model, processor, inputs))
    if speech and args.talker_frames > 2:
        figures.update(host_syncs_per_talker_frame(model, processor, inputs, 2, args.talker_frames))
    if not (args.count_ops and args.device_target == "CPU"):
        return figures
    if variant in SINGLE_PROCESS[:2] and not speech:
        figures["ops_per_decoded_token"] = ops_per_decoded_token(model, processor, inputs, args.new_tokens)
    if variant != "stock" and not speech:
        figures.update(launches_per_prompt_moe_layer(model, int(inputs["input_ids"].shape[1])))
    if variant != "stock" and (not speech or args.talker_frames > 2):
        figures.update(
            launches_per_step(
                model, processor, inputs, 2 if speech else args.new_tokens, args.talker_frames if speech else 0
            )
        )
    return figures


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default=None, help="a checkpoint (required unless --topology released)")
    parser.add_argument(
        "--topology",
        choices=["released"],
        default=None,
        help="measure on a checkpoint built with the released depths, expert and head counts (narrow widths)",
    )
    parser.add_argument("--device_target", choices=["Ascend", "CPU"], default="CPU")
    parser.add_argument("--prompt_tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--talker_frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variant",
        nargs="+",
        choices=[*SINGLE_PROCESS, *DISTRIBUTED, "all"],
        default=["all"],
        help="all: stock optimized reference; zero3, expert and their *_pynative (the compiled decode "
        "steps off) need msrun with 2+ workers",
    )
    parser.add_argument(
        "--batch_sizes",
        type=int,
        nargs="*",
        default=[],
        help="also caption 8 recordings at each of these batch sizes (faster paths)",
    )
    parser.add_argument("--media_dir", default=None, help="sample media (built in a temporary folder if not given)")
    parser.add_argument("--json", required=True, help="where to write the figures")
    parser.add_argument(
        "--startup",
        action="store_true",
        help="also time --help, a refused request, and two whole runs of omni_understanding.py",
    )
    parser.add_argument(
        "--fast_paths",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-fast_paths: every MindSpore variant runs mindone with this project's bug fixes alone",
    )
    parser.add_argument(
        "--no-count_ops",
        dest="count_ops",
        action="store_false",
        help="skip counting operations per decoded token (two extra profiled runs per workload)",
    )
    return parser.parse_args(argv)


def chosen_variants(args, world_size: int) -> list[str]:
    variants = list(
        dict.fromkeys(v for chosen in args.variant for v in (SINGLE_PROCESS if chosen == "all" else [chosen]))
    )
    # a mode's PyNative steps before its compiled ones: a rank's peak memory after each then says what the graphs add
    distributed = sorted((v for v in variants if v in DISTRIBUTED), key=lambda v: (model_for(v), v == model_for(v)))
    variants = [v for v in variants if v not in DISTRIBUTED] + distributed
    if args.device_target != "CPU" and "reference" in variants:
        variants.remove("reference")  # the PyTorch reference runs on CPU only here
    if world_size == 1 and set(variants) & set(DISTRIBUTED):
        sys.exit(
            "error: --variant zero3/expert (and *_pynative) spread the model over msrun's workers; "
            "run the benchmark under msrun --worker_num=2 (or more)"
        )
    return variants


def model_for(variant: str) -> str:
    """Which loaded model a variant runs: stock its own (experts as loaded), optimized the one-process one ("none"),
    a distributed mode its own, with the compiled decode steps (`zero3`) or without (`zero3_pynative`)."""
    if variant in DISTRIBUTED:
        return variant.removesuffix("_pynative").removesuffix("_loop")
    return variant if variant in ("stock", "reference") else "none"


@contextlib.contextmanager
def paths_for(variant: str):
    """The variant's paths: PyNative decode steps for `*_pynative` (the compiled steps off), the per-expert prompt
    loop for `*_loop`, as the scripts run otherwise."""
    from omni_helpers.mindone_changes.faster import decode_graph
    from omni_helpers.parallel import sparse_moe

    applies, dispatch = decode_graph.applies, sparse_moe.PROMPT_DISPATCH
    if variant.endswith("_pynative"):
        decode_graph.applies = lambda *arguments: False
    if variant.endswith("_loop"):
        sparse_moe.PROMPT_DISPATCH = "loop"
    try:
        yield
    finally:
        decode_graph.applies, sparse_moe.PROMPT_DISPATCH = applies, dispatch


def load_model_for(key: str, model_path: Path, device_target: str, runtime, fast_paths: bool = True):
    """The PyTorch reference, or mindone's model loaded as the scripts load it and spread over the ranks as `key`
    says."""
    if key == "reference":
        import torch
        from transformers import Qwen3OmniMoeForConditionalGeneration as TorchModel

        return TorchModel.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager").eval()
    from omni_helpers.loading import load_model, shard_model
    from omni_helpers.request.cli import resolve_precision

    dtype, attn_implementation = resolve_precision(device_target, None, None)
    model = load_model(model_path, dtype, attn_implementation, with_talker=True)
    parallel = "none" if key == "stock" else key
    return shard_model(model, dataclasses.replace(runtime, parallel=parallel), stack=key != "stock" and fast_paths)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from omni_helpers.runtime import configure_openmp, setup_runtime, stdout_for_the_launcher

    stdout_for_the_launcher()  # under scripts/msrun_launch.sh, rank 0's figures are what the console shows
    configure_openmp(args.device_target)  # before MindSpore loads, as the scripts do
    from omni_helpers.mindone_changes.patches import install_patches
    from omni_helpers.request.checkpoint import resolve_checkpoint

    if args.topology == "released":
        from scripts.make_tiny_checkpoint import build_checkpoint

        args.model_name = tempfile.mkdtemp(prefix="released_topology_")
        build_checkpoint(Path(args.model_name), topology="released")
    elif args.model_name is None:
        sys.exit("error: --model_name: give a checkpoint, or --topology released")
    checkpoint = resolve_checkpoint(args.model_name)
    # zero3 needs MindSpore's data-parallel context; expert and none run the same with it set
    zero3 = any(variant.startswith("zero3") for variant in args.variant)
    runtime = setup_runtime(args.device_target, seed=0, parallel="zero3" if zero3 else None)
    install_patches(args.device_target, args.fast_paths)
    from omni_helpers.generation.core import prepare_inputs
    from omni_helpers.loading import load_processor
    from scripts.make_sample_media import build_media

    variants = chosen_variants(args, runtime.world_size)
    say = print if runtime.is_main_process else (lambda *_, **__: None)
    media_dir = Path(args.media_dir) if args.media_dir else Path(tempfile.mkdtemp())
    if not (media_dir / "audio.wav").exists():
        build_media(media_dir)

    processor = load_processor(checkpoint.path)
    workloads = {f"text_{n}": (text_conversation(processor.tokenizer, n), False) for n in args.prompt_tokens}
    workloads["image_audio_speech"] = (media_conversation(media_dir), True)
    no_video = settings_for(1, False, 0)
    prepared = {
        name: (prepare_inputs(processor, [conv], no_video), speech) for name, (conv, speech) in workloads.items()
    }

    keys = dict.fromkeys(map(model_for, variants))  # each model loaded once, in order
    models = {key: load_model_for(key, checkpoint.path, args.device_target, runtime, args.fast_paths) for key in keys}

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "topology": args.topology or "the checkpoint's",
        "device_target": args.device_target,
        "world_size": runtime.world_size,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "workloads": {},
    }
    for counting in (False, True):  # every timed run first: the profiler, once used, slows later runs
        for name, (inputs, speech) in prepared.items():
            row = report["workloads"].setdefault(name, {"prompt_tokens": int(inputs["input_ids"].shape[1])})
            for variant in variants:
                if variant == "reference" and counting:
                    continue
                install_patches(args.device_target, fast_paths=args.fast_paths and variant != "stock")
                model = models[model_for(variant)]
                run = reference_run if variant == "reference" else mindspore_run
                with paths_for(variant):
                    if counting:
                        row[variant].update(counted(variant, model, processor, inputs, speech, args))
                    else:
                        row[variant] = timed(variant, model, processor, inputs, speech, run, args)
                say(f"{name:>20} {variant:>15}: {row[variant]}", flush=True)
    for row in report["workloads"].values():
        for better, baseline in (
            ("optimized", "stock"),
            ("optimized", "reference"),
            ("expert", "zero3"),
            ("zero3", "zero3_pynative"),
            ("expert", "expert_pynative"),
            ("optimized", "optimized_loop"),
            ("expert", "expert_loop"),
        ):
            if better in row and baseline in row:
                row[f"{better}_over_{baseline}"] = ratio(row[better], row[baseline])
    install_patches(args.device_target, args.fast_paths)

    if args.batch_sizes:
        model = models[next(key for key in models if key != "reference")]
        conversations = caption_conversations(media_dir)
        batches = {}
        for batch_size in args.batch_sizes:
            runs = [
                batch_run(model, processor, conversations, batch_size, args.new_tokens) for _ in range(args.repeats)
            ]
            batches[batch_size] = {key: median([r[key] for r in runs]) for key in runs[0]}
            say(f"{'captions':>20} batch {batch_size:>3}: {batches[batch_size]}", flush=True)
        first = batches[args.batch_sizes[0]]
        for figures in batches.values():
            figures[f"over_batch_{args.batch_sizes[0]}"] = ratio(figures, first)
        report["captioning_batches"] = {"requests": len(conversations), **{str(b): f for b, f in batches.items()}}

    if args.startup and runtime.is_main_process:
        report["startup"] = startup(args.model_name, media_dir, args.device_target)
        say(f"{'start-up':>20}: {report['startup']}", flush=True)

    if runtime.is_main_process:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        ratios = {k: {r: v[r] for r in v if "_over_" in r} for k, v in report["workloads"].items()}
        print(json.dumps(ratios, indent=2))
    return report


if __name__ == "__main__":
    main()
