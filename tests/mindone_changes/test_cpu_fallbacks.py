"""Each CPU fallback against numpy (or a legacy `ops` kernel), in the argument forms mindone uses."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import mint

from omni_helpers.mindone_changes import cpu_fallbacks as fb

ms.set_device("CPU")
RNG = np.random.default_rng(0)


def t(array):
    return ms.Tensor(np.asarray(array))


def test_install_replaces_mint_and_is_reversible():
    fb.install_cpu_fallbacks()
    assert mint.arange is fb.arange and ms.Tensor.clone is fb.clone
    fb.CPU_FALLBACKS.uninstall()
    assert mint.arange is not fb.arange
    with pytest.raises(RuntimeError, match="Arange"):
        mint.arange(3).asnumpy()  # the reason the fallbacks exist (errors surface at the sync)
    fb.install_cpu_fallbacks()


def test_arange_forms_and_dtypes():
    assert fb.arange(5).asnumpy().tolist() == [0, 1, 2, 3, 4] and fb.arange(5).dtype == ms.int64
    assert fb.arange(2, 8, 3).asnumpy().tolist() == [2, 5]
    assert fb.arange(0, 1, 0.25).dtype == ms.float32
    assert fb.arange(4, dtype=ms.float32).asnumpy().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert fb.arange(t(3)).asnumpy().tolist() == [0, 1, 2]  # a 0-d tensor as the end
    assert fb.arange(start=1, end=4).asnumpy().tolist() == [1, 2, 3]


def test_linspace():
    np.testing.assert_allclose(fb.linspace(0, 1, 5).asnumpy(), np.linspace(0, 1, 5), rtol=1e-6)


def test_creation_like():
    x = t(RNG.standard_normal((2, 3)).astype(np.float32))
    assert fb.ones_like(x).asnumpy().tolist() == [[1.0] * 3] * 2
    assert fb.zeros_like(x, dtype=ms.int64).dtype == ms.int64
    assert fb.full_like(x, 7).asnumpy().tolist() == [[7.0] * 3] * 2
    assert fb.full((2, 2), 3).dtype == ms.int64 and fb.full((2,), 1.5).asnumpy().tolist() == [1.5, 1.5]
    assert fb.empty(2, 3).shape == (2, 3) and fb.empty((4,), dtype=ms.int32).dtype == ms.int32


def test_stack_and_mixed_dtype_cat():
    a, b = RNG.standard_normal((2, 3)).astype(np.float32), RNG.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(fb.stack([t(a), t(b)], dim=1).asnumpy(), np.stack([a, b], axis=1))
    ids = fb.cat([t(np.array([[1, 2]], np.int32)), t(np.array([[3]], np.int64))], dim=-1)
    assert ids.dtype == ms.int64 and ids.asnumpy().tolist() == [[1, 2, 3]]


def test_repeat_interleave():
    x = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(fb.repeat_interleave(t(x), 2, dim=0).asnumpy(), np.repeat(x, 2, axis=0))
    np.testing.assert_array_equal(
        fb.repeat_interleave(t(x), t([1, 2, 0]), dim=1).asnumpy(), np.repeat(x, [1, 2, 0], axis=1)
    )
    np.testing.assert_array_equal(fb.repeat_interleave(t(x), 2).asnumpy(), np.repeat(x.reshape(-1), 2))


def test_index_select_outer_where():
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(fb.index_select(t(x), -1, t([3, 0])).asnumpy(), x[:, [3, 0]])
    a, b = np.arange(3, dtype=np.float32), np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(fb.outer(t(a), t(b)).asnumpy(), np.outer(a, b))
    rows, cols = fb.where(t(x > 0))
    np.testing.assert_array_equal(rows.asnumpy(), np.nonzero(x > 0)[0])
    np.testing.assert_array_equal(cols.asnumpy(), np.nonzero(x > 0)[1])
    np.testing.assert_array_equal(fb.where(t(x > 0), t(x), 0.0).asnumpy(), np.where(x > 0, x, 0))


@pytest.mark.parametrize(
    "pad,mode,value",
    [
        ((1, 2), "constant", None),
        ((0, 0, 2, 1), "constant", -1.0),
        ((2, 0), "replicate", None),
        ((1, 1), "reflect", None),
        ((-1, 2), "constant", 0.0),
    ],
)
def test_pad(pad, mode, value):
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    widths = [(0, 0)] * 3
    for i in range(len(pad) // 2):
        widths[2 - i] = (pad[2 * i], pad[2 * i + 1])
    crop = tuple(slice(-b if b < 0 else None, a if a < 0 else None) for b, a in widths)
    widths = [(max(b, 0), max(a, 0)) for b, a in widths]
    numpy_mode = {"constant": "constant", "replicate": "edge", "reflect": "reflect"}[mode]
    kwargs = {"constant_values": value or 0} if mode == "constant" else {}
    expected = np.pad(x[crop], widths, mode=numpy_mode, **kwargs)
    np.testing.assert_array_equal(fb.pad(t(x), pad, mode=mode, value=value).asnumpy(), expected)


def test_cumsum_argmax_topk_sort():
    ids = np.array([[1, 0, 1, 1]], np.int32)
    out = fb.cumsum(t(ids), dim=-1)
    assert out.dtype == ms.int64 and out.asnumpy().tolist() == [[1, 1, 2, 3]]
    x = RNG.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_allclose(fb.cumsum(t(x), 0).asnumpy(), np.cumsum(x, 0), rtol=1e-6)
    assert fb.argmax(t(x), dim=-1).asnumpy().tolist() == x.argmax(-1).tolist()
    assert fb.argmax(t(x), dim=-1, keepdim=True).shape == (3, 1) and fb.argmax(t(x), dim=-1).dtype == ms.int64
    values, indices = fb.topk(t(x), 2)
    np.testing.assert_array_equal(indices.asnumpy(), np.argsort(-x, axis=-1)[:, :2])
    np.testing.assert_array_equal(values.asnumpy(), -np.sort(-x, axis=-1)[:, :2])
    values, indices = fb.topk(t(x), 1, dim=0, largest=False)
    np.testing.assert_array_equal(indices.asnumpy(), x.argmin(0)[None])
    values, indices = fb.sort(t(x), dim=-1, descending=True)
    np.testing.assert_array_equal(values.asnumpy(), -np.sort(-x, axis=-1))


def test_multinomial_samples_from_the_distribution():
    ms.set_seed(0)
    probs = t(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32))
    out = fb.multinomial(probs, 1)
    assert out.dtype == ms.int64 and out.asnumpy().tolist() == [[1], [2]]


def test_one_hot_gelu_dropout():
    out = fb.one_hot(t(np.array([0, 2], np.int64)), 3)
    assert out.dtype == ms.int64 and out.asnumpy().tolist() == [[1, 0, 0], [0, 0, 1]]
    assert fb.one_hot(t(np.array([1], np.int64))).shape == (1, 2)
    x = np.linspace(-3, 3, 13).astype(np.float32)
    from math import erf, pi, sqrt, tanh

    exact = [0.5 * v * (1 + erf(v / sqrt(2))) for v in x]
    approx = [0.5 * v * (1 + tanh(sqrt(2 / pi) * (v + 0.044715 * v**3))) for v in x]
    np.testing.assert_allclose(fb.gelu(t(x)).asnumpy(), exact, atol=1e-5)  # float32 erf
    np.testing.assert_allclose(fb.gelu(t(x), approximate="tanh").asnumpy(), approx, atol=1e-5)
    assert fb.dropout(t(x), p=0.5, training=False) is not None
    np.testing.assert_array_equal(fb.dropout(t(x), p=0.5, training=False).asnumpy(), x)


def test_embedding_and_layer_norm():
    weight = RNG.standard_normal((10, 4)).astype(np.float32)
    ids = np.array([[1, 9, 1]], np.int64)
    np.testing.assert_array_equal(fb.embedding(t(ids), t(weight)).asnumpy(), weight[ids])
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    g, b = RNG.standard_normal(4).astype(np.float32), RNG.standard_normal(4).astype(np.float32)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b
    np.testing.assert_allclose(fb.layer_norm(t(x), (4,), t(g), t(b), 1e-5).asnumpy(), expected, atol=1e-5)
    # Through the module mindone builds (mint.nn.LayerNorm, mint.nn.Embedding)
    fb.install_cpu_fallbacks()
    norm = mint.nn.LayerNorm(4)
    np.testing.assert_allclose(
        norm(t(x)).asnumpy(), (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5), atol=1e-5
    )
    assert mint.nn.Embedding(10, 4)(t(ids)).shape == (1, 3, 4)


def _numpy_conv2d(x, w, stride, padding):
    x = np.pad(x, [(0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1])])
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = (h - kh) // stride[0] + 1, (wd - kw) // stride[1] + 1
    out = np.zeros((n, o, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * stride[0] : i * stride[0] + kh, j * stride[1] : j * stride[1] + kw]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return out


def test_conv2d_as_the_audio_encoder_calls_it():
    x = RNG.standard_normal((2, 1, 8, 10)).astype(np.float32)
    w = RNG.standard_normal((3, 1, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(3).astype(np.float32)
    out = fb.conv2d(t(x), t(w), t(b), stride=(2, 2), padding=(1, 1))
    expected = _numpy_conv2d(x, w, (2, 2), (1, 1)) + b[None, :, None, None]
    np.testing.assert_allclose(out.asnumpy(), expected, atol=1e-4)


def test_conv3d_as_the_vision_patch_embed_calls_it():
    x = RNG.standard_normal((4, 3, 2, 4, 4)).astype(np.float32)
    w = RNG.standard_normal((5, 3, 2, 4, 4)).astype(np.float32)
    b = RNG.standard_normal(5).astype(np.float32)
    out = fb.conv3d(t(x), t(w), t(b), stride=(2, 4, 4))
    expected = (np.einsum("ncthw,octhw->no", x, w) + b)[:, :, None, None, None]
    np.testing.assert_allclose(out.asnumpy(), expected, atol=1e-4)


def test_conv_transpose2d_as_code2wav_calls_it():
    # code2wav upsamples with ConvTranspose1d(k=2*s, stride=s) run as 2-D with a height of 1.
    x = RNG.standard_normal((1, 3, 1, 5)).astype(np.float32)
    w = RNG.standard_normal((3, 2, 1, 4)).astype(np.float32)
    b = RNG.standard_normal(2).astype(np.float32)
    out = fb.conv_transpose2d(t(x), t(w), t(b), stride=(1, 2), padding=(0, 0))
    expected = np.zeros((1, 2, 1, (5 - 1) * 2 + 4), np.float32)
    for i in range(5):
        expected[:, :, 0, 2 * i : 2 * i + 4] += np.einsum("nc,cok->nok", x[:, :, 0, i], w[:, :, 0, :])
    expected += b[None, :, None, None]
    np.testing.assert_allclose(out.asnumpy(), expected, atol=1e-4)


def test_code2wavs_activation_is_mindones_in_float32_and_mindones_own_in_bfloat16():
    from mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import SnakeBeta

    activation = SnakeBeta(3)
    activation.alpha.set_data(t(RNG.standard_normal(3).astype(np.float32)))
    activation.beta.set_data(t(RNG.standard_normal(3).astype(np.float32)))
    x = t(3 * RNG.standard_normal((2, 3, 500)).astype(np.float32))
    mindones = fb.original(fb.SNAKE_BETA)
    np.testing.assert_allclose(fb.snake_beta(activation, x).asnumpy(), mindones(activation, x).asnumpy(), atol=1e-5)
    half = x.astype(ms.bfloat16)
    np.testing.assert_array_equal(
        fb.snake_beta(activation, half).float().asnumpy(), mindones(activation, half).float().asnumpy()
    )


def test_tensor_methods():
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    original = t(x)
    copy = fb.clone(original)
    fb.masked_fill_(copy, t(x > 0), 0.0)
    np.testing.assert_array_equal(copy.asnumpy(), np.where(x > 0, 0, x))
    np.testing.assert_array_equal(original.asnumpy(), x)  # clone did not alias

    target = t(np.zeros((3, 4), np.float32))
    fb.index_add_(target, 0, t(np.array([2, 0, 2])), t(x))
    expected = np.zeros((3, 4), np.float32)
    np.add.at(expected, [2, 0, 2], x)
    np.testing.assert_allclose(target.asnumpy(), expected, rtol=1e-6)

    scores = t(x.copy())
    fb.scatter_(scores, 1, t(np.array([[0], [1], [3]])), t(np.array([[9.0], [8.0], [7.0]], np.float32)))
    expected = x.copy()
    expected[[0, 1, 2], [0, 1, 3]] = [9, 8, 7]
    np.testing.assert_array_equal(scores.asnumpy(), expected)

    np.testing.assert_array_equal(fb.tensor_repeat(t(x), 2, 1).asnumpy(), np.tile(x, (2, 1)))
    np.testing.assert_array_equal(fb.tensor_repeat(t(x), (1, 3)).asnumpy(), np.tile(x, (1, 3)))


def test_boolean_mask_with_trailing_full_slice():
    x = RNG.standard_normal((1, 58, 64)).astype(np.float32)
    mask = np.zeros((1, 58), bool)
    mask[0, 3:9] = True
    np.testing.assert_array_equal(fb.tensor_getitem(t(x), (t(mask), slice(None))).asnumpy(), x[mask, :])
    np.testing.assert_array_equal(fb.tensor_getitem(t(x), (0, slice(1, 3))).asnumpy(), x[0, 1:3])


def test_a_sum_over_nothing_is_zero_every_time():
    """MindSpore 2.7.1's CPU kernel leaves it uninitialised (0, 1, 16777216 ... for the same call)."""
    from mindspore import mint

    empty_bool, empty_rows = t(np.zeros((0,), bool)), t(np.zeros((0, 3), np.float32))
    for _ in range(50):
        assert fb.tensor_sum(empty_bool).asnumpy().item() == 0 and fb.tensor_sum(empty_bool).dtype == ms.int64
        assert fb.mint_sum(empty_bool).shape == () and fb.mint_sum(empty_bool).asnumpy().item() == 0
    np.testing.assert_array_equal(fb.tensor_sum(empty_rows, 0).asnumpy(), np.zeros(3, np.float32))
    assert fb.tensor_sum(empty_rows, dim=1, keepdim=True).shape == (0, 1)
    full = t(np.ones((2, 3), np.float32))
    assert mint.sum(full).asnumpy().item() == 6.0 and full.sum(axis=1).asnumpy().tolist() == [3.0, 3.0]


