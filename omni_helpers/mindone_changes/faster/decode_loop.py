"""The generation loop with one host read per decoding step: the stopping test.

mindone's `GenerationMixin._sample` reads twice per step. Besides the stopping test it
reads `attention_mask.sum(-1).max()` to find which position's logits to use, which only
matters for prompts padded on the right to a static shape. Our prompts are padded on the
left to their longest row (the processor's padding), so every row's last token is the last
position. Under ZeRO-3 (`synced_gpus`) mindone reads twice more to agree with the other
ranks on stopping; here one all-reduce and one read give both answers.

After the prompt's forward, where `decode_graph.applies` (the thinker and the talker, in every
`--parallel` mode), the decode steps run as a compiled graph on a KV cache written in place:
the loop hands the graph to the model's forward with just the newest tokens, skipping
mindone's input preparation, whose work the graph does on the device.

A request the server cancels (`cancellation.Cancellation`, one of the stopping criteria)
stops at the next step with `errors.Cancelled`; under msrun its flag travels in the same
all-reduce as the stopping test, so every rank stops at the same step.

Everything else is mindone's loop as it is: the same logits processors, the same
multinomial draw, the same stopping criteria, the same streamer protocol, so greedy and
seeded sampling choose the same tokens (tests/test_parity.py). Features our entry
points never use (encoder-decoder models, paged attention, chunked prefill, compiled
forwards) are left to mindone's loop (`supports`).
"""

from __future__ import annotations

import logging
import time

import mindspore as ms
import numpy as np
from mindspore import mint, ops

from omni_helpers.mindone_changes.faster import decode_graph, host_positions
from omni_helpers.request.cancellation import Cancellation
from omni_helpers.request.errors import Cancelled

STEP_LOG = logging.getLogger(__name__)  # a line per decoding step with its time, with --verbose


def supports(model, generation_config, model_kwargs) -> bool:
    """Whether this loop covers the call (otherwise mindone's own loop runs)."""
    return not (
        model.config.is_encoder_decoder
        or "paged" in (model.config._attn_implementation or "")
        or generation_config.prefill_chunk_size is not None
        or model._valid_auto_compile_criteria(model_kwargs, generation_config)
        or ms.get_context("mode") == ms.GRAPH_MODE
    )


def sample(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus=False,
    streamer=None,
    **model_kwargs,
):
    """`GenerationMixin._sample` for decoder-only models, one host read per step."""
    from mindone.transformers.generation.utils import GenerateDecoderOnlyOutput, get_multinomial_op

    record = Record(generation_config)
    cancellation = next((criterion for criterion in stopping_criteria if isinstance(criterion, Cancellation)), None)
    if cancellation is not None:  # read on the host below, never launched as a criterion
        stopping_criteria = type(stopping_criteria)(c for c in stopping_criteria if c is not cancellation)
    pad_token = generation_config._pad_token_tensor
    stops_at_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    multinomial = get_multinomial_op()
    unfinished = mint.ones(input_ids.shape[0], dtype=ms.int64)
    model_kwargs = model._get_initial_cache_position(input_ids.shape[1], model_kwargs)
    this_peer_finished, step, step_started = False, 0, time.time()
    graph = None  # the compiled decode step, from the first decode step on where it applies

    while True:
        if step == 1 and decode_graph.applies(model, input_ids.shape[0], generation_config):
            # from the first decode step on (a request that stops at its first token builds no graph); the
            # length limit counts the ids so far (none for a prompt given as embeddings, as the talker's is)
            choice = choice_in_graph(model, logits_processor, stopping_criteria, generation_config, synced_gpus)
            graph = decode_graph.start(
                model, model_kwargs, generation_config.max_length - input_ids.shape[1], synced_gpus, choice
            )
            if choice is not None:
                decoded = decode_choosing_in_graph(
                    graph, model, input_ids, unfinished, model_kwargs, record, streamer, cancellation, stopping_criteria
                )
                if decoded is not None:
                    input_ids = decoded
                    break
                graph = None  # it did not build: this step and the next in PyNative
        outputs = None if graph is None else decode_graph.run(graph, model, input_ids, model_kwargs)
        if outputs is None:  # the prompt, a stage the graph does not cover, or a graph that could not compile
            graph = None
            outputs = model(**model.prepare_inputs_for_generation(input_ids, **model_kwargs), return_dict=True)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        if not this_peer_finished:  # a finished rank keeps running forwards until every rank is done (ZeRO-3)
            logits = outputs.logits[:, -1, :]  # left padding: the last position is every row's last token
            scores = logits_processor(input_ids, logits)
            record.step(scores, logits, outputs)
            if generation_config.do_sample:
                probs = mint.softmax(scores, dim=-1, dtype=ms.float32).to(scores.dtype)
                next_tokens = multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = mint.argmax(scores, dim=-1)
            if stops_at_eos:  # rows that have finished get padding
                next_tokens = next_tokens * unfinished + pad_token * (1 - unfinished)
            input_ids = mint.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.asnumpy())
            done = ms.Tensor(stopping_criteria(input_ids, record.scores), ms.bool_)
            unfinished = unfinished & (~done).to(unfinished.dtype)  # explicit: an implicit promotion is a slow CPU Cast
        del outputs  # the prompt's logits can be large: do not keep them through the next step
        step_started = report_progress(step, step_started)
        step += 1
        this_peer_finished, everyone_finished, cancelled = stopping_test(unfinished, synced_gpus, cancellation)
        if cancelled:
            raise Cancelled(f"cancelled after {step} decoding steps")
        if everyone_finished:
            break

    if graph is not None:
        graph.finish()
    if streamer is not None:
        streamer.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    return GenerateDecoderOnlyOutput(
        sequences=input_ids, past_key_values=model_kwargs.get("past_key_values"), **record.outputs()
    )


