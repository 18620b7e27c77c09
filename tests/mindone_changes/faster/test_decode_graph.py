"""The compiled decode step (omni_helpers/mindone_changes/faster/decode_graph.py) against the PyNative step it replaces."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from omni_helpers.mindone_changes.faster import decode_graph
from omni_helpers.parallel.sparse_moe import DEVICE_DISPATCH_MAX_SLOTS
from tests.reference import falls_back_once, generate_both_ways, relative_error, unbuildable
from tests.reference import thinker_generate as generate

NEW_TOKENS = 12


def thinker_generate(mindone, inputs, graph: bool, monkeypatch, **settings):
    """The thinker's generate with the compiled step, or with every step in PyNative."""
    return generate(mindone, inputs, NEW_TOKENS, monkeypatch, None if graph else decode_graph, **settings)


def graphs_of(mindone) -> dict:
    return mindone.model.thinker.__dict__.get("_decode_graphs", {})


@pytest.mark.parametrize(
    "sampling", [{"do_sample": False}, {"do_sample": True, "top_k": 20, "temperature": 0.8}], ids=["greedy", "sampled"]
)
def test_compiled_step_gives_the_pynative_steps_tokens_logits_and_hidden_states(
    mindone, two_rows, monkeypatch, sampling
):
    results = []
    for graph in (True, False):
        ms.set_seed(5)
        results.append(thinker_generate(mindone, two_rows, graph, monkeypatch, **sampling))
    compiled, pynative = results
    assert graphs_of(mindone), "the compiled step did not run"
    np.testing.assert_array_equal(compiled.sequences.asnumpy(), pynative.sequences.asnumpy())
    assert compiled.sequences.shape[1] == two_rows["input_ids"].shape[1] + NEW_TOKENS
    for step in range(1, NEW_TOKENS):  # step 0 is the prompt's forward, the same code on both paths
        assert relative_error(compiled.logits[step].asnumpy(), pynative.logits[step].asnumpy()) <= 1e-5
        assert len(compiled.hidden_states[step]) == len(pynative.hidden_states[step])  # embeddings, layers, final norm
        for ours, theirs in zip(compiled.hidden_states[step], pynative.hidden_states[step]):
            assert ours.shape == theirs.shape
            assert relative_error(ours.asnumpy(), theirs.asnumpy()) <= 1e-5


def test_a_graph_that_chooses_ends_each_row_at_its_end_token_as_the_loop_does(mindone, two_rows, monkeypatch):
    """Greedy with no logits processor, the graph chooses the tokens and tests for the end itself: with an end
    token that one row says early, that row is padded from then on and the other goes on, as in the loop."""
    free = thinker_generate(mindone, two_rows, False, monkeypatch, do_sample=False)
    said = free.sequences.asnumpy()[:, two_rows["input_ids"].shape[1] :]
    end = int(said[1, 3])  # the second row's fourth token, where the first row does not say it before
    assert end not in said[0, :4]
    stops = {"do_sample": False, "eos_token_id": end, "pad_token_id": 0}
    compiled = thinker_generate(mindone, two_rows, True, monkeypatch, **stops)
    pynative = thinker_generate(mindone, two_rows, False, monkeypatch, **stops)
    assert any(key[2] == decode_graph.Choice((end,), 0, False) for key in graphs_of(mindone))
    np.testing.assert_array_equal(compiled.sequences.asnumpy(), pynative.sequences.asnumpy())
    row = compiled.sequences.asnumpy()[1, two_rows["input_ids"].shape[1] :]
    assert row[3] == end and (row[4:] == 0).all() and len(row) > 5


def test_the_cache_handed_back_holds_every_decoded_position(mindone, two_rows, monkeypatch):
    compiled = thinker_generate(mindone, two_rows, True, monkeypatch, do_sample=False)
    pynative = thinker_generate(mindone, two_rows, False, monkeypatch, do_sample=False)
    positions = two_rows["input_ids"].shape[1] + NEW_TOKENS - 1  # the last token chosen is never fed back
    rows = two_rows["input_ids"].shape[0]
    for ours, theirs in zip(compiled.past_key_values.layers, pynative.past_key_values.layers):
        assert ours.keys.shape == theirs.keys.shape == (rows, ours.keys.shape[1], positions, ours.keys.shape[3])
        # left padding: a padded row's first keys are garbage on both paths and masked; compare what is attended
        for row in range(rows):
            real = int(two_rows["attention_mask"][row].sum())
            start = two_rows["input_ids"].shape[1] - real
            for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                assert relative_error(a[row, :, start:].asnumpy(), b[row, :, start:].asnumpy()) <= 1e-5


