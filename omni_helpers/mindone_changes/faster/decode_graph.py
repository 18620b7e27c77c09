"""The thinker's and the talker's decode steps compiled into one graph each, on KV caches
written in place (a faster path, every device).

Why: in PyNative each operation is a launch from Python, and a decode step is about 90 of
them per layer (norms, projections, rope, attention, routing, experts); a talker step adds
its code predictor, a small transformer run once per residual code (15 per frame in the
released model). On this 2-core CPU that launch cost, not arithmetic, is the decode time.
Compiled with `mindspore.jit`, a whole step (every layer and the heads; for the talker the
code predictor's loop too) is one call. MindSpore compiles it once per shape (rows, cache
capacity), and the model keeps the graph for later requests.

A graph needs static shapes, so the KV caches are pre-allocated:
- at a stage's first decode step each layer's keys and values from the prompt are copied
  into buffers as long as the whole request (prompt plus new tokens, rounded up to
  `CAPACITY_STEP` so requests of similar lengths share a graph);
- each step writes its key and value at its position in place (`ScatterNdUpdate`) and
  attends over the buffer with an additive mask: left padding and positions not yet
  written count nothing, so a step's cost grows with the context only through attention;
- the code predictor starts from an empty cache every frame: its buffer is as long as a
  frame's codes, its mask cleared at the start of each frame.

The graph computes what mindone's layers compute, in the same order and dtypes (RMS norms
in float32, the routers' softmax in float32, the top-k weights renormalised, experts added
in ascending expert order then the talker's shared expert, attention softmax in float32 as
in the eager path, the code predictor greedy or sampled as `speech_sampling` samples, from uniforms
drawn before the call, a graph of its own). Decode rope positions are the cache position
plus the row's stored delta (as `decode_steps.decode_rope_positions`), the same value on
the three rope axes, so the interleaved multimodal rope reduces to plain rope.

Every `--parallel` mode, the collectives inside the graph:
- `none`: the experts stacked (`sparse_moe.StackedExperts`), nothing to communicate.
- `expert`: each rank's graph routes every token with the full router, runs the chosen experts
  it holds (the others count nothing) and adds the ranks' partial outputs with one all-reduce
  per MoE layer, inside the graph; the talker's shared expert is added once, after it.
- `zero3`: every weight mindone's ZeRO-3 split is all-gathered inside the graph where it is
  used (attention, routers, the heads, the code predictor), and the chosen experts' shards are
  picked by device indices and all-gathered (`sparse_moe.GatheredStackedExperts`' way), so a
  step gathers what the PyNative step gathers, one layer at a time.
Covered: full attention without biases, default rope, up to `DEVICE_DISPATCH_MAX_SLOTS` (row,
expert) slots; `applies` decides. The compiled steps have run on CPU only: if one fails at its
first call, where MindSpore compiles it, the model decodes in PyNative from then on and says why
once (`run`); under msrun the ranks compile first and agree, so that all of them fall back
together (`compiled.first_call`).
"""

from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, mint, ops
from mindspore.communication import get_group_size

from omni_helpers.measuring.collectives import collective_bytes
from omni_helpers.mindone_changes.faster import compiled
from omni_helpers.mindone_changes.faster.graph_ops import (
    MASKED,
    batched_product,
    dense,
    grouped_query_attention,
    linear,
    rms_norm_with,
    rope,
    rotate,
    route,
    swiglu,
)
from omni_helpers.mindone_changes.speech_sampling import frame_uniforms, residual_code, samples
from omni_helpers.parallel.sparse_moe import (
    DEVICE_DISPATCH_MAX_SLOTS,
    MOE_BLOCKS,
    StackedExperts,
    gathered_columns,
    split_by_zero3,
)

CAPACITY_STEP = 256  # cache lengths are rounded up to this, so nearby request lengths share one compiled graph
THINKER = "Qwen3OmniMoeThinkerForConditionalGeneration"
TALKER = "Qwen3OmniMoeTalkerForConditionalGeneration"


# ----------------------------------------------------------------------------- when, and which graph


