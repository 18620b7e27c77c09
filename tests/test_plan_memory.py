"""scripts/plan_memory.py: the plan from the config alone agrees with the loaded model
(the msrun script tests check it against what each rank holds and sends at run time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_helpers.measuring.collectives import collective_bytes
from omni_helpers.measuring.metrics import parameter_bytes
from scripts.plan_memory import GiB, main, plan

RELEASED_INSTRUCT_CONFIG = Path(__file__).parent / "data" / "qwen3_omni_30b_a3b_instruct_config.json"


def test_unsharded_and_expert_bytes_are_those_of_the_loaded_model(tiny_checkpoint, tiny_plan, runtime_cpu):
    import mindspore as ms
    from mindone.transformers import Qwen3OmniMoeForConditionalGeneration

    from omni_helpers.parallel.expert_parallel import keep_local_experts

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=ms.float32, attn_implementation="eager"
    )
    assert parameter_bytes(model) == tiny_plan.parameter_bytes_per_rank["none"]["whole"]
    keep_local_experts(model, rank=0, world_size=2)
    assert parameter_bytes(model) == tiny_plan.parameter_bytes_per_rank["expert"]["whole"]
    model.disable_talker()
    assert parameter_bytes(model) == tiny_plan.parameter_bytes_per_rank["expert"]["without_talker"]


def test_tiny_checkpoint_expert_traffic_is_one_all_reduce_per_layer_and_100x_below_zero3(tiny_plan, tiny_checkpoint):
    import json

    text = json.loads((tiny_checkpoint / "config.json").read_text())["thinker_config"]["text_config"]
    one_token_hidden_state = text["hidden_size"] * 4  # float32
    traffic = tiny_plan.communicated_bytes_per_decoded_token
    stop_flags = collective_bytes("all_reduce", 2 * 4, 2)  # float32 "running?" and "cancelled?" flags, every step
    assert traffic["expert"] == stop_flags + text["num_hidden_layers"] * collective_bytes(
        "all_reduce", one_token_hidden_state, 2
    )
    assert traffic["none"] == 0
    assert traffic["zero3"] / traffic["expert"] >= 100


@pytest.fixture(scope="module")
def released_plan(runtime_cpu):
    return plan(str(RELEASED_INSTRUCT_CONFIG), world_size=2, dtype="bfloat16")


def test_released_instruct_expert_bytes_are_layers_times_experts_times_three_matrices(released_plan):
    """An independent count from the config: every expert is three hidden x moe_intermediate matrices."""
    import json

    config = json.loads(RELEASED_INSTRUCT_CONFIG.read_text())
    expert_params = 0
    for stage in ("thinker_config", "talker_config"):
        text = config[stage]["text_config"]
        expert_params += (
            text["num_hidden_layers"] * text["num_experts"] * 3 * text["hidden_size"] * text["moe_intermediate_size"]
        )
    per_rank = released_plan.parameter_bytes_per_rank
    bf16 = 2
    assert per_rank["none"]["whole"] - per_rank["expert"]["whole"] == expert_params * bf16 // 2  # half the experts gone
    assert 35e9 < released_plan.total_parameters < 35.5e9  # "30B-A3B" plus encoders, talker and code2wav


def test_released_instruct_on_two_64_gib_cards(released_plan):
    per_rank = released_plan.parameter_bytes_per_rank
    assert per_rank["none"]["whole"] > 64 * GiB  # a whole copy per card does not fit
    assert per_rank["zero3"]["whole"] < 40 * GiB and per_rank["expert"]["whole"] < 40 * GiB
    assert per_rank["zero3"]["whole"] < per_rank["expert"]["whole"]  # the price of keeping attention whole
    traffic = released_plan.communicated_bytes_per_decoded_token
    assert traffic["zero3"] > 1e9 and traffic["zero3"] / traffic["expert"] > 1000


def test_command_line_prints_every_mode(tiny_checkpoint, tiny_plan, capsys, tmp_path):
    result = main(
        [
            "--model_name",
            str(tiny_checkpoint),
            "--world_size",
            "2",
            "--dtype",
            "float32",
            "--json",
            str(tmp_path / "plan.json"),
        ]
    )
    printed = capsys.readouterr().out
    assert result.parameter_bytes_per_rank == tiny_plan.parameter_bytes_per_rank
    for mode in ("zero3", "expert", "none"):
        assert any(line.startswith(mode) for line in printed.splitlines())
    traffic = tiny_plan.communicated_bytes_per_decoded_token
    assert f"zero3 / expert: {traffic['zero3'] / traffic['expert']:,.0f}x" in printed
    assert (tmp_path / "plan.json").exists()


def test_released_zero3_gathers_a_layer_and_the_head_whole_per_token(released_plan):
    """An independent count from the config: one thinker layer's attention, router and top-k experts, and the LM head."""
    import json

    text = json.loads(RELEASED_INSTRUCT_CONFIG.read_text())["thinker_config"]["text_config"]
    hidden, heads, kv_heads = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    attention = 2 * heads * head_dim * hidden + 2 * kv_heads * head_dim * hidden  # q and o, k and v
    experts = text["num_experts_per_tok"] * 3 * hidden * text["moe_intermediate_size"]
    bf16 = 2
    assert released_plan.zero3_gathered_layer_bytes == (attention + text["num_experts"] * hidden + experts) * bf16
    assert released_plan.zero3_gathered_head_bytes == text["vocab_size"] * hidden * bf16
