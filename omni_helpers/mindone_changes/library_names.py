"""Every name of mindone (and the private names of MindSpore) this project calls without replacing it, in one
list, checked when the patches install (`patches.install_patches`): a release that renames one fails at start,
naming it, not in the middle of a request. What the project replaces is named by each `patching.PatchSet`'s
targets, checked as it installs. Written for mindone 0.5.0 and MindSpore 2.7.1.
"""

from __future__ import annotations

import importlib

GENERATION = "mindone.transformers.generation.utils"
MODELING = "mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe"
MASKING = "mindone.transformers.masking_utils"

# The three targets both the fixes and the faster paths replace (`patches.TWICE_REPLACED`), named once for both
ROPE_INDEX = f"{MODELING}.Qwen3OmniMoePreTrainedModelForConditionalGeneration:get_rope_index"
AUDIO_FORWARD = f"{MODELING}.Qwen3OmniMoeAudioEncoder:construct"
FLASH_MASKS = f"{MASKING}.AttentionMaskInterface:_global_mapping"  # its entry "flash_attention_2"

CALLED = [
    # the generation loop (decode_loop) calls these of mindone's GenerationMixin
    (GENERATION, "GenerationMixin._get_initial_cache_position"),
    (GENERATION, "GenerationMixin._valid_auto_compile_criteria"),
    (GENERATION, "GenerationMixin._update_model_kwargs_for_generation"),
    (GENERATION, "GenerationMixin._prepare_special_tokens"),  # sets the generation config's `_pad_token_tensor`
    (GENERATION, "GenerateDecoderOnlyOutput"),
    (GENERATION, "get_multinomial_op"),
    ("mindone.transformers.generation.stopping_criteria", "StoppingCriteriaList"),
    ("mindone.transformers.generation.logits_process", "LogitsProcessorList"),
    # the model's own pieces the faster paths and the fixes build on
    (MODELING, "Qwen3OmniMoeThinkerCausalLMOutputWithPast"),
    (MODELING, "Qwen3OmniMoeTalkerOutputWithPast"),
    (MODELING, "Qwen3OmniMoeCode2Wav.chunked_decode"),
    (MODELING, "apply_rotary_pos_emb_vision"),
    (MODELING, "_get_feat_extract_output_lengths"),
    ("mindone.transformers.cache_utils", "DynamicCache"),
    ("mindone.transformers.modeling_outputs", "BaseModelOutput"),
    ("mindone.transformers.modeling_outputs", "BaseModelOutputWithPast"),
    ("mindone.transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS"),
    ("mindone.transformers.masking_utils", "causal_mask_function"),
    # loading, and ZeRO-3 (whose wrappers `sparse_moe.split_by_zero3` reads)
    ("mindone.transformers", "Qwen3OmniMoeForConditionalGeneration"),
    ("mindone.transformers", "Qwen3OmniMoeProcessor"),
    ("mindone.trainers.zero", "prepare_network"),
    ("mindone.models.modules.parallel.param_wrapper", "ZeroParamWrapper.check_rewrite"),
    # MindSpore's own: a graph compiled apart from its first run (compiled.Graph)
    ("mindspore.common.api", "_JitExecutor.compile"),
]


def missing(names: list[tuple[str, str]] = CALLED) -> list[str]:
    """The names of `names` that the installed packages do not have."""
    gone = []
    for module_name, path in names:
        try:
            found = importlib.import_module(module_name)
            for part in path.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            gone.append(f"{module_name}.{path}")
    return gone


def check_library_names() -> None:
    """Raise, naming every one that is gone, if the installed mindone or MindSpore lacks a name this project calls."""
    gone = missing()
    if gone:
        raise RuntimeError(
            f"this project calls {', '.join(gone)}, which the installed mindone/MindSpore does not have "
            "(written for mindone 0.5.0 and MindSpore 2.7.1); install those versions (requirements.txt)"
        )
