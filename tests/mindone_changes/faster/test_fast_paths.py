"""The broadcast mask builder gives exactly the masks of mindone's per-position loop."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from omni_helpers.mindone_changes.cpu_fallbacks import install_cpu_fallbacks
from omni_helpers.mindone_changes.faster.fast_paths import FAST_PATHS, broadcast_mask

ms.set_device("CPU")
install_cpu_fallbacks()


def mask_functions():
    from mindone.transformers import masking_utils as mu

    padding = ms.Tensor(np.array([[False, True, True, True, True, True], [True, True, True, True, False, True]]))
    return {
        "causal": mu.causal_mask_function,
        "sliding": mu.sliding_window_causal_mask_function(2),
        "causal+padding": mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(padding)),
    }


@pytest.mark.parametrize("name", ["causal", "sliding", "causal+padding"])
@pytest.mark.parametrize("q_start,q_len", [(0, 6), (5, 1), (3, 2)])
def test_broadcast_mask_equals_mindone_loop(name, q_start, q_len):
    loop = FAST_PATHS.original("mindone.transformers.masking_utils:_vmap_patch")
    function = mask_functions()[name]
    batch, heads = ms.Tensor(np.arange(2)), ms.Tensor(np.arange(1))
    cache_position = ms.Tensor(np.arange(q_start, q_start + q_len))
    kv = ms.Tensor(np.arange(6))
    expected = loop(function, batch, heads, cache_position, kv).asnumpy()
    actual = broadcast_mask(function, batch, heads, cache_position, kv).asnumpy()
    assert actual.shape == expected.shape == (2, 1, q_len, 6)
    np.testing.assert_array_equal(actual, expected)


@pytest.fixture(scope="module")
def moe_blocks(mindone_model):
    return {"thinker": mindone_model.thinker.model.layers[0].mlp, "talker": mindone_model.talker.model.layers[0].mlp}


@pytest.mark.parametrize("which", ["thinker", "talker"])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_moe_dispatch_equals_mindone_loop(moe_blocks, which, tokens):
    block = moe_blocks[which]
    hidden = block.gate.weight.shape[1]
    x = ms.Tensor(np.random.default_rng(tokens).standard_normal((1, tokens, hidden)).astype(np.float32))
    stock = FAST_PATHS.original(f"{type(block).__module__}.{type(block).__name__}:construct")
    expected, expected_logits = stock(block, x)
    actual, logits = type(block).construct(block, x)  # the installed fast path
    assert type(block).construct is not stock
    np.testing.assert_array_equal(logits.asnumpy(), expected_logits.asnumpy())
    np.testing.assert_allclose(actual.asnumpy(), expected.asnumpy(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def stacked_blocks(tiny_checkpoint, runtime_cpu):
    """A second model whose experts are stacked, as shard_model leaves them for --parallel none and expert."""
    from omni_helpers.loading import load_model
    from omni_helpers.parallel.sparse_moe import stack_experts

    model = load_model(tiny_checkpoint, "float32", "eager", with_talker=True)
    assert stack_experts(model) == len(model.thinker.model.layers) + len(model.talker.model.layers)
    return {"thinker": model.thinker.model.layers[0].mlp, "talker": model.talker.model.layers[0].mlp}


@pytest.mark.parametrize("which", ["thinker", "talker"])
@pytest.mark.parametrize("rows,length", [(1, 1), (7, 1), (1, 7), (1, 100)])  # decode steps from device indices
@pytest.mark.parametrize("prompts", ["grouped", "loop"])  # prompts grouped on the device, or read once
def test_stacked_experts_give_mindones_output(moe_blocks, stacked_blocks, which, rows, length, prompts, monkeypatch):
    from omni_helpers.measuring.host_syncs import counting_host_syncs
    from omni_helpers.measuring.metrics import parameter_bytes
    from omni_helpers.parallel import sparse_moe

    monkeypatch.setattr(sparse_moe, "PROMPT_DISPATCH", prompts)

    block, stacked = moe_blocks[which], stacked_blocks[which]
    shape = (rows, length, block.gate.weight.shape[1])
    x = ms.Tensor(np.random.default_rng(rows * length).standard_normal(shape).astype(np.float32))
    stock = FAST_PATHS.original(f"{type(block).__module__}.{type(block).__name__}:construct")
    expected, expected_logits = stock(block, x)
    with counting_host_syncs() as syncs:
        actual, logits = type(stacked).construct(stacked, x)
    np.testing.assert_array_equal(logits.asnumpy(), expected_logits.asnumpy())
    np.testing.assert_allclose(actual.asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-6)
    cpu_only = sum(
        n for site, n in syncs.sites.items() if "cpu_fallbacks" in site
    )  # numpy kernels of the CPU fallbacks
    assert syncs.count - cpu_only == (1 if length > 1 and prompts == "loop" else 0)
    assert parameter_bytes(stacked.experts) == sum(parameter_bytes(e) for e in block.experts)  # stacked, not copied


# ----------------------------------------------------------------------------- the decode loop and the talker's step


def test_code_predictor_loop_gives_mindones_generate(mindone_model):
    """The fixed greedy loop chooses the codes mindone's `generate` chooses, and hands back the
    embeddings mindone takes from its hidden states."""
    from omni_helpers.mindone_changes.faster.decode_steps import predict_residual_codes
    from omni_helpers.mindone_changes.faster.fast_paths import install_fast_paths, uninstall_fast_paths

    predictor = mindone_model.talker.code_predictor
    groups = predictor.config.num_code_groups - 1
    rng = np.random.default_rng(3)
    embeds = ms.Tensor(rng.standard_normal((1, 2, predictor.config.hidden_size)).astype(np.float32))
    uninstall_fast_paths()
    try:
        stock = predictor.generate(
            inputs_embeds=embeds,
            max_new_tokens=groups,
            do_sample=False,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
    finally:
        install_fast_paths("CPU")
    codes, code_embeds = predict_residual_codes(predictor, embeds)
    assert codes.shape == (1, groups)
    np.testing.assert_array_equal(codes.asnumpy(), stock.sequences.asnumpy())
    expected = [hidden[0] for hidden in stock.hidden_states[1:]]
    expected.append(predictor.get_input_embeddings()[-1](stock.sequences[..., -1:]))
    assert len(code_embeds) == len(expected) == groups
    for actual, wanted in zip(code_embeds, expected):
        np.testing.assert_array_equal(actual.asnumpy(), wanted.asnumpy())


@pytest.fixture(scope="module")
def one_process(tiny_checkpoint, sample_media):
    from tests.reference import MindOne, processor_inputs, request_conversation

    model = MindOne(tiny_checkpoint)
    return model, processor_inputs(tiny_checkpoint, request_conversation("image_audio", sample_media), False)


def device_reads(one_process, **settings) -> int:
    """Host reads of one generation, leaving out the CPU fallbacks' numpy kernels (which Ascend does not run)."""
    from omni_helpers.generation.core import generate_from_inputs
    from omni_helpers.measuring.host_syncs import counting_host_syncs
    from omni_helpers.request.settings import GenerationSettings

    model, inputs = one_process
    with counting_host_syncs() as syncs:
        generate_from_inputs(
            model.model, model.processor, inputs, GenerationSettings(use_audio_in_video=False, **settings)
        )
    return syncs.count - sum(n for site, n in syncs.sites.items() if "cpu_fallbacks" in site)