def test_a_graph_is_built_once_per_shape_and_refilled_for_the_next_request(mindone, two_rows, monkeypatch):
    """Later requests of the same shape reuse the first one's graph: its buffers are refilled in place (a
    graph keeps the memory it was compiled with; rebinding a buffer would leave it reading an old cache)."""
    first = thinker_generate(mindone, two_rows, True, monkeypatch, do_sample=False)
    (key, graph), *_ = graphs_of(mindone).items()
    assert key[:2] == (2, 256)  # rows, cache capacity
    swapped = {key: value[::-1].copy() for key, value in two_rows.items()}  # the same shape, other caches
    expected = thinker_generate(mindone, swapped, False, monkeypatch, do_sample=False)
    actual = thinker_generate(mindone, swapped, True, monkeypatch, do_sample=False)
    np.testing.assert_array_equal(actual.sequences.asnumpy(), expected.sequences.asnumpy())
    again = thinker_generate(mindone, two_rows, True, monkeypatch, do_sample=False)
    np.testing.assert_array_equal(again.sequences.asnumpy(), first.sequences.asnumpy())
    assert graphs_of(mindone)[key] is graph


def test_capacity_is_rounded_up_to_share_graphs():
    assert decode_graph.capacity_for(1) == decode_graph.CAPACITY_STEP
    assert decode_graph.capacity_for(decode_graph.CAPACITY_STEP) == decode_graph.CAPACITY_STEP
    assert decode_graph.capacity_for(decode_graph.CAPACITY_STEP + 1) == 2 * decode_graph.CAPACITY_STEP


def test_what_the_graph_does_not_cover_keeps_the_pynative_step(mindone, two_rows, monkeypatch):
    from mindone.transformers.generation.configuration_utils import GenerationConfig

    thinker = mindone.model.thinker
    thinker_generate(mindone, two_rows, True, monkeypatch, do_sample=False)  # sets the rope deltas
    config = GenerationConfig(max_length=300)
    assert decode_graph.applies(thinker, 2, config)
    too_many = DEVICE_DISPATCH_MAX_SLOTS // thinker.config.text_config.num_experts_per_tok + 1
    assert not decode_graph.applies(thinker, too_many, config)  # more (row, expert) slots than device dispatch takes
    monkeypatch.setattr(mindone.model.talker, "rope_deltas", None)  # no prompt run yet: no positions to decode from
    assert not decode_graph.applies(mindone.model.talker, 1, config)
    assert not decode_graph.applies(thinker, 2, GenerationConfig(max_length=300, output_attentions=True))


@pytest.mark.parametrize("sampling_seed", [None, 7], ids=["greedy", "sampled"])
def test_compiled_talker_step_gives_the_pynative_steps_codes_and_speech(
    mindone, tiny_checkpoint, sample_media, monkeypatch, sampling_seed
):
    """Frames after the first run the code predictor from a cleared cache: every frame's codes must match."""
    from tests.reference import processor_inputs, request_conversation

    inputs = processor_inputs(tiny_checkpoint, request_conversation("image_audio", sample_media), False)
    compiled, pynative = generate_both_ways(
        mindone, inputs, monkeypatch, decode_graph, talker_new_tokens=12, sampling_seed=sampling_seed
    )
    assert mindone.model.talker.__dict__.get("_decode_graphs"), "the compiled talker step did not run"
    assert compiled.codes.shape == pynative.codes.shape and compiled.codes.shape[-1] > 2  # several frames
    np.testing.assert_array_equal(compiled.codes, pynative.codes)
    np.testing.assert_array_equal(compiled.tokens, pynative.tokens)
    assert np.abs(compiled.wav - pynative.wav).max() <= 1e-5