def applies(model, rows: int, generation_config) -> bool:
    """Whether this generate call's decode steps can run as a compiled graph (asked after the prompt's forward)."""
    kind = type(model).__name__
    if kind not in (THINKER, TALKER) or ms.get_context("mode") != ms.PYNATIVE_MODE:
        return False
    if compiled.failed(model, "decode_graph"):  # it could not compile on this device: PyNative from then on
        return False
    if model.rope_deltas is None or generation_config.output_attentions or generation_config.max_length is None:
        return False
    if not decoder_covered(model.model, sparse=True):
        return False
    if kind == TALKER and not decoder_covered(model.code_predictor.model, sparse=False):
        return False
    return rows * model.model.layers[0].mlp.top_k <= DEVICE_DISPATCH_MAX_SLOTS


def decoder_covered(text_model, sparse: bool) -> bool:
    """Full attention without biases, default rope, and every layer's MLP the kind the graph runs."""
    config = text_model.config
    if getattr(text_model.rotary_emb, "rope_type", "default") != "default" or config.attention_bias:
        return False
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])):
        return False
    for layer in decoder_layers(text_model):
        mlp = layer.mlp
        if sparse and not (type(mlp).__name__ in MOE_BLOCKS and isinstance(mlp.experts, StackedExperts)):
            return False
        if not sparse and not hasattr(mlp, "gate_proj"):
            return False
    return True


def decoder_layers(text_model):
    return list(text_model.layers)[: text_model.config.num_hidden_layers]  # the code predictor's forward slices so