def test_a_narrow_integer_sum_is_widened_first_and_gives_the_promoted_sum():
    """An int32 (or bool, ...) sum is promoted to int64 by a 400 us Cast; the fallback widens through numpy."""
    for dtype in (np.int32, np.int8, np.uint8, np.bool_):
        array = RNG.integers(0, 2 if dtype is np.bool_ else 100, (3, 7)).astype(dtype)
        stock_whole = fb.CPU_FALLBACKS.original("mindspore.common.tensor.Tensor:sum")(t(array))
        stock_rows = fb.CPU_FALLBACKS.original("mindspore.mint:sum")(t(array), -1, True)
        assert fb.tensor_sum(t(array)).dtype == stock_whole.dtype == ms.int64
        assert fb.tensor_sum(t(array)).asnumpy().item() == stock_whole.asnumpy().item() == array.astype(np.int64).sum()
        assert fb.mint_sum(t(array), -1, True).dtype == stock_rows.dtype == ms.int64
        np.testing.assert_array_equal(fb.mint_sum(t(array), dim=-1, keepdim=True).asnumpy(), stock_rows.asnumpy())
        np.testing.assert_array_equal(fb.tensor_sum(t(array), dim=0).asnumpy(), array.astype(np.int64).sum(0))
    assert fb.tensor_sum(t(np.ones((2, 2), np.int32)), dtype=ms.float32).dtype == ms.float32  # an asked dtype is kept


