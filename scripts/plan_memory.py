"""Plan the msrun job before loading anything: each rank's parameter bytes under every
`--parallel` mode, and the bytes each rank communicates per decoded token, from the config alone.

    python scripts/plan_memory.py --model_name Qwen/Qwen3-Omni-30B-A3B-Instruct --world_size 2
    python scripts/plan_memory.py --model_name ../shared/data/qwen3_omni_30b_a3b_instruct_config.json \
        --world_size 2 --parallel expert

The model is built the way mindone builds it, but under `no_init_parameters`, so no
weight is read or allocated: the parameters' names, shapes and dtypes, and the Cell that
holds each, are exactly those the scripts load. The modes' rules:

- none: every parameter on every rank.
- zero3: mindone's ZeRO-3 splits the weights of the Cells it wraps (`PARALLEL_MODULES`:
  Linear, Conv) whose first dimension is divisible by N, and replicates everything else.
- expert: each sparse MoE block keeps `omni_helpers.request.parallel_modes.expert_range` of its experts;
  everything else is replicated. Rank 0 holds the largest share.

Bytes per decoded token (the thinker's; each rank's sent plus received, counted as
`omni_helpers.measuring.collectives.collective_bytes` counts the collectives at run time):

- zero3: one all-gather per split weight a one-token forward uses: attention, routers,
  the top-k experts of every layer, the LM head.
- expert: one all-reduce of one token's hidden state per MoE layer.

The figures are parameters only: activations, the KV cache and, under zero3, the
weights of the layer being gathered come on top.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni_helpers.measuring.collectives import collective_bytes  # noqa: E402
from omni_helpers.request.parallel_modes import PARALLEL_MODES, expert_range  # noqa: E402

GiB = 2**30


@dataclass
class Parameter:
    name: str
    size: int
    nbytes: int
    zero3_split: bool  # mindone's ZeRO-3 splits it along its first dimension
    expert: int = -1  # its expert's number inside a sparse MoE block, -1 if it is not an expert's
    num_experts: int = 0
    top_k: int = 0

    @property
    def stage(self) -> str:
        return self.name.split(".")[0]  # thinker, talker, code2wav

    @property
    def decoder_layer_of_thinker(self) -> bool:
        return self.name.startswith("thinker.model.layers.")


@dataclass
class Plan:
    model_name: str
    world_size: int
    dtype: str
    total_parameters: int
    # mode -> {"whole": bytes, "without_talker": bytes}, rank 0 (the largest share)
    parameter_bytes_per_rank: dict[str, dict[str, int]] = field(default_factory=dict)
    # mode -> bytes one rank sends plus receives per decoded thinker token
    communicated_bytes_per_decoded_token: dict[str, float] = field(default_factory=dict)
    # zero3: the whole weights one thinker decoder layer gathers for one token (attention, router, its top-k
    # experts), the most a compiled decode step holds gathered at once beyond the LM head, gathered whole too
    zero3_gathered_layer_bytes: float = 0.0
    zero3_gathered_head_bytes: float = 0.0


def model_skeleton(model_name: str, dtype: str):
    """mindone's model for `model_name`'s config (a checkpoint directory or a config.json), without weights."""
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters
    from transformers import Qwen3OmniMoeConfig

    from omni_helpers.mindone_changes.patches import install_patches
    from omni_helpers.runtime import setup_runtime

    setup_runtime("CPU")  # the host builds the skeleton; construction uses ops with no CPU kernel of their own
    install_patches("CPU")  # also quiets the libraries mindone imports
    from mindone.transformers import Qwen3OmniMoeForConditionalGeneration

    config = Qwen3OmniMoeConfig.from_pretrained(model_name)
    with no_init_parameters():
        return Qwen3OmniMoeForConditionalGeneration._from_config(config, dtype=getattr(ms, dtype))


def parameter_table(model, world_size: int) -> list[Parameter]:
    """Every parameter once, with what the modes need to know about it."""
    from mindone.models.modules.parallel import PARALLEL_MODULES

    from omni_helpers.parallel.sparse_moe import SPARSE_MOE_BLOCKS

    experts = {}  # id(cell) -> (expert number, its block)
    for _, cell in model.cells_and_names():
        if type(cell).__name__ in SPARSE_MOE_BLOCKS:
            for number, expert in enumerate(cell.experts):
                for _, sub in expert.cells_and_names():
                    experts[id(sub)] = (number, cell)
    table, seen = [], set()
    for prefix, cell in model.cells_and_names():
        for attr, param in cell._params.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            first = param.shape[0] if param.shape else 0
            number, block = experts.get(id(cell), (-1, None))
            table.append(
                Parameter(
                    name=f"{prefix}.{attr}",
                    size=param.size,
                    nbytes=param.size * param.itemsize,
                    zero3_split=type(cell) in PARALLEL_MODULES and first >= world_size and first % world_size == 0,
                    expert=number,
                    num_experts=block.num_experts if block is not None else 0,
                    top_k=block.top_k if block is not None else 0,
                )
            )
    return table


def bytes_on_rank(table: list[Parameter], mode: str, world_size: int, rank: int = 0) -> int:
    """Parameter bytes rank `rank` holds under `mode`."""
    total = 0
    for param in table:
        if mode == "zero3" and param.zero3_split:
            total += param.nbytes // world_size
        elif mode == "expert" and param.expert >= 0:
            total += param.nbytes if param.expert in expert_range(param.num_experts, rank, world_size) else 0
        else:
            total += param.nbytes
    return total


STOP_FLAG_BYTES = 8  # every decode step all-reduces two float32 flags: "rows still running?", "cancelled?"


def decode_traffic(table: list[Parameter], mode: str, world_size: int, hidden_bytes: int) -> float:
    """Bytes one rank sends plus receives in the collectives of one decoded thinker token,
    the stop flags included (every rank must know whether all have finished, or one was cancelled)."""
    if mode == "none" or world_size == 1:
        return 0.0
    stop_flag = collective_bytes("all_reduce", STOP_FLAG_BYTES, world_size)
    thinker = [p for p in table if p.decoder_layer_of_thinker or p.name.startswith("thinker.lm_head.")]
    if mode == "expert":
        moe_layers = {p.name.split(".mlp.")[0] for p in thinker if p.expert >= 0}
        return stop_flag + len(moe_layers) * collective_bytes("all_reduce", hidden_bytes, world_size)
    traffic = stop_flag
    for p in thinker:
        if not p.zero3_split:
            continue
        share = p.top_k / p.num_experts if p.expert >= 0 else 1.0  # top_k of the experts run per token
        traffic += share * collective_bytes("all_gather", p.nbytes / world_size, world_size)
    return traffic


def gathered_for_one_token(table: list[Parameter]) -> tuple[float, float]:
    """(the largest thinker decoder layer's split weights one token uses, whole; the LM head's, whole)."""
    layers: dict[str, float] = {}
    head = 0.0
    for p in table:
        if not p.zero3_split:
            continue
        if p.decoder_layer_of_thinker:
            layer = p.name.split(".mlp.")[0].split(".self_attn.")[0]
            layers[layer] = layers.get(layer, 0.0) + (p.top_k / p.num_experts if p.expert >= 0 else 1.0) * p.nbytes
        elif p.name.startswith("thinker.lm_head."):
            head += p.nbytes
    return max(layers.values(), default=0.0), head


def plan(model_name: str, world_size: int, dtype: str = "bfloat16") -> Plan:
    model = model_skeleton(model_name, dtype)
    table = parameter_table(model, world_size)
    embedding = model.thinker.model.embed_tokens.weight  # the hidden states have its width and dtype
    hidden_bytes = embedding.shape[1] * embedding.itemsize
    without_talker = [p for p in table if p.stage not in ("talker", "code2wav")]
    result = Plan(model_name, world_size, dtype, total_parameters=sum(p.size for p in table))
    for mode in PARALLEL_MODES:
        result.parameter_bytes_per_rank[mode] = {
            "whole": bytes_on_rank(table, mode, world_size),
            "without_talker": bytes_on_rank(without_talker, mode, world_size),
        }
        result.communicated_bytes_per_decoded_token[mode] = decode_traffic(table, mode, world_size, hidden_bytes)
    result.zero3_gathered_layer_bytes, result.zero3_gathered_head_bytes = gathered_for_one_token(table)
    return result


def human(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


def report(result: Plan, modes: list[str], device_memory_gib: float) -> str:
    lines = [
        f"{result.model_name}: {result.total_parameters:,} parameters, {result.dtype}, "
        f"{result.world_size} ranks (parameters only: activations and the KV cache come on top)",
        f"{'mode':<8}{'per rank, whole':>18}{'without talker':>18}   left of {device_memory_gib:g} GiB (whole)",
    ]
    for mode in modes:
        per_rank = result.parameter_bytes_per_rank[mode]
        left = device_memory_gib * GiB - per_rank["whole"]
        lines.append(
            f"{mode:<8}{human(per_rank['whole']):>18}{human(per_rank['without_talker']):>18}   "
            + (human(left) if left >= 0 else f"does not fit ({human(-left)} short)")
        )
    lines.append("bytes each rank sends plus receives per decoded token (thinker):")
    traffic = result.communicated_bytes_per_decoded_token
    for mode in modes:
        lines.append(f"{mode:<8}{human(traffic[mode]):>18}")
    if traffic["expert"] and {"zero3", "expert"} <= set(modes):
        lines.append(f"zero3 / expert: {traffic['zero3'] / traffic['expert']:,.0f}x")
    if "zero3" in modes:
        lines.append(
            f"zero3, gathered whole for one decoded token: a thinker layer {human(result.zero3_gathered_layer_bytes)}, "
            f"the LM head {human(result.zero3_gathered_head_bytes)}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", required=True, help="checkpoint directory or config.json")
    parser.add_argument("--world_size", type=int, default=2, help="msrun workers (NPUs)")
    parser.add_argument("--parallel", choices=[*PARALLEL_MODES, "all"], default="all", help="the mode(s) to print")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device_memory_gib", type=float, default=64.0, help="memory of one NPU")
    parser.add_argument("--json", default=None, help="also write the plan here")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error("--world_size must be at least 1")
    return args


def main(argv=None) -> Plan:
    args = parse_args(argv)
    result = plan(args.model_name, args.world_size, args.dtype)
    modes = list(PARALLEL_MODES) if args.parallel == "all" else [args.parallel]
    print(report(result, modes, args.device_memory_gib))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