def capacity_for(max_length: int) -> int:
    return -(-max_length // CAPACITY_STEP) * CAPACITY_STEP


def start(model, model_kwargs, new_tokens: int, distributed: bool = False, choice=None):
    """The graph for this request's shape (compiled at its first call, then kept on the model),
    its cache filled from the prompt's. `new_tokens` is the most the loop may still choose;
    `distributed` (msrun: the loop's `synced_gpus`): the ranks agree on the graph's first build;
    `choice` (a `Choice`, the thinker only): the graph chooses the next tokens too."""
    cache = model_kwargs["past_key_values"]
    rows, _, prompt_length, _ = cache.layers[0].keys.shape
    key = (rows, capacity_for(prompt_length + new_tokens))
    kind = ThinkerGraph if type(model).__name__ == THINKER else TalkerGraph
    if kind is TalkerGraph:
        key += (samples(model.code_predictor),)
    else:
        key += (choice,)
    graph = compiled.kept(model, "decode_graph", key, lambda: kind(model, *key))
    graph.buffers.fill(cache, model_kwargs.get("attention_mask"))
    graph.distributed = distributed
    return graph


def run(graph, model, input_ids, model_kwargs):
    """One decode step through `graph` (the model's forward, so its hooks see it), or None when the
    graph's first call fails (`compiled.first_call`): the model then decodes step by step. A graph that
    chooses the tokens leaves its choice in `graph.chosen`."""
    arguments = graph.inputs(input_ids, model_kwargs)
    return compiled.first_call(
        graph,
        model,
        "decode_graph",
        lambda: model(**arguments, return_dict=True),
        "decode step",
        "decoding step by step instead",
        agree_on=graph.step_arguments(arguments) if graph.distributed else None,
    )


# ----------------------------------------------------------------------------- the KV buffers


class KVBuffers:
    """One decoder's keys and values for every layer, (rows, kv heads, capacity, head dim), and the
    additive mask of the positions each row may attend to, (rows, capacity)."""

    def __init__(self, text_model, rows: int, capacity: int, name: str):
        attention = decoder_layers(text_model)[0].self_attn
        self.rows, self.capacity, self.dtype = rows, capacity, attention.q_proj.weight.dtype
        self.kv_heads, self.head_dim = text_model.config.num_key_value_heads, attention.head_dim
        zeros = np.zeros((rows, self.kv_heads, capacity, self.head_dim), ms.dtype_to_nptype(self.dtype))
        layers = range(len(decoder_layers(text_model)))
        self.keys = [Parameter(ms.Tensor(zeros), name=f"{name}.keys.{i}", requires_grad=False) for i in layers]
        self.values = [Parameter(ms.Tensor(zeros), name=f"{name}.values.{i}", requires_grad=False) for i in layers]
        self.mask = Parameter(
            ms.Tensor(np.full((rows, capacity), MASKED, np.float32)), name=f"{name}.mask", requires_grad=False
        )
        self.cache, self.length = None, 0

    def fill(self, cache, attention_mask) -> None:
        """The prompt's keys and values copied into the buffers in place (a compiled graph keeps the
        memory it was built with); its padding, and everything after it, masked. No host read."""
        prompt_length = cache.layers[0].keys.shape[2]
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            for buffer, states in ((keys, layer.keys), (values, layer.values)):
                rest = mint.zeros(
                    (self.rows, self.kv_heads, self.capacity - prompt_length, self.head_dim), dtype=self.dtype
                )
                ops.assign(buffer, mint.cat([states.astype(self.dtype), rest], dim=2))
        hidden = ops.fill(ms.float32, (self.rows, self.capacity - prompt_length), MASKED)
        if attention_mask is None:
            prompt = ops.zeros((self.rows, prompt_length), ms.float32)
        else:
            prompt = mint.where(attention_mask[:, :prompt_length] != 0, 0.0, MASKED).astype(ms.float32)
        ops.assign(self.mask, mint.cat([prompt, hidden], dim=1))
        self.cache, self.length = cache, prompt_length

    def hand_back(self) -> None:
        """The cache as mindone's dynamic cache holds it: every position so far."""
        for layer, keys, values in zip(self.cache.layers, self.keys, self.values):
            layer.keys = keys[:, :, : self.length].copy()
            layer.values = values[:, :, : self.length].copy()


# ----------------------------------------------------------------------------- the graphs


class DecodeGraph(compiled.Graph):
    """What both stages' graphs share: the compiled step and the stage's KV buffers (handed back to
    mindone's cache by `finish`)."""

    def __init__(self, buffers: KVBuffers, step):
        super().__init__(step)
        self.buffers = buffers
        self.distributed = False

    def finish(self) -> None:
        self.buffers.hand_back()


class ThinkerGraph(DecodeGraph):
    """The thinker's compiled decode step and its buffers. The generation loop hands it to the thinker's
    forward (`fast_paths.thinker_construct`), so the forward hooks that time steps see every step."""

    def __init__(self, thinker, rows: int, capacity: int, choice=None):
        self.thinker, self.choice, self.chosen = thinker, choice, None
        buffers = KVBuffers(thinker.model, rows, capacity, "thinker")
        step = thinker_step(thinker, buffers)
        super().__init__(buffers, step if choice is None else choosing(step, rows, choice))
        self.collective_bytes = decoder_traffic(thinker.model, rows, buffers.dtype) + head_traffic([thinker.lm_head])
        if choice is not None and choice.distributed:  # the ranks' flags: running, cancelled (float32)
            self.collective_bytes += collective_bytes("all_reduce", 8, world_size())

    def inputs(self, input_ids, model_kwargs) -> dict:
        """The forward's arguments for a decode step: each row's newest token and its position (and, for a
        graph that chooses, which rows are unfinished and whether the request was cancelled)."""
        arguments = {"input_ids": input_ids[:, -1:], "cache_position": model_kwargs["cache_position"]}
        if self.choice is not None:
            arguments.update(unfinished=model_kwargs["unfinished"], cancelled=model_kwargs["cancelled"])
        return {**arguments, "decode_graph": self}

    def step_arguments(self, arguments: dict) -> tuple:
        step = arguments["input_ids"], arguments["cache_position"], self.thinker.rope_deltas
        return step if self.choice is None else step + (arguments["unfinished"], arguments["cancelled"])

    def forward(self, arguments: dict):
        from mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeThinkerCausalLMOutputWithPast,
        )

        outputs = self.step(*self.step_arguments(arguments))
        if self.choice is not None:
            self.chosen, outputs = Chosen(*outputs[: len(Chosen._fields)]), outputs[len(Chosen._fields) :]
        logits, *hidden_states = outputs
        self.buffers.length += 1
        return Qwen3OmniMoeThinkerCausalLMOutputWithPast(
            logits=logits,
            hidden_states=tuple(hidden_states),
            past_key_values=self.buffers.cache,
            rope_deltas=self.thinker.rope_deltas,
        )