def test_a_step_that_does_not_build_falls_back_to_pynative_and_says_why(
    mindone, two_rows, monkeypatch, capfd, tmp_path
):
    """The compiled steps have run on CPU only: a device where one fails at its first call (where
    MindSpore compiles it) must still answer, step by step, and say why once on stderr."""
    monkeypatch.chdir(tmp_path)  # MindSpore writes a failed graph's analysis to ./rank_0/om
    expected = thinker_generate(mindone, two_rows, False, monkeypatch, do_sample=False)
    thinker = mindone.model.thinker

    monkeypatch.setattr(decode_graph, "thinker_step", unbuildable("ScatterNdUpdate"))
    monkeypatch.setitem(thinker.__dict__, "_decode_graphs", {})  # no graph of this shape built yet
    results = falls_back_once(
        lambda: thinker_generate(mindone, two_rows, True, monkeypatch, do_sample=False),
        thinker,
        "decode_graph",
        capfd,
        "ScatterNdUpdate",
        "decode step",
        "decoding step by step instead",
    )
    for result in results:
        np.testing.assert_array_equal(result.sequences.asnumpy(), expected.sequences.asnumpy())


# ----------------------------------------------------------------------------- under msrun


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero3", "expert"])
def test_under_msrun_the_compiled_steps_give_the_pynative_steps_answers_on_every_rank(
    mode, tiny_checkpoint, sample_media, tmp_path
):
    """tests/mindone_changes/faster/msrun_decode_graphs.py on 2 CPU workers, each rank's graphs holding the mode's collectives (ZeRO-3's
    all-gathers, expert parallelism's all-reduces): greedy tokens and codec codes identical, logits and speech
    within 1e-5 of the PyNative steps', a batch of 2 rows each speaking, sampling with one seed (the code predictor
    too, as released); the same on both ranks; a later
    request of the same shape reuses the graphs; a graph that does not build on rank 1 alone sends both ranks to
    PyNative together, with the same answers."""
    import json
    import subprocess

    from tests.script_runs import calm_msrun, msrun_command, script_env

    log_dir = tmp_path / "log"
    command = msrun_command(
        "tests/mindone_changes/faster/msrun_decode_graphs.py",
        [str(tiny_checkpoint), str(sample_media["image"].parent), mode, str(tmp_path)],
        log_dir,
    )
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=script_env())
    calm_msrun(process, log_dir)
    output = process.communicate(timeout=900)[0].decode(errors="replace")
    assert process.returncode == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    for seen in ranks:
        for name in ("speech", "rows", "sampled"):
            graph, pynative = seen[f"{name}_compiled"], seen[f"{name}_pynative"]
            assert graph["tokens"] == pynative["tokens"], name
            for ours, theirs in zip(graph["logits"], pynative["logits"]):
                assert relative_error(np.array(ours), np.array(theirs)) <= 1e-5, name
            assert graph["codes"] == pynative["codes"], name
            for ours, theirs in zip(graph["wavs"], pynative["wavs"], strict=True):
                assert np.abs(np.array(ours) - np.array(theirs)).max() <= 1e-5, name
        assert len(seen["speech_compiled"]["codes"]) == 1 and len(seen["rows_compiled"]["tokens"]) == 2
        assert len(seen["rows_compiled"]["codes"]) == 2 and all(seen["rows_compiled"]["wavs"])  # every row speaks
        # sampled as released: the code predictor's codes too (the first group is the talker's own choice)
        sampled, greedy = np.array(seen["sampled_compiled"]["codes"][0]), np.array(seen["speech_compiled"]["codes"][0])
        frames = min(sampled.shape[1], greedy.shape[1])  # a sampled talker may choose its end code sooner
        assert (sampled[1:, :frames] != greedy[1:, :frames]).any()
        graphs = seen["thinker_graphs"]
        assert (
            graphs["before"] == graphs["after"] and graphs["same_objects"] and graphs["compiled"] and graphs["before"]
        )
        assert seen["talker_graphs"]
        assert seen["one_rank_fails"]["tokens"] == seen["rows_pynative"]["tokens"]
    assert "injected on rank 1" in ranks[1]["failure"] and ranks[0]["failure"] == "it did not build on another rank"
    assert (
        ranks[0]["sampled_compiled"] == ranks[1]["sampled_compiled"]
        and ranks[0]["speech_compiled"] == ranks[1]["speech_compiled"]
    )
    for rank in (0, 1):
        assert "warning: the compiled decode step did not build" in (log_dir / f"worker_{rank}.log").read_text()
