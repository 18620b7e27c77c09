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