class TalkerGraph(DecodeGraph):
    """The talker's compiled frame step: the code predictor's residual codes for the last frame, the
    frame's summed embedding, and the talker's decode step (`fast_paths.talker_construct` runs it)."""

    def __init__(self, talker, rows: int, capacity: int, sampling: bool):
        self.talker, self.sampling = talker, sampling
        buffers = KVBuffers(talker.model, rows, capacity, "talker")
        groups = talker.code_predictor.config.num_code_groups
        self.residuals = groups - 1
        predictor_buffers = KVBuffers(
            talker.code_predictor.model, rows, groups, "code_predictor"
        )  # cleared every frame
        super().__init__(buffers, talker_step(talker, buffers, predictor_buffers, sampling))
        predictor = talker.code_predictor
        self.collective_bytes = (
            decoder_traffic(talker.model, rows, buffers.dtype)
            + head_traffic([talker.codec_head, *predictor.lm_head])
            + decoder_traffic(predictor.model, rows * 2, buffers.dtype)  # the predictor's prompt, then a step per code
            + (groups - 2) * decoder_traffic(predictor.model, rows, buffers.dtype)
        )

    def inputs(self, input_ids, model_kwargs) -> dict:
        """The forward's arguments for a frame: the frame's first code, the talker's last hidden state,
        and what the text adds at this step (its next hidden state, or padding once it has run out)."""
        step, text_hidden = model_kwargs["generation_step"], model_kwargs["trailing_text_hidden"]
        if step < text_hidden.shape[1]:
            text = text_hidden[:, step].unsqueeze(1)
        else:  # one row's padding embedding, for every row: the graph's inputs keep their shapes
            text = model_kwargs["tts_pad_embed"].broadcast_to((self.buffers.rows, 1, -1))
        last_hidden = model_kwargs["hidden_states"][0][-1][:, -1:]  # the talker's last layer at its last position
        return {
            "input_ids": input_ids[:, -1:],
            "cache_position": model_kwargs["cache_position"],
            "decode_graph": self,
            "last_hidden": last_hidden,
            "text_embeds": text,
            "generation_step": step,
            "uniforms": frame_uniforms(self.buffers.rows, self.residuals) if self.sampling else None,
        }

    def step_arguments(self, arguments: dict) -> tuple:
        return (
            arguments["input_ids"],
            arguments["last_hidden"],
            arguments["text_embeds"],
            arguments["cache_position"],
            self.talker.rope_deltas,
        ) + ((arguments["uniforms"],) if self.sampling else ())

    def forward(self, arguments: dict):
        from mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeTalkerOutputWithPast

        logits, codes, *hidden_states = self.step(*self.step_arguments(arguments))
        self.buffers.length += 1
        return Qwen3OmniMoeTalkerOutputWithPast(
            logits=logits,
            past_key_values=self.buffers.cache,
            hidden_states=(tuple(hidden_states), codes),  # mindone carries the frame's codes here
            generation_step=arguments["generation_step"] + 1,
        )


# ----------------------------------------------------------------------------- the step functions


def thinker_step(thinker, buffers: KVBuffers):
    """(input ids, cache position, rope deltas) -> (logits, hidden states...), for `mindspore.jit`."""
    rows = buffers.rows
    text = thinker.model
    decoder = decoder_function(text, buffers, tokens=1)
    embed, (head, head_split) = text.embed_tokens.weight, split_of(thinker.lm_head)
    full = whole_weights(head_split)
    rope = rope_function(text.rotary_emb, buffers.dtype)

    def step(input_ids, cache_position, rope_deltas):
        position = ops.cast(cache_position.reshape(1, 1), ms.int64)
        cos, sin = rope(ops.cast(ops.cast(position, rope_deltas.dtype) + rope_deltas, ms.float32))  # (rows, 1)
        x = ops.gather(embed, input_ids.reshape(-1), 0)  # (rows, hidden)
        x, hidden_states = decoder(x, cos, sin, position)
        return (linear(x, full(head, head_split)).reshape(rows, 1, -1),) + hidden_states

    return step