def choice_in_graph(model, logits_processor, stopping_criteria, generation_config, synced_gpus):
    """The `decode_graph.Choice` for a graph that chooses the tokens itself, or None where the loop must:
    the thinker, greedy with no logits processor, stopping only at its length or its end tokens."""
    from mindone.transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    if type(model).__name__ != decode_graph.THINKER or generation_config.do_sample or len(logits_processor):
        return None
    if not all(isinstance(criterion, (EosTokenCriteria, MaxLengthCriteria)) for criterion in stopping_criteria):
        return None
    stops_at_eos = any(isinstance(criterion, EosTokenCriteria) for criterion in stopping_criteria)
    end = generation_config.eos_token_id if stops_at_eos else ()
    end_tokens = tuple(end) if isinstance(end, (list, tuple)) else (end,)
    pad = generation_config.pad_token_id
    pad = (end_tokens[0] if pad is None else pad) if stops_at_eos else 0  # mindone pads with the first end token
    return decode_graph.Choice(end_tokens, int(pad), bool(synced_gpus))


def decode_choosing_in_graph(
    graph, model, input_ids, unfinished, model_kwargs, record, streamer, cancellation, stopping_criteria
):
    """The decode steps of a graph that chooses the tokens and tests for the end itself: a step is one graph
    call and one host read (the tokens chosen and the ranks' flags). The ids so far with the tokens chosen,
    or None when the graph did not build at its first call (the loop then goes on in PyNative)."""
    limit = min(
        (c.max_length for c in stopping_criteria if hasattr(c, "max_length")), default=None
    )  # counted on the host, by steps, so that every rank stops at the same one
    rows, length, chosen = input_ids.shape[0], input_ids.shape[1], []
    step_started = time.time()
    state = {"cache_position": model_kwargs["cache_position"], "unfinished": unfinished}
    tokens, this_peer_finished = input_ids, False
    while True:
        state["cancelled"] = ms.Tensor([float(cancellation is not None and cancellation.cancelled)], ms.float32)
        outputs = decode_graph.run(graph, model, tokens, state)
        if outputs is None:
            return None
        tokens, state["cache_position"], state["unfinished"], read = graph.chosen
        read = read.asnumpy()  # the step's one host read
        length += 1
        if not this_peer_finished:
            logits = outputs.logits[:, -1, :] if record.keeps_logits else None
            record.step(logits, logits, outputs)  # no logits processor: the scores are the logits
            chosen.append(read[:rows])
            if streamer is not None and not (cancellation is not None and cancellation.cancelled):
                streamer.put(read[:rows])
        step_started = report_progress(length - input_ids.shape[1], step_started)  # the prompt was step 0
        reached_limit = limit is not None and length >= limit
        this_peer_finished = this_peer_finished or read[rows] == 0 or reached_limit
        # cancelled here (one process), or on any rank before this step (msrun: the flag went through the graph)
        cancelled_here = cancellation is not None and cancellation.cancelled and not graph.choice.distributed
        if cancelled_here or read[rows + 2] > 0:
            raise Cancelled(f"cancelled after {length - input_ids.shape[1] + 1} decoding steps")
        if read[rows + 1] == 0 or reached_limit:
            break
    del outputs
    return mint.cat([input_ids, ms.Tensor(np.stack(chosen, axis=1), input_ids.dtype)], dim=-1)