def test_one_host_read_per_decoded_token(one_process):
    """The stopping test is the only read a decoding step makes (the compiled decode step included:
    both lengths share its graph, built by the first call)."""
    device_reads(one_process, max_new_tokens=9)
    many = device_reads(one_process, max_new_tokens=17)
    few = device_reads(one_process, max_new_tokens=9)
    assert many - few == 8


def test_one_host_read_per_talker_frame(one_process):
    """A talker step, its code predictor included, reads once: its own stopping test."""
    device_reads(
        one_process, max_new_tokens=2, return_audio=True, talker_max_new_tokens=2
    )  # compiles the thinker's step
    many = device_reads(one_process, max_new_tokens=2, return_audio=True, talker_max_new_tokens=10)
    two = device_reads(one_process, max_new_tokens=2, return_audio=True, talker_max_new_tokens=2)
    assert many - two == 8


def test_a_prompt_reads_the_host_only_for_its_stopping_test_and_its_answer(one_process):
    """An image + audio prompt run to its first token: the prompt's forward reads nothing back (ids and masks
    come with their host copies, the special tokens are checked on the host), the loop reads its stopping
    test once and the answer is read once."""
    device_reads(one_process, max_new_tokens=1)
    assert device_reads(one_process, max_new_tokens=1) == 2


