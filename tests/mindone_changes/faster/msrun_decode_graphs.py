"""Run under msrun by tests/mindone_changes/faster/test_decode_graph.py: the compiled decode steps against the PyNative ones, on every
rank, in one --parallel mode. Each rank writes what it saw to OUT/rank_<rank>.json; the test compares.

    msrun --worker_num=2 ... tests/mindone_changes/faster/msrun_decode_graphs.py CHECKPOINT MEDIA_DIR zero3|expert OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

NEW_TOKENS, TALKER_FRAMES = 8, 6


def main(checkpoint: Path, media: Path, mode: str, out: Path) -> None:
    from omni_helpers.runtime import configure_openmp

    configure_openmp("CPU")
    import pytest

    from omni_helpers.generation.core import generate_from_inputs
    from omni_helpers.loading import load_model, load_processor, shard_model
    from omni_helpers.mindone_changes.faster import decode_graph
    from omni_helpers.mindone_changes.patches import install_patches
    from omni_helpers.request.settings import GenerationSettings
    from omni_helpers.runtime import setup_runtime
    from tests.reference import batch_inputs, flatter_code_predictor, record_codes, request_conversation

    runtime = setup_runtime("CPU", seed=0, parallel=mode)
    install_patches("CPU")
    # eager attention: the compiled steps compute attention in float32 as eager does (flash casts to float16)
    model = shard_model(load_model(checkpoint, "float32", "eager", with_talker=True), runtime)
    processor = load_processor(checkpoint)
    codes_seen = record_codes(model.code2wav, lambda codes: codes.asnumpy())
    files = {
        kind: media / name for kind, name in (("image", "image.png"), ("audio", "audio.wav"), ("video", "video.mp4"))
    }
    speech_inputs = batch_inputs(checkpoint, [request_conversation("image_audio", files)], False)
    rows_inputs = batch_inputs(
        checkpoint,
        [[{"role": "user", "content": "Describe the sound of a short sentence."}], [{"role": "user", "content": "Hi"}]],
        False,
    )

    def generate(inputs, pynative: bool, **settings) -> dict:
        settings = GenerationSettings(**{"max_new_tokens": NEW_TOKENS, "use_audio_in_video": False, **settings})
        with pytest.MonkeyPatch.context() as patch:
            if pynative:
                patch.setattr(decode_graph, "applies", lambda *args: False)
            codes_seen.clear()
            answers = generate_from_inputs(model, processor, inputs, settings, keep_logits=True)
        return {
            "tokens": [a.token_ids for a in answers],
            "logits": [a.step_logits.tolist() for a in answers],
            "codes": [codes.tolist() for codes in codes_seen],  # one entry per row that spoke
            "wavs": [None if a.waveform is None else a.waveform.tolist() for a in answers],
        }

    speech = {"return_audio": True, "talker_max_new_tokens": TALKER_FRAMES}
    sampled = {"do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 1.0, "talker_do_sample": True, "seed": 7}
    seen = {
        "speech_compiled": generate(speech_inputs, False, **speech),
        "speech_pynative": generate(speech_inputs, True, **speech),
        "rows_compiled": generate(rows_inputs, False, **speech),  # each row speaks
        "rows_pynative": generate(rows_inputs, True, **speech),
    }
    with flatter_code_predictor(model):  # so that its draws are not the greedy codes (tests/reference.py)
        seen["sampled_compiled"] = generate(speech_inputs, False, **speech, **sampled)
        seen["sampled_pynative"] = generate(speech_inputs, True, **speech, **sampled)
    graphs = model.thinker.__dict__.get("_decode_graphs", {})
    first = dict(graphs)
    with flatter_code_predictor(model):  # a later request of the same shapes as the last
        generate(speech_inputs, False, **speech, **sampled)
    seen["thinker_graphs"] = {
        "before": [list(key) for key in first],
        "after": [list(key) for key in graphs],
        "same_objects": all(graphs.get(key) is graph for key, graph in first.items()),
        "compiled": all(graph.compiled for graph in graphs.values()),
    }
    seen["talker_graphs"] = [list(key) for key in model.talker.__dict__.get("_decode_graphs", {})]

    # A graph that does not build on rank 1 only: every rank must fall back to PyNative, together.
    if runtime.rank == 1:

        def failing_step(thinker, buffers):
            def step(input_ids, cache_position, rope_deltas):
                raise TypeError("injected on rank 1")

            return step

        decode_graph.thinker_step = failing_step
    model.thinker.__dict__.pop("_decode_graphs", None)  # built anew, by the failing step on rank 1
    seen["one_rank_fails"] = generate(rows_inputs, False)
    seen["failure"] = model.thinker.__dict__.get("_decode_graph_error")
    (out / f"rank_{runtime.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