def talker_step(talker, buffers: KVBuffers, predictor_buffers: KVBuffers, sampling: bool = False):
    """(first code, last hidden, text embeds, cache position, rope deltas[, uniforms (rows, residual codes)
    when `sampling`]) -> (logits, the frame's codes, hidden states...), for `mindspore.jit`. The residual codes are predicted as `decode_steps.predict_residual_codes`
    predicts them: the predictor's prompt is (last hidden, first code's embedding), then one code per step."""
    rows, dtype = buffers.rows, buffers.dtype
    predictor = talker.code_predictor
    residuals = predictor.config.num_code_groups - 1
    decoder = decoder_function(talker.model, buffers, tokens=1)
    predictor_prompt = decoder_function(predictor.model, predictor_buffers, tokens=2)
    predictor_step = decoder_function(predictor.model, predictor_buffers, tokens=1)
    rope = rope_function(talker.model.rotary_emb, dtype)
    predictor_rope = rope_function(predictor.model.rotary_emb, dtype)
    embed, (head, head_split) = talker.model.codec_embedding.weight, split_of(talker.codec_head)
    code_embeds = [table.weight for table in predictor.model.codec_embedding]
    code_heads = [split_of(linear_layer) for linear_layer in predictor.lm_head]
    full = whole_weights(head_split or any(split for _, split in code_heads))
    mask, cleared = predictor_buffers.mask, ms.Tensor(np.full(predictor_buffers.mask.shape, MASKED, np.float32))
    prompt_positions = ms.Tensor(np.tile(np.arange(2, dtype=np.float32), (rows, 1)))

    def step(first_code, last_hidden, text_embeds, cache_position, rope_deltas, uniforms=None):
        first_embed = ops.gather(embed, first_code.reshape(-1), 0)  # (rows, hidden)
        # the code predictor, from an empty cache
        start = ops.zeros((1, 1), ms.int64)
        cleared_first = ops.assign(mask, cleared)
        x = ops.concat((last_hidden.reshape(rows, 1, -1), first_embed.reshape(rows, 1, -1)), 1).reshape(rows * 2, -1)
        x = ops.depend(x, cleared_first)
        cos, sin = predictor_rope(prompt_positions)
        x, _ = predictor_prompt(x, cos, sin, start)
        last = x.reshape(rows, 2, -1)[:, 1]
        codes, embeds = (), ()
        for group in range(residuals):
            if group > 0:
                position = start + group + 1
                cos, sin = predictor_rope(ops.cast(ops.broadcast_to(position, (rows, 1)), ms.float32))
                last, _ = predictor_step(embeds[-1], cos, sin, position)
            code_head, code_head_split = code_heads[group]
            logits = linear(last, full(code_head, code_head_split))
            code = residual_code(logits, None if uniforms is None else uniforms[:, group]).reshape(rows, 1)
            codes += (ops.cast(code, first_code.dtype),)
            embeds += (ops.gather(code_embeds[group], code.reshape(-1), 0),)
        # the frame's embedding, then the talker's step
        frame = ops.concat([first_embed.reshape(rows, 1, -1)] + [e.reshape(rows, 1, -1) for e in embeds], 1)
        x = ops.ReduceSum(keep_dims=True)(frame, 1) + text_embeds
        position = ops.cast(cache_position.reshape(1, 1), ms.int64)
        cos, sin = rope(ops.cast(ops.cast(position, rope_deltas.dtype) + rope_deltas, ms.float32))
        x, hidden_states = decoder(x.reshape(rows, -1), cos, sin, position)
        frame_codes = ops.concat((first_code,) + codes, 1)
        return (linear(x, full(head, head_split)).reshape(rows, 1, -1), frame_codes) + hidden_states

    return step


# ----------------------------------------------------------------------------- the next token's choice


class Choice(NamedTuple):
    """What a thinker graph needs to choose each row's next token as the generation loop does when it is
    greedy with no logits processor, and to test for the end: the loop then reads the device once per step."""

    end_tokens: tuple  # the ids that end a row (`EosTokenCriteria`); () where the loop does not stop at them
    pad_token: int  # what a finished row gets
    distributed: bool  # msrun: whether every rank has finished is all-reduced inside the graph


class Chosen(NamedTuple):
    """A choosing graph's outputs before the step's own: what the next step takes, and what the host reads."""

    tokens: object  # (rows, 1), the next step's input
    cache_position: object  # (1,), the next step's position
    unfinished: object  # (rows,) int64, 1 for a row still answering
    choice: object  # (rows + 3,) int64, read once: the tokens, then this rank running, ranks running, ranks cancelled


