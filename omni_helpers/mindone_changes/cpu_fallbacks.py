"""CPU implementations of the `mindspore.mint` kernels that MindSpore ships for Ascend only.

mindone's Qwen3-Omni is written against `mindspore.mint`, whose kernels are registered
for Ascend; on MindSpore's CPU backend many are missing ("The kernel Arange unregistered")
and the model cannot even be built. `install_cpu_fallbacks()` puts a CPU implementation
in place of each missing one, computed with the legacy `mindspore.ops` primitives (which
have CPU kernels) or with numpy. Every replacement computes what the op it replaces
computes, with the same dtypes, broadcasting and keyword arguments as mindone calls it.
A few replace CPU kernels that exist but are too slow to use (a cast, a convolution's bias,
code2wav's activation): each says what it measured.

It is one step, called by the runtime setup only when the device is CPU; on Ascend the
real kernels run. The list was found by running the thinker, the talker and code2wav
with `pynative_synchronize=True` on MindSpore 2.7.1.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import ops

from omni_helpers.mindone_changes.library_names import MODELING
from omni_helpers.patching import PatchSet

CPU_FALLBACKS = PatchSet("CPU fallbacks", package="mindspore", written_for="2.7.1")
replaces = CPU_FALLBACKS.replaces
original = CPU_FALLBACKS.original


def install_cpu_fallbacks() -> list[str]:
    """Install every CPU fallback; returns the names of what was replaced. Idempotent."""
    return CPU_FALLBACKS.install()


# ----------------------------------------------------------------------------- helpers


def _np(x):
    return x.asnumpy() if isinstance(x, ms.Tensor) else np.asarray(x)


def _tensor(array: np.ndarray, dtype=None) -> ms.Tensor:
    array = np.asarray(array)
    out = ms.Tensor(np.ascontiguousarray(array) if array.ndim else array)  # ascontiguousarray makes 0-d 1-d
    return out if dtype is None or out.dtype == dtype else out.astype(dtype)


def _scalar(x):
    return x.item() if isinstance(x, ms.Tensor) else x


def _normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# ----------------------------------------------------------------------------- creation


@replaces("mindspore.mint:arange")
def arange(start=0, end=None, step=1, *, dtype=None):
    start, end, step = _scalar(start), _scalar(end), _scalar(step)
    if end is None:
        start, end = 0, start
    values = np.arange(start, end, step)
    if dtype is None:  # integers give int64, any float gives float32, as in mint
        integral = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
        dtype = ms.int64 if integral else ms.float32
    return _tensor(values, dtype)


@replaces("mindspore.mint:linspace")
def linspace(start, end, steps, *, dtype=None):
    values = np.linspace(_scalar(start), _scalar(end), int(_scalar(steps)), dtype=np.float64)
    return _tensor(values.astype(np.float32), dtype or ms.float32)


@replaces("mindspore.mint:empty")
def empty(*size, dtype=None, device=None):
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    return ops.zeros(size, dtype or ms.float32)


@replaces("mindspore.mint:full")
def full(size, fill_value, *, dtype=None):
    fill_value = _scalar(fill_value)
    if dtype is None:
        dtype = ms.bool_ if isinstance(fill_value, bool) else ms.int64 if isinstance(fill_value, int) else ms.float32
    return ops.fill(dtype, tuple(size), fill_value)


@replaces("mindspore.mint:ones_like")
def ones_like(input, *, dtype=None):
    return ops.ones(input.shape, dtype or input.dtype)


@replaces("mindspore.mint:zeros_like")
def zeros_like(input, *, dtype=None):
    return ops.zeros(input.shape, dtype or input.dtype)


@replaces("mindspore.mint:full_like")
def full_like(input, fill_value, *, dtype=None):
    return ops.fill(dtype or input.dtype, input.shape, _scalar(fill_value))


# ----------------------------------------------------------------------------- shape and indexing


@replaces("mindspore.mint:stack")
def stack(tensors, dim=0):
    return ops.Stack(axis=dim)(list(tensors))


_PROMOTION_ORDER = [ms.bool_, ms.uint8, ms.int8, ms.int16, ms.int32, ms.int64, ms.float16, ms.bfloat16, ms.float32]


@replaces("mindspore.mint:cat", "mindspore.mint:concat")
def cat(tensors, dim=0):
    """mint.cat on CPU needs one dtype (mindone joins int32 ids with int64 ones): promote first."""
    tensors = list(tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        target = max(dtypes, key=_PROMOTION_ORDER.index)
        tensors = [t.astype(target) for t in tensors]
    return original("mindspore.mint:cat")(tensors, dim)


@replaces("mindspore.mint:repeat_interleave")
def repeat_interleave(input, repeats, dim=None, *, output_size=None):
    values = _np(input)
    if dim is None:
        values, dim = values.reshape(-1), 0
    return _tensor(np.repeat(values, _np(repeats), axis=dim), input.dtype)


@replaces("mindspore.mint:index_select")
def index_select(input, dim, index):
    return ops.Gather()(input, index, _normalize_dim(dim, input.ndim))


@replaces("mindspore.mint:outer")
def outer(input, vec2):
    return input.reshape(-1, 1) * vec2.reshape(1, -1)


@replaces("mindspore.mint:where")
def where(condition, input=None, other=None):
    if input is None and other is None:  # the one-argument form is nonzero(as_tuple=True)
        indices = np.nonzero(_np(condition))
        return tuple(_tensor(i.astype(np.int64)) for i in indices)
    return original("mindspore.mint:where")(condition, input, other)


@replaces("mindspore.mint.nn.functional:pad", "mindspore.ops.function.nn_func:pad_ext")
def pad(input, pad, mode="constant", value=None):
    """Pad the last len(pad)//2 dimensions; `pad` lists (before, after) from the last dimension."""
    pad = [int(_scalar(p)) for p in pad]
    widths = [(0, 0)] * input.ndim
    for i in range(len(pad) // 2):
        widths[input.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    values = _np(input)
    # Negative padding crops, as in torch.
    crop = tuple(slice(-b if b < 0 else None, a if a < 0 else None) for b, a in widths)
    values = values[crop]
    widths = [(max(b, 0), max(a, 0)) for b, a in widths]
    if mode == "constant":
        out = np.pad(values, widths, mode="constant", constant_values=0 if value is None else value)
    else:
        out = np.pad(values, widths, mode={"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode])
    return _tensor(out, input.dtype)


# ----------------------------------------------------------------------------- reductions and search


def _sum_of_nothing(input, dim, keepdim: bool, dtype):
    """A sum over zero elements: zeros. MindSpore 2.7.1's CPU ReduceSum leaves its output
    uninitialised for an empty input (0, 1 or 16777216 seen for the same call), and mindone
    counts images with such a sum for a batch row that has none."""
    array = np.zeros(tuple(input.shape), dtype=np.int64 if input.dtype in _INTEGRAL else _np(input).dtype)
    axis = None if dim is None else tuple(dim) if isinstance(dim, (tuple, list)) else dim
    out = _tensor(
        np.asarray(array.sum(axis=axis, keepdims=keepdim)), ms.int64 if input.dtype in _INTEGRAL else input.dtype
    )
    return out if dtype is None else out.astype(dtype)


_INTEGRAL = (ms.bool_, ms.int8, ms.int16, ms.int32, ms.int64, ms.uint8)


def _widened(input, dtype):
    """A narrow integer input, which a sum promotes to int64 with a Cast inside (about 400 us on CPU,
    as `tensor_to` explains), widened through numpy first: the same sum, 20 times sooner. Attention
    masks are int32 here, and mindone sums them on every prompt."""
    return input.to(ms.int64) if dtype is None and input.dtype in _INTEGRAL and input.dtype != ms.int64 else input


@replaces("mindspore.mint:sum")
def mint_sum(input, dim=None, keepdim=False, *, dtype=None):
    if input.size == 0:
        return _sum_of_nothing(input, dim, keepdim, dtype)
    return original("mindspore.mint:sum")(_widened(input, dtype), dim, keepdim, dtype=dtype)


@replaces("mindspore.common.tensor.Tensor:sum")
def tensor_sum(self, *args, **kwargs):
    if self.size == 0:
        dim = args[0] if args else kwargs.get("dim", kwargs.get("axis"))
        keepdim = kwargs.get("keepdim", kwargs.get("keepdims", False))
        return _sum_of_nothing(self, dim, keepdim, kwargs.get("dtype"))
    return original("mindspore.common.tensor.Tensor:sum")(_widened(self, kwargs.get("dtype")), *args, **kwargs)


@replaces("mindspore.mint:cumsum")
def cumsum(input, dim, *, dtype=None):
    if dtype is None and input.dtype in (ms.bool_, ms.int8, ms.int16, ms.int32, ms.uint8):
        dtype = ms.int64  # integer inputs accumulate in int64, as in mint
    x = input.astype(dtype) if dtype is not None else input
    return ops.CumSum()(x, _normalize_dim(dim, x.ndim))


@replaces("mindspore.mint:argmax")
def argmax(input, dim=None, keepdim=False):
    values = _np(input)
    if dim is None:
        return _tensor(np.asarray(values.argmax(), dtype=np.int64))
    out = values.argmax(axis=dim)
    if keepdim:
        out = np.expand_dims(out, dim)
    return _tensor(out.astype(np.int64))


@replaces("mindspore.mint:topk")
def topk(input, k, dim=-1, largest=True, sorted=True):
    dim = _normalize_dim(dim, input.ndim)
    last = input.ndim - 1
    x = input if dim == last else input.swapaxes(dim, last)
    values, indices = ops.TopK(sorted=True)(x if largest else -x, int(k))
    if not largest:
        values = -values
    if dim != last:
        values, indices = values.swapaxes(dim, last), indices.swapaxes(dim, last)
    return values, indices.astype(ms.int64)


@replaces("mindspore.mint:sort")
def sort(input, dim=-1, descending=False, stable=False):
    values = _np(input)
    order = np.argsort(-values if descending else values, axis=dim, kind="stable")
    return _tensor(np.take_along_axis(values, order, axis=dim), input.dtype), _tensor(order.astype(np.int64))


@replaces("mindspore.mint:multinomial")
def multinomial(input, num_samples, replacement=False, *, generator=None):
    """Sample with MindSpore's seeded CPU kernel (its int32 result widened to int64, as in mint)."""
    probs = input.astype(ms.float32)
    samples = ops.multinomial(probs, int(num_samples), replacement=replacement)
    return samples.astype(ms.int64)


# ----------------------------------------------------------------------------- nn.functional


@replaces("mindspore.mint.nn.functional:one_hot")
def one_hot(tensor, num_classes=-1):
    if num_classes == -1:
        num_classes = int(_np(tensor).max()) + 1
    on, off = ms.Tensor(1, ms.int64), ms.Tensor(0, ms.int64)
    return ops.OneHot()(tensor.astype(ms.int64), int(num_classes), on, off)


@replaces("mindspore.mint.nn.functional:gelu")
def gelu(input, approximate="none"):
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (input + 0.044715 * input * input * input)
        return 0.5 * input * (1.0 + ops.tanh(inner))
    return 0.5 * input * (1.0 + ops.erf(input / math.sqrt(2.0)))


@replaces("mindspore.mint.nn.functional:dropout")
def dropout(input, p=0.5, training=True, inplace=False):
    if not training or p == 0:
        return input
    keep = np.random.random_sample(input.shape) >= p
    return input * _tensor(keep.astype(np.float32), input.dtype) / (1.0 - p)


@replaces("mindspore.ops:embedding")
def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False):
    """Look-up used by mint.nn.Embedding (inference: max_norm renormalisation not supported)."""
    if max_norm is not None:
        raise NotImplementedError("embedding with max_norm has no CPU fallback")
    return ops.Gather()(weight, input, 0)


@replaces("mindspore.ops:layer_norm")
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm used by mint.nn.LayerNorm, over the trailing `normalized_shape` dimensions."""
    begin = input.ndim - len(tuple(normalized_shape))
    weight = weight if weight is not None else ops.ones(tuple(normalized_shape), input.dtype)
    bias = bias if bias is not None else ops.zeros(tuple(normalized_shape), input.dtype)
    out, _, _ = ops.LayerNorm(begin_norm_axis=begin, begin_params_axis=begin, epsilon=eps)(input, weight, bias)
    return out


# ----------------------------------------------------------------------------- attention


_FLASH_DEFAULTS = {
    "real_shift": None,
    "drop_mask": None,
    "padding_mask": None,
    "prefix": None,
    "actual_seq_qlen": None,
    "actual_seq_kvlen": None,
    "keep_prob": 1.0,
    "pre_tokens": 2147483647,
    "next_tokens": 2147483647,
    "sparse_mode": 0,
}


@replaces("mindspore.ops:flash_attention_score")
def flash_attention_score(
    query,
    key,
    value,
    head_num,
    real_shift=None,
    drop_mask=None,
    padding_mask=None,
    attn_mask=None,
    prefix=None,
    actual_seq_qlen=None,
    actual_seq_kvlen=None,
    keep_prob=1.0,
    scalar_value=1.0,
    pre_tokens=2147483647,
    next_tokens=2147483647,
    inner_precise=0,
    input_layout="BSH",
    sparse_mode=0,
):
    """Ascend's fused attention, computed plainly: softmax(Q K^T * scale, masked) V in float32.

    Layouts BSND and BNSD (what mindone passes); `attn_mask` True (or 1) where a query must not see a key,
    shaped (S_q, S_k), (B, 1, S_q, S_k) or (B, N, S_q, S_k); fewer key/value heads than query
    heads (grouped-query attention). Returns the query's dtype. What mindone's Qwen3-Omni
    never passes (dropout, sparse modes, variable lengths, positional shifts) raises.
    """
    given = {
        "real_shift": real_shift,
        "drop_mask": drop_mask,
        "padding_mask": padding_mask,
        "prefix": prefix,
        "actual_seq_qlen": actual_seq_qlen,
        "actual_seq_kvlen": actual_seq_kvlen,
        "keep_prob": keep_prob,
        "pre_tokens": pre_tokens,
        "next_tokens": next_tokens,
        "sparse_mode": sparse_mode,
    }
    unsupported = [name for name, value in given.items() if not _is_default(value, _FLASH_DEFAULTS[name])]
    if unsupported:
        raise NotImplementedError(f"the CPU flash_attention_score does not support {', '.join(unsupported)}")
    if input_layout not in ("BSND", "BNSD"):
        raise NotImplementedError(f"the CPU flash_attention_score does not support input_layout {input_layout!r}")

    def heads_first(x):  # -> (B, N, S, D) float32
        array = _np(x).astype(np.float32)
        return array.transpose(0, 2, 1, 3) if input_layout == "BSND" else array

    # In numpy: a decode step's attention is a dozen small operations, each costing MindSpore's
    # CPU backend about 25 us to launch; numpy runs the whole of it in less than two of those.
    q, k, v = heads_first(query), heads_first(key), heads_first(value)
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    # grouped-query attention: key/value head j serves query heads j*G ... j*G+G-1, so the query heads
    # are grouped under their key/value head instead of repeating the keys and values
    grouped = q.reshape(batch, kv_heads, heads // kv_heads * q_len, dim)
    scores = (grouped @ k.transpose(0, 1, 3, 2)).reshape(batch, heads, q_len, kv_len) * np.float32(scalar_value)
    if attn_mask is not None:
        scores = np.where(_np(attn_mask).astype(bool), np.finfo(np.float32).min, scores)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    out = (weights.reshape(batch, kv_heads, -1, kv_len) @ v).reshape(batch, heads, q_len, dim)
    if input_layout == "BSND":
        out = out.transpose(0, 2, 1, 3)
    if query.dtype in _CAST_BY_NUMPY:  # the result's cast in numpy too, rather than to a tensor and back
        return _tensor(out.astype(_CAST_BY_NUMPY[query.dtype]))
    return _tensor(out).astype(query.dtype)


# ----------------------------------------------------------------------------- Ascend's MoE kernels
# Stand-ins for the four kernels `parallel.sparse_moe.dispatch_grouped` calls, each computing what its MindSpore
# 2.7.1 docstring says for the forms the project passes; anything else raises. Each runs as one CPU kernel
# (a `Custom` operation of numpy, "pyfunc"), so a MoE layer launches on CPU what it launches on Ascend, one
# kernel per call, and reads nothing back to Python.
_HOST_DTYPES = (ms.float16, ms.float32)  # what numpy computes; Ascend's kernels also take bfloat16
UNSPECIFIED = (np.nan, 65504.0)  # what the grouped product leaves past its groups, row by row in turn


_HOST_KERNELS: dict = {}


def _host_kernel(compute, shapes, dtypes, **settings):
    """`compute(*arrays, **settings)` (numpy in, numpy out) as one CPU kernel, its outputs' shapes and dtypes given
    by `shapes` and `dtypes` from its inputs'; built once per computation and settings."""
    key = (compute, tuple(sorted(settings.items())))
    if key not in _HOST_KERNELS:

        def kernel(*arrays):
            return compute(*arrays, **settings)

        _HOST_KERNELS[key] = ops.Custom(kernel, out_shape=shapes, out_dtype=dtypes, func_type="pyfunc")
    return _HOST_KERNELS[key]


def _refuse_unless(condition: bool, what: str):
    if not condition:
        raise NotImplementedError(f"the CPU stand-in {what}")


@replaces("mindspore.ops:moe_init_routing_v2")
def moe_init_routing_v2(
    x,
    expert_idx,
    active_num,
    expert_capacity,
    expert_num,
    drop_pad_mode,
    expert_tokens_count_or_cumsum_flag,
    expert_tokens_before_capacity_flag,
):
    """Dropless routing (drop_pad_mode 0, active_num 0): the (token, k) slots sorted by expert, stably (slots of
    one expert in token order), each slot's token row copied. Returns (expanded_x (tokens x k, hidden),
    expanded_row_idx (tokens x k,) int32, where expanded_row_idx[t * k + j] is the output row of token t's j-th
    slot, and with flag 1 each expert's cumulative slot count, with flag 2 its slot count, (expert_num,) int32).
    x 2-D float16 or float32; expert_idx (tokens, k) int32 in [0, expert_num). Drop/pad and active modes raise."""
    _refuse_unless(
        (drop_pad_mode, active_num, expert_capacity) == (0, 0, 0), "moe_init_routing_v2 computes dropless routing only"
    )
    _refuse_unless(expert_tokens_count_or_cumsum_flag in (0, 1, 2), "moe_init_routing_v2 takes flags 0, 1 or 2")
    _refuse_unless(x.ndim == 2 and x.dtype in _HOST_DTYPES, "moe_init_routing_v2 takes 2-D float16 or float32 x")
    _refuse_unless(
        expert_idx.ndim == 2 and expert_idx.dtype == ms.int32 and expert_idx.shape[0] == x.shape[0],
        "moe_init_routing_v2 takes (tokens, k) int32 expert_idx",
    )
    flag = expert_tokens_count_or_cumsum_flag
    kernel = _host_kernel(
        _route_dropless,
        lambda x_shape, idx_shape: (
            [idx_shape[0] * idx_shape[1], x_shape[1]],
            [idx_shape[0] * idx_shape[1]],
            [expert_num],
        ),
        lambda x_dtype, idx_dtype: (x_dtype, ms.int32, ms.int32),
        expert_num=expert_num,
        cumulative=flag == 1,
    )
    expanded_x, expanded_row_idx, counts = kernel(x, expert_idx)
    return (expanded_x, expanded_row_idx, counts) if flag else (expanded_x, expanded_row_idx)


def _route_dropless(x, expert_idx, expert_num: int, cumulative: bool):
    experts = expert_idx.reshape(-1)
    if experts.size and (experts.min() < 0 or experts.max() >= expert_num):
        raise ValueError(f"moe_init_routing_v2: expert_idx must lie in [0, {expert_num})")
    slot_of_row = np.argsort(experts, kind="stable")  # output row -> slot (token * k + j)
    row_of_slot = np.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = np.arange(len(slot_of_row))
    counts = np.bincount(experts, minlength=expert_num)
    counts = np.cumsum(counts) if cumulative else counts
    return x[slot_of_row // expert_idx.shape[1]], row_of_slot.astype(np.int32), counts.astype(np.int32)


@replaces("mindspore.ops.auto_generate:grouped_matmul_v4")
def grouped_matmul_v4(
    x,
    weight,
    bias=None,
    scale=None,
    offset=None,
    antiquant_scale=None,
    antiquant_offset=None,
    pre_token_scale=None,
    group_list=None,
    activation_input=None,
    activation_quant_scale=None,
    activation_quant_offset=None,
    split_item=0,
    group_type=-1,
    group_list_type=0,
    act_type=0,
    output_dtype=None,
):
    """The grouped product in its single-tensor form (split_item 3, group_type 0): x a list of one (M, K)
    tensor, weight a list of one (E, K, N) tensor, group_list (E,) int64, each group's size (group_list_type 1) or
    cumulative end (0): group e's rows of x times weight[e]. The groups may end before M; rows past them are not
    computed (unspecified: NaN and 65504 here, row by row in turn). A list of one (M, N) tensor of x's dtype, float16 or
    float32, accumulated in float32. Bias, quantisation, activation and the list form raise."""
    extras = [
        bias, scale, offset, antiquant_scale, antiquant_offset, pre_token_scale, activation_input,
        activation_quant_scale, activation_quant_offset, output_dtype,
    ]  # fmt: skip
    _refuse_unless(
        (split_item, group_type) == (3, 0)
        and group_list is not None
        and all(e is None for e in extras)
        and act_type == 0,
        "grouped_matmul_v4 computes split_item=3, group_type=0 with a group_list only",
    )
    _refuse_unless(len(x) == 1 and len(weight) == 1, "grouped_matmul_v4 takes one x and one weight")
    (rows,), (weights,) = x, weight
    _refuse_unless(
        rows.dtype == weights.dtype and rows.dtype in _HOST_DTYPES and rows.ndim == 2 and weights.ndim == 3,
        "grouped_matmul_v4 takes 2-D x and 3-D weight, both float16 or both float32",
    )
    _refuse_unless(
        group_list.dtype == ms.int64 and group_list.shape == (weights.shape[0],), "takes (E,) int64 group_list"
    )
    _refuse_unless(group_list_type in (0, 1), "grouped_matmul_v4 takes group_list_type 0 or 1")
    kernel = _host_kernel(
        _grouped_product,
        lambda x_shape, w_shape, g_shape: [x_shape[0], w_shape[2]],
        lambda x_dtype, w_dtype, g_dtype: x_dtype,
        sizes=group_list_type == 1,
    )
    return [kernel(rows, weights, group_list)]


def _grouped_product(x, weight, group_list, sizes: bool):
    ends = np.cumsum(group_list) if sizes else group_list
    if np.any(group_list < 0) or np.any(np.diff(ends) < 0) or (len(ends) and ends[-1] > x.shape[0]):
        raise ValueError("grouped_matmul_v4: group_list must not be negative (nor decrease as ends) nor pass x's rows")
    out = np.empty((x.shape[0], weight.shape[2]), np.float32)
    # rows past the groups are left unspecified on Ascend: NaN and a large finite value here, so that a caller
    # relying on them fails on CPU as it would on the device
    past = out[int(ends[-1]) if len(ends) else 0 :]
    past[0::2], past[1::2] = UNSPECIFIED
    start = 0
    for expert, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = x[start:end].astype(np.float32) @ weight[expert].astype(np.float32)
        start = end
    return out.astype(x.dtype)


@replaces("mindspore.ops:swiglu")
def swiglu(input, dim=-1):
    """SiLU of `input`'s first half along `dim` times its second half; float16 or float32."""
    _refuse_unless(input.dtype in _HOST_DTYPES, "swiglu takes float16 or float32")
    axis = _normalize_dim(dim, input.ndim)
    if input.shape[axis] % 2:
        raise RuntimeError(f"swiglu: dimension {dim} ({input.shape[axis]}) is not divisible by 2")
    kernel = _host_kernel(
        _swiglu,
        lambda shape: [n // 2 if i == axis else n for i, n in enumerate(shape)],
        lambda dtype: dtype,
        axis=axis,
    )
    return kernel(input)


def _swiglu(x, axis: int):
    a, b = np.split(x.astype(np.float32), 2, axis=axis)
    return (a / (1 + np.exp(-a)) * b).astype(x.dtype)


@replaces("mindspore.ops:moe_token_unpermute")
def moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """Token t is the sum over j of its rows permuted_tokens[sorted_indices[t * topk + j]], each times
    probs[t, j], in j's order; without probs, topk is 1. The permuted tokens' dtype. Padded mode raises."""
    if padded_mode or restore_shape is not None:
        raise ValueError("moe_token_unpermute: only padded_mode=False is supported")
    if sorted_indices.dtype != ms.int32:
        raise TypeError("moe_token_unpermute: sorted_indices must be int32")
    _refuse_unless(permuted_tokens.dtype in _HOST_DTYPES, "moe_token_unpermute takes float16 or float32 tokens")
    if probs is None:
        probs = ops.ones((sorted_indices.shape[0], 1), permuted_tokens.dtype)
    _refuse_unless(
        sorted_indices.shape[0] == probs.shape[0] * probs.shape[1], "moe_token_unpermute: indices of tokens x topk"
    )
    kernel = _host_kernel(
        _unpermute,
        lambda p_shape, i_shape, w_shape: [i_shape[0] // w_shape[1], p_shape[1]],
        lambda p_dtype, i_dtype, w_dtype: p_dtype,
    )
    return kernel(permuted_tokens, sorted_indices, probs)


def _unpermute(permuted, sorted_indices, probs):
    tokens, topk = probs.shape
    rows = permuted[sorted_indices.astype(np.int64)].reshape(tokens, topk, -1)
    weighted = rows * probs.astype(permuted.dtype)[:, :, None]
    combined = weighted[:, 0]
    for j in range(1, topk):
        combined = combined + weighted[:, j]
    return combined


def _is_default(value, default) -> bool:
    return value is None if default is None else (not isinstance(value, ms.Tensor) and value == default)


def _conv_padding(padding, kernel, dilation, spatial: int):
    if isinstance(padding, str):
        if padding == "valid":
            return "valid", (0,) * (2 * spatial)
        # "same": total padding dilation*(k-1), the extra one on the right, as in torch
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return "pad", tuple(pads)
    padding = (padding,) * spatial if isinstance(padding, int) else tuple(padding)
    return "pad", tuple(p for p in padding for _ in range(2))


def _tuple(value, n: int):
    return (value,) * n if isinstance(value, int) else tuple(value)


def _conv(input, weight, bias, stride, padding, dilation, groups, spatial: int):
    kernel = tuple(weight.shape[2:])
    stride, dilation = _tuple(stride, spatial), _tuple(dilation, spatial)
    pad_mode, pads = _conv_padding(padding, kernel, dilation, spatial)
    if spatial == 2:
        primitive = ops.Conv2D(
            weight.shape[0], kernel, pad_mode=pad_mode, pad=pads, stride=stride, dilation=dilation, group=groups
        )
    else:
        primitive = ops.Conv3D(
            weight.shape[0], kernel, pad_mode=pad_mode, pad=pads, stride=stride, dilation=dilation, group=groups
        )
    return _add_bias(primitive(input, weight), bias)


def _add_bias(out, bias):
    """`out` (rows, channels, ...) plus `bias` per channel, with BiasAdd: MindSpore 2.7.1's CPU add broadcast
    along the channels took 2 ms on code2wav's last convolutions (4 rows of 2 channels by 30,000 samples), 15
    times BiasAdd's, and code2wav makes about 30 such convolutions per decode."""
    if bias is None:
        return out
    return ops.bias_add(out, bias)


@replaces(
    "mindspore.mint.nn.functional:conv2d",
    "mindspore.mint.nn.layer.conv:conv2d_ext_op",
    "mindspore.mint.nn.layer.conv:conv2d_padding_op",
)
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(input, weight, bias, stride, padding, dilation, groups, spatial=2)


@replaces(
    "mindspore.mint.nn.functional:conv3d",
    "mindspore.mint.nn.layer.conv:conv3d_ext_op",
    "mindspore.mint.nn.layer.conv:conv3d_padding_op",
)
def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(input, weight, bias, stride, padding, dilation, groups, spatial=3)


@replaces(
    "mindspore.mint.nn.functional:conv_transpose2d",
    "mindspore.mint.nn.layer.conv:conv_transpose2d",
    "mindone.transformers.mindspore_adapter._conv:conv_transpose2d",
)
def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Transposed 2-D convolution (weight: in, out/groups, kH, kW), as the gradient of conv2d."""
    if groups != 1:
        raise NotImplementedError("conv_transpose2d with groups has no CPU fallback")
    stride, padding = _tuple(stride, 2), _tuple(padding, 2)
    output_padding, dilation = _tuple(output_padding, 2), _tuple(dilation, 2)
    kernel = tuple(weight.shape[2:])
    n, _, h, w = input.shape
    out_h = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kernel[0] - 1) + output_padding[0] + 1
    out_w = (w - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kernel[1] - 1) + output_padding[1] + 1
    pads = (padding[0], padding[0] + output_padding[0], padding[1], padding[1] + output_padding[1])
    primitive = ops.Conv2DTranspose(weight.shape[1], kernel, pad_mode="pad", pad=pads, stride=stride, dilation=dilation)
    return _add_bias(primitive(input, weight, (n, weight.shape[1], out_h, out_w)), bias)


# ----------------------------------------------------------------------------- code2wav's activation


SNAKE_BETA = f"{MODELING}.SnakeBeta:construct"


@replaces(SNAKE_BETA)
def snake_beta(self, hidden_states):
    """code2wav's activation, x + sin(x * e^alpha)^2 / (e^beta + 1e-9) with alpha and beta per channel of
    (rows, channels, samples), in numpy. MindSpore 2.7.1's CPU Sin kernel is not vectorised (2.7 ms for 4
    rows of 2 channels by 30,000 samples; numpy 0.2 ms) and a multiply broadcast along the channels costs
    30 times one of equal shapes, so mindone's form took 9 ms there and this one 0.4. code2wav applies it
    29 times per decode (the tiny checkpoint too), at up to 1920 samples per frame and row: on CPU it was
    most of a streamed emission's time, and grew with the batch's rows. Float32 only (numpy has no
    bfloat16); other dtypes go to mindone's. Its parameters are whole on every rank under ZeRO-3, which
    gathers only its parallel modules' weights."""
    if hidden_states.dtype != ms.float32:
        return original(SNAKE_BETA)(self, hidden_states)
    x = hidden_states.asnumpy()
    alpha = np.exp(self.alpha.asnumpy())[None, :, None]
    inverse_beta = 1.0 / (np.exp(self.beta.asnumpy())[None, :, None] + np.float32(self.no_div_by_zero))
    return _tensor(x + inverse_beta * np.square(np.sin(x * alpha)))


# ----------------------------------------------------------------------------- Tensor methods


# Casts numpy performs exactly as MindSpore's Cast does (float32 to float16 rounds to nearest even, integers
# wrap, anything to bool is "not zero"); float to integer is left to Cast (NaN and overflow are undefined).
_CAST_BY_NUMPY = {
    dtype: ms.dtype_to_nptype(dtype)  # looked up once: dtype_to_nptype takes 50 us a call
    for dtype in (ms.bool_, ms.uint8, ms.int8, ms.int16, ms.int32, ms.int64, ms.float16, ms.float32, ms.float64)
}


@replaces("mindspore.common.tensor.Tensor:to")
def tensor_to(self, *args, **kwargs):
    """A dtype change through numpy. MindSpore 2.7.1's CPU Cast kernel takes about 400 us whatever
    the size (an add takes 25 us, the same cast in numpy 10 us on a decode step's tensors), and
    mindone casts about 20 times per decoded token: the float16 round trips around flash
    attention, masks and ids. Other forms of `to` (devices, copies) go to MindSpore's."""
    dtype = (
        args[0]
        if len(args) == 1 and not kwargs
        else kwargs.get("dtype")
        if set(kwargs) == {"dtype"} and not args
        else None
    )
    if dtype is None or dtype == self.dtype or dtype not in _CAST_BY_NUMPY or self.dtype not in _CAST_BY_NUMPY:
        return original("mindspore.common.tensor.Tensor:to")(self, *args, **kwargs)
    if self.dtype.is_floating_point and not dtype.is_floating_point and dtype != ms.bool_:
        return original("mindspore.common.tensor.Tensor:to")(self, *args, **kwargs)
    with np.errstate(over="ignore"):  # overflow to inf, silently, as Cast does
        return _tensor(_np(self).astype(_CAST_BY_NUMPY[dtype]))


@replaces("mindspore.common.tensor.Tensor:clone")
def clone(self, *, memory_format=None):
    return ops.Identity()(self)


@replaces("mindspore.common.tensor.Tensor:masked_fill_")
def masked_fill_(self, mask, value):
    filled = ops.masked_fill(self, mask, ms.Tensor(_scalar(value), self.dtype))
    self.assign_value(filled)
    return self


@replaces("mindspore.common.tensor.Tensor:index_add_")
def index_add_(self, dim, index, source, *, alpha=1):
    values = _np(self).copy()
    moved = np.moveaxis(values, dim, 0)
    np.add.at(moved, _np(index), np.moveaxis(_np(source) * alpha, dim, 0).astype(values.dtype))
    self.assign_value(_tensor(values, self.dtype))
    return self


@replaces("mindspore.common.tensor.Tensor:scatter_")
def scatter_(self, dim, index, src=None, *, value=None, reduce=None):
    """In-place scatter (src a tensor or a number), as the repetition penalty uses it."""
    if reduce is not None:
        raise NotImplementedError("scatter_ with reduce has no CPU fallback")
    source = src if src is not None else value
    if not isinstance(source, ms.Tensor):
        source = ops.fill(self.dtype, index.shape, _scalar(source))
    out = ops.tensor_scatter_elements(self, index.astype(ms.int64), source.astype(self.dtype), axis=dim)
    self.assign_value(out)
    return self


@replaces("mindspore.common.tensor.Tensor:repeat")
def tensor_repeat(self, *repeats):
    """torch-style repeat: tile the tensor `repeats` times along each dimension."""
    if len(repeats) == 1 and isinstance(repeats[0], (tuple, list)):
        repeats = tuple(repeats[0])
    return ops.tile(self, tuple(int(r) for r in repeats))


def _is_full_slice(index) -> bool:
    return isinstance(index, slice) and index == slice(None)


@replaces("mindspore.common.tensor.Tensor:__getitem__")
def tensor_getitem(self, index):
    """`x[mask, :]` with a boolean mask of two or more dimensions gives a wrongly shaped result
    on CPU ((6, 58) instead of (6, 64) for x (1, 58, 64)); trailing full slices add nothing,
    so index with the mask alone."""
    if (
        isinstance(index, tuple)
        and len(index) > 1
        and isinstance(index[0], ms.Tensor)
        and index[0].dtype == ms.bool_
        and all(_is_full_slice(i) for i in index[1:])
    ):
        index = index[0]
    return original("mindspore.common.tensor.Tensor:__getitem__")(self, index)