def stopping_test(unfinished, synced_gpus: bool, cancellation=None) -> tuple[bool, bool, bool]:
    """(this rank has finished, every rank has finished, a rank was cancelled), from one host read."""
    running = (unfinished.max() > 0).astype(ms.float32).reshape(1)
    if not synced_gpus:
        finished = not running.asnumpy()[0]
        return finished, finished, cancellation is not None and cancellation.cancelled
    # the cancel flag rides in the same all-reduce, as in the compiled step's (the same bytes either way)
    cancelled = ms.Tensor([float(cancellation is not None and cancellation.cancelled)], ms.float32)
    everyone = ops.AllReduce()(mint.cat([running, cancelled]))  # the number of ranks still running, and cancelled
    flags = mint.cat([running, everyone]).asnumpy()
    return flags[0] == 0, flags[1] == 0, flags[2] > 0


def report_progress(step: int, started: float) -> float:
    """With --verbose, one line per step on stderr (stdout carries the answer): how long the step took."""
    now = time.time()
    if STEP_LOG.isEnabledFor(logging.DEBUG):
        STEP_LOG.debug("decode step %d: %.4f s", step, now - started)
    return now


class Record:
    """What `return_dict_in_generate` asks to keep of each step (scores, logits, attentions, hidden states)."""

    def __init__(self, generation_config):
        keep = generation_config.return_dict_in_generate
        self.scores = () if keep and generation_config.output_scores else None
        self.logits = () if keep and generation_config.output_logits else None
        self.attentions = () if keep and generation_config.output_attentions else None
        self.hidden_states = () if keep and generation_config.output_hidden_states else None
        self.keeps_logits = self.scores is not None or self.logits is not None

    def step(self, scores, logits, outputs) -> None:
        if self.scores is not None:
            self.scores += (scores,)
        if self.logits is not None:
            self.logits += (logits,)
        if self.attentions is not None:
            self.attentions += (outputs.attentions,)
        if self.hidden_states is not None:
            self.hidden_states += (outputs.hidden_states,)

    def outputs(self) -> dict:
        return {
            "scores": self.scores,
            "logits": self.logits,
            "attentions": self.attentions,
            "hidden_states": self.hidden_states,
        }


def prepare_special_tokens(model, generation_config, kwargs_has_attention_mask, original) -> None:
    """`GenerationMixin._prepare_special_tokens` without its host reads: the same tensors on the generation
    config and the same warnings, its checks made on the config's numbers; each tensor keeps its host copy
    (the end-token criterion reads its list there). Tokens given as tensors, or an encoder-decoder model,
    take mindone's own path."""
    from mindone.transformers.generation.utils import logger

    names = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    given = [getattr(generation_config, name) for name in names]
    if model.config.is_encoder_decoder or any(isinstance(token, ms.Tensor) for token in given):
        return original(model, generation_config, kwargs_has_attention_mask)
    bos, eos, pad, start = (None if token is None else np.asarray(token).astype(np.int64) for token in given)
    if eos is not None:
        eos = eos.reshape(-1)  # more than one end token: always a 1-D tensor
    mask_missing = kwargs_has_attention_mask is not None and not kwargs_has_attention_mask
    if pad is None and eos is not None:
        if mask_missing:
            logger.warning(
                "The attention mask and the pad token id were not set. As a consequence, you may observe "
                "unexpected behavior. Please pass your input's `attention_mask` to obtain reliable results."
            )
        pad = eos[0]
        logger.warning(f"Setting `pad_token_id` to `eos_token_id`:{pad} for open-end generation.")
    if mask_missing and eos is not None and np.isin(eos, pad).any():
        logger.warning_once(
            "The attention mask is not set and cannot be inferred from input because pad token is same as "
            "eos token. As a consequence, you may observe unexpected behavior. Please pass your input's "
            "`attention_mask` to obtain reliable results."
        )
    if eos is not None and (eos < 0).any():  # int64 as mindone makes them: never floating
        logger.warning(
            f"`eos_token_id` should consist of positive integers, but is {eos}. Your generation will not "
            "stop until the maximum length is reached. Depending on other flags, it may even crash."
        )
    generation_config._bos_token_tensor = token_tensor(bos)
    generation_config._eos_token_tensor = token_tensor(eos)
    generation_config._pad_token_tensor = token_tensor(pad)
    generation_config._decoder_start_token_tensor = token_tensor(start)


def token_tensor(ids):
    """Token ids as mindone's int64 tensor, keeping its host copy; None stays None."""
    if ids is None:
        return None
    return host_positions.with_host_copy(ms.tensor(ids, dtype=ms.int64), ids)