def choosing(step, rows: int, choice: Choice):
    """`step` followed by the loop's greedy choice and stopping test, in the same graph: (the step's inputs,
    unfinished (rows,) int64, cancelled (1,) float32) -> `Chosen`'s outputs, then the step's."""
    all_reduce = ops.AllReduce(ops.ReduceOp.SUM) if choice.distributed else None

    def step_and_choice(input_ids, cache_position, rope_deltas, unfinished, cancelled):
        outputs = step(input_ids, cache_position, rope_deltas)
        # `ops.Argmax`, which has a CPU kernel (mint's has not: its CPU fallback would call Python at every step)
        tokens = ops.cast(ops.Argmax(axis=-1, output_type=ms.int32)(outputs[0].reshape(rows, -1)), ms.int64)
        if choice.end_tokens:  # as the loop: finished rows get padding, then `EosTokenCriteria`
            tokens = tokens * unfinished + choice.pad_token * (1 - unfinished)
            ended = tokens == choice.end_tokens[0]
            for end in choice.end_tokens[1:]:
                ended = ops.logical_or(ended, tokens == end)
            unfinished = unfinished * (1 - ops.cast(ended, ms.int64))
        running = ops.cast(unfinished.max() > 0, ms.float32).reshape(1)
        flags = ops.concat((running, cancelled))
        flags = ops.concat((running, all_reduce(flags) if all_reduce is not None else flags))
        read = ops.concat((tokens, ops.cast(flags, ms.int64)))
        return (tokens.reshape(rows, 1), cache_position + 1, unfinished, read) + outputs

    return step_and_choice


# ----------------------------------------------------------------------------- layers


def rope_function(rotary, dtype):
    """positions (rows, tokens), float -> cos, sin (rows, tokens, 1, head dim), as mindone's rotary computes them
    when the three rope axes agree."""
    inv_freq, scaling = rotary.inv_freq, float(rotary.attention_scaling)
    return lambda positions: rope(positions, inv_freq, scaling, dtype)


def whole_weights(split_anywhere: bool):
    """`full(weight, split)`: a weight as the graph uses it, all-gathered from every rank's shard where mindone's
    ZeRO-3 split it (the world group, where its wrappers gather), as it is otherwise."""
    if not split_anywhere:
        return lambda weight, split: weight
    gather = ops.AllGather()

    def full(weight, split):
        if split:
            return gather(weight)
        return weight

    return full


def world_size() -> int:
    from mindspore.communication.management import GlobalComm

    return get_group_size() if GlobalComm.INITED else 1


def decoder_traffic(text_model, positions: int, dtype) -> float:
    """Bytes this rank sends plus receives in the collectives of one pass of `decoder_function`'s graph over
    `positions` new positions (rows x tokens), as `collectives.counting_collectives` counts them: each split
    weight all-gathered, the chosen experts' shards of every slot all-gathered, each MoE all-reduce."""
    world, total = world_size(), 0.0
    hidden = text_model.config.hidden_size * ms.Tensor(0, dtype).itemsize
    for weights in (layer_weights(layer) for layer in decoder_layers(text_model)):
        total += sum(
            collective_bytes("all_gather", weights[key[: -len("_split")]].nbytes, world)
            for key, split in weights.items()
            if key.endswith("_split") and split is True
        )
        stacks = (weights.get("experts_gate_up"), weights.get("experts_down"))
        for stack, split in zip(stacks, weights.get("experts_split", ())):
            if split:
                total += collective_bytes(
                    "all_gather", stack.nbytes / stack.shape[0] * positions * weights["top_k"], world
                )
        if weights.get("all_reduce"):
            total += collective_bytes("all_reduce", positions * hidden, world)
    return total


def head_traffic(heads) -> float:
    """Bytes of all-gathering the heads ZeRO-3 split (a weight each, once per step)."""
    return sum(
        collective_bytes("all_gather", cell.weight.nbytes, world_size()) for cell in heads if split_by_zero3(cell)
    )


def split_of(cell) -> tuple:
    """(its weight, whether ZeRO-3 split it): what `whole_weights` takes."""
    return cell.weight, split_by_zero3(cell)