CAST_SOURCES = {
    "float32": np.concatenate(
        [
            RNG.standard_normal(200) * 1e3,
            [0.0, -0.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504, 7e4, -7e4, np.inf, -np.inf, 6e-8, 1e-9],
        ]
    ).astype(np.float32),
    "float16": (RNG.standard_normal(200) * 50).astype(np.float16),
    "int64": np.concatenate([RNG.integers(-(2**40), 2**40, 200), [0, 2**31, -(2**31) - 1, 255, 256]]).astype(np.int64),
    "int32": RNG.integers(-(2**31), 2**31 - 1, 200).astype(np.int32),
    "bool": RNG.random(200) > 0.5,
}
CAST_TARGETS = ["float32", "float16", "int64", "int32", "uint8", "bool"]


@pytest.mark.parametrize("source", sorted(CAST_SOURCES))
@pytest.mark.parametrize("target", CAST_TARGETS)
def test_casts_through_numpy_equal_mindspores_cast(source, target):
    """Bit for bit: float16 rounding (to nearest even, overflow to inf), integer wrapping, nonzero as True.
    Float to integer (undefined for NaN and overflow) stays with MindSpore's kernel."""
    x = t(CAST_SOURCES[source])
    dtype = getattr(ms, "bool_" if target == "bool" else target)
    expected = fb.original("mindspore.common.tensor.Tensor:to")(x, dtype)
    actual = fb.tensor_to(x, dtype)
    assert actual.dtype == expected.dtype == dtype
    np.testing.assert_array_equal(actual.asnumpy(), expected.asnumpy())
    assert fb.tensor_to(x, dtype=dtype).dtype == dtype and fb.tensor_to(t(CAST_SOURCES[source][0]), dtype).shape == ()
