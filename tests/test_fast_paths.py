"""The broadcast mask builder gives exactly the masks of mindone's per-position loop."""

from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms

from omni_helpers.cpu_fallbacks import install_cpu_fallbacks
from omni_helpers.fast_paths import FAST_PATHS, broadcast_mask

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
    from omni_helpers.sparse_moe import stack_experts

    model = load_model(tiny_checkpoint, "float32", "eager", with_talker=True)
    assert stack_experts(model) == len(model.thinker.model.layers) + len(model.talker.model.layers)
    return {"thinker": model.thinker.model.layers[0].mlp, "talker": model.talker.model.layers[0].mlp}


@pytest.mark.parametrize("which", ["thinker", "talker"])
@pytest.mark.parametrize("tokens", [1, 7, 100])  # 1 and 7: from device indices; 100: the host-read dispatch
def test_stacked_experts_give_mindones_output(moe_blocks, stacked_blocks, which, tokens):
    from omni_helpers.host_syncs import counting_host_syncs
    from omni_helpers.metrics import parameter_bytes

    block, stacked = moe_blocks[which], stacked_blocks[which]
    x = ms.Tensor(np.random.default_rng(tokens).standard_normal((1, tokens, block.gate.weight.shape[1])).astype(np.float32))
    stock = FAST_PATHS.original(f"{type(block).__module__}.{type(block).__name__}:construct")
    expected, expected_logits = stock(block, x)
    with counting_host_syncs() as syncs:
        actual, logits = type(stacked).construct(stacked, x)
    np.testing.assert_array_equal(logits.asnumpy(), expected_logits.asnumpy())
    np.testing.assert_allclose(actual.asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-6)
    device = tokens * block.top_k <= 128
    cpu_only = sum(n for site, n in syncs.sites.items() if "cpu_fallbacks" in site)  # numpy kernels of the CPU fallbacks
    assert (syncs.count - cpu_only == 0) if device else syncs.count - cpu_only >= 1
    assert parameter_bytes(stacked.experts) == sum(parameter_bytes(e) for e in block.experts)  # stacked, not copied