def decoder_function(text_model, buffers: KVBuffers, tokens: int):
    """One decoder's step over `tokens` new positions per row: x (rows * tokens, hidden), cos and sin,
    position (1, 1) of the first new token -> (final-normed x, hidden states as mindone records them:
    each layer's input, then the final norm's output). Under ZeRO-3 each split weight is all-gathered where
    it is used; under expert parallelism each MoE layer's partial output is all-reduced."""
    config = text_model.config
    rows, capacity, dtype = buffers.rows, buffers.capacity, buffers.dtype
    heads, kv_heads, head_dim = config.num_attention_heads, buffers.kv_heads, buffers.head_dim
    eps, scaling = config.rms_norm_eps, head_dim**-0.5
    layers = [layer_weights(layer) for layer in decoder_layers(text_model)]
    full = whole_weights(
        any(
            any(value is True for key, value in w.items() if key.endswith("_split")) or any(w.get("experts_split", ()))
            for w in layers
        )
    )
    experts_world = get_group_size() if any(any(w.get("experts_split", ())) for w in layers) else 1
    all_reduce = ops.AllReduce(ops.ReduceOp.SUM) if any(w.get("all_reduce") for w in layers) else None
    final_norm = text_model.norm.weight
    kv_pairs = list(zip(buffers.keys, buffers.values))
    mask = buffers.mask
    # where each new (row, kv head, token) key goes, and which (row, token) mask entries open, before the offset
    grid = np.stack(np.meshgrid(np.arange(rows), np.arange(kv_heads), np.arange(tokens), indexing="ij"), -1).reshape(
        -1, 3
    )
    key_slots = ms.Tensor(grid.astype(np.int64))
    mask_grid = np.stack(np.meshgrid(np.arange(rows), np.arange(tokens), indexing="ij"), -1).reshape(-1, 2)
    mask_slots = ms.Tensor(mask_grid.astype(np.int64))
    opened = ms.Tensor(np.zeros(rows * tokens, np.float32))
    key_index = ms.Tensor(np.arange(capacity, dtype=np.int64).reshape(1, capacity))
    token_index = ms.Tensor(np.arange(tokens, dtype=np.int64).reshape(tokens, 1))

    def rms_norm(x, weight):
        return rms_norm_with(x, weight, eps, dtype)

    def use(weights, name):
        return full(weights[name], weights[name + "_split"])

    def attention(x, cos, sin, position, weights, keys, values):
        query = linear(x, use(weights, "q")).reshape(rows, tokens, heads, head_dim)
        key = linear(x, use(weights, "k")).reshape(rows, tokens, kv_heads, head_dim)
        value = linear(x, use(weights, "v")).reshape(rows, tokens, kv_heads, head_dim)
        query = rotate(rms_norm(query, weights["q_norm"]), cos, sin)
        key = rotate(rms_norm(key, weights["k_norm"]), cos, sin)
        offset = ops.concat((ops.zeros((1, 2), ms.int64), position), 1)
        write_at = key_slots + offset
        new_keys = ops.transpose(key, (0, 2, 1, 3)).reshape(-1, head_dim)
        new_values = ops.transpose(value, (0, 2, 1, 3)).reshape(-1, head_dim)
        keys = ops.depend(keys, ops.scatter_nd_update(keys, write_at, new_keys))
        values = ops.depend(values, ops.scatter_nd_update(values, write_at, new_values))
        visible = mask.reshape(rows, 1, 1, 1, capacity)
        if tokens > 1:  # new tokens see each other causally
            later = ops.cast(key_index > position + token_index, ms.float32) * MASKED  # (tokens, capacity)
            visible = visible + later.reshape(1, 1, 1, tokens, capacity)
        out = grouped_query_attention(query, keys, values, visible, scaling, dtype)
        return linear(out, use(weights, "o"))

    def chosen_experts(stack, slots, split, parts):
        """The stacked weights of each slot's expert; under ZeRO-3 each rank's shards of them, all-gathered and
        put back together (`sparse_moe.gathered_columns`)."""
        picked = ops.gather(stack, slots, 0)
        if split:
            picked = gathered_columns(full(picked, True), experts_world, parts)
        return picked

    def experts(x, weights):
        chosen_weights, chosen = route(x, use(weights, "router"), weights["top_k"], weights["normalize"], dtype)
        ascending, order = ops.sort(ops.cast(chosen, ms.float32))  # mindone adds the experts' outputs in this order
        slot_weights = ops.gather_elements(chosen_weights, 1, order)
        slots = ops.cast(ascending, ms.int32).reshape(-1)
        top_k, count = weights["top_k"], x.shape[0]
        if weights["all_reduce"]:  # expert parallelism: this rank's experts run, the others' slots count nothing
            mine = slots < weights["local_experts"]  # the router numbers this rank's experts first
            slots = ops.select(mine, slots, ops.zeros_like(slots))
            slot_weights = slot_weights * ops.cast(mine, dtype).reshape(count, top_k)
        gate_up_split, down_split = weights["experts_split"]
        inputs = ops.broadcast_to(x.reshape(count, 1, 1, -1), (count, top_k, 1, x.shape[-1])).reshape(
            count * top_k, 1, -1
        )
        gate_up = batched_product(inputs, chosen_experts(weights["experts_gate_up"], slots, gate_up_split, 2))
        down = chosen_experts(weights["experts_down"], slots, down_split, 1)
        out = batched_product(swiglu(gate_up), down).reshape(count, top_k, -1)
        out = out * slot_weights.reshape(count, top_k, 1)
        combined = out[:, 0]
        for i in range(1, top_k):
            combined = combined + out[:, i]
        if weights["all_reduce"]:
            combined = all_reduce(combined)
        if "shared_gate" in weights:  # the talker's shared expert, added after the routed ones (and the all-reduce)
            shared = dense(x, use(weights, "shared_gate_proj"), use(weights, "shared_up"), use(weights, "shared_down"))
            combined = combined + ops.sigmoid(linear(x, use(weights, "shared_gate"))) * shared
        return combined

    def mlp(x, weights):
        if "router" in weights:
            return experts(x, weights)
        return dense(x, use(weights, "gate"), use(weights, "up"), use(weights, "down"))

    def decoder(x, cos, sin, position):
        opened_at = mask_slots + ops.concat((ops.zeros((1, 1), ms.int64), position), 1)
        x = ops.depend(x, ops.scatter_nd_update(mask, opened_at, opened))
        hidden_states = ()
        for weights, (keys, values) in zip(layers, kv_pairs):
            hidden_states += (x.reshape(rows, tokens, -1),)
            x = x + attention(rms_norm(x, weights["input_norm"]), cos, sin, position, weights, keys, values)
            x = x + mlp(rms_norm(x, weights["post_norm"]), weights)
        x = rms_norm(x, final_norm)
        return x, hidden_states + (x.reshape(rows, tokens, -1),)

    return decoder