@pytest.mark.parametrize(
    "tokens",
    [
        {"eos_token_id": 7, "pad_token_id": None},
        {"eos_token_id": [7, 3], "pad_token_id": 0, "bos_token_id": 1},
        {"eos_token_id": [-1], "pad_token_id": None},
        {"eos_token_id": None, "pad_token_id": 5},
    ],
)
def test_special_tokens_are_mindones_without_a_host_read(tokens, runtime_cpu):
    from mindone.transformers.generation.utils import GenerationMixin
    from transformers import GenerationConfig

    from omni_helpers.measuring.host_syncs import counting_host_syncs

    model = type("Model", (), {"config": type("Config", (), {"is_encoder_decoder": False})()})()
    stock = FAST_PATHS.original("mindone.transformers.generation.utils.GenerationMixin:_prepare_special_tokens")
    expected, got = GenerationConfig(**tokens), GenerationConfig(**tokens)
    stock(model, expected, True)
    with counting_host_syncs() as syncs:
        GenerationMixin._prepare_special_tokens(model, got, True)
    assert syncs.count == 0
    for name in ("_bos_token_tensor", "_eos_token_tensor", "_pad_token_tensor", "_decoder_start_token_tensor"):
        want, have = getattr(expected, name), getattr(got, name)
        assert (want is None) == (have is None), name
        if want is not None:
            assert have.dtype == want.dtype and have.shape == want.shape
            np.testing.assert_array_equal(have.asnumpy(), want.asnumpy())


def test_end_token_test_equals_mindones():
    from mindone.transformers.generation.stopping_criteria import EosTokenCriteria

    ids = ms.Tensor(np.array([[5, 7, 2], [5, 9, 4], [1, 1, 7], [0, 0, 0]], dtype=np.int64))
    stock = FAST_PATHS.original("mindone.transformers.generation.stopping_criteria.EosTokenCriteria:__call__")
    for eos in (2, [2, 7], [9]):
        criterion = EosTokenCriteria(eos)
        expected = stock(criterion, ids, None).asnumpy()
        np.testing.assert_array_equal(criterion(ids, None).asnumpy(), expected)
    assert criterion(ids, None).asnumpy().tolist() == [False, False, False, False]
    assert EosTokenCriteria([2, 7])(ids, None).asnumpy().tolist() == [True, False, True, False]


def test_suppressed_tokens_equal_mindones_and_their_mask_is_built_once(runtime_cpu):
    from mindone.transformers.generation.logits_process import SuppressTokensLogitsProcessor

    from omni_helpers.mindone_changes.faster.fast_paths import SUPPRESS

    suppressed = [3, *range(10, 30), 49]
    scores = ms.Tensor(np.random.default_rng(0).standard_normal((2, 50)).astype(np.float32))
    processor = SuppressTokensLogitsProcessor(iter(suppressed))  # any iterable, as mindone takes it
    expected = FAST_PATHS.original(f"{SUPPRESS}:__call__")(processor, None, scores).asnumpy()
    ours = processor(None, scores).asnumpy()
    np.testing.assert_array_equal(ours, expected)
    assert np.isneginf(ours[:, suppressed]).all() and np.isfinite(np.delete(ours, suppressed, axis=1)).all()
    mask = processor.suppressed_mask
    processor(None, scores)
    assert processor.suppressed_mask is mask


@pytest.mark.parametrize("kv_length", [1, 6])
def test_a_decode_steps_flash_mask_equals_the_mask_function_over_every_key(kv_length, runtime_cpu):
    """The shortcut for one causal query (the newest token) gives the mask the full evaluation gives."""
    from mindone.transformers import masking_utils

    from omni_helpers.mindone_changes import mindone_fixes
    from omni_helpers.mindone_changes.faster.fast_paths import decode_step_mask_applies, flash_attention_mask

    rows = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1]], bool)
    padding = ms.Tensor(rows[:, -kv_length:])  # as mindone hands it over: boolean
    query = ms.Tensor(np.array([kv_length - 1]))
    assert decode_step_mask_applies(query, kv_length, 0, masking_utils.causal_mask_function, padding)
    shortcut = flash_attention_mask(3, query, kv_length, 0, masking_utils.causal_mask_function, padding)
    everywhere = mindone_fixes.flash_attention_mask(3, query, kv_length, 0, masking_utils.causal_mask_function, padding)
    assert shortcut.shape == everywhere.shape == (3, 1, 1, kv_length)
    np.testing.assert_array_equal(shortcut.asnumpy(), everywhere.asnumpy())
    assert not decode_step_mask_applies(ms.Tensor(np.array([4, 5])), 6, 0, None, padding)  # a prompt: the full path