def layer_weights(layer) -> dict:
    """A decoder layer's parameters (and its MoE constants), by role; each Linear's weight with `<role>_split`,
    whether mindone's ZeRO-3 split it (the graph then all-gathers it where it is used)."""
    attention, mlp = layer.self_attn, layer.mlp
    weights = {
        "input_norm": layer.input_layernorm.weight,
        "post_norm": layer.post_attention_layernorm.weight,
        "q_norm": attention.q_norm.weight,
        "k_norm": attention.k_norm.weight,
    }
    linears = {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj, "o": attention.o_proj}
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, StackedExperts):
        whole_block = type(mlp).__name__ != "ExpertParallelMoeBlock"
        weights.update(
            experts_gate_up=experts.gate_up,
            experts_down=experts.down,
            top_k=mlp.top_k,
            normalize=bool(mlp.norm_topk_prob),
            experts_split=tuple(getattr(experts, "split", (False,) * 2)),
            all_reduce=not whole_block,
            local_experts=len(experts),
        )
        linears["router"] = mlp.gate
        shared = getattr(mlp, "shared_expert", None)
        if shared is not None:
            linears.update(
                shared_gate=mlp.shared_expert_gate,
                shared_gate_proj=shared.gate_proj,
                shared_up=shared.up_proj,
                shared_down=shared.down_proj,
            )
    else:
        linears.update(gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj)
    for role, cell in linears.items():
        weights[role], weights[f"{role}_split"] = split_of(cell)
    return weights
