"""What every Qwen3-Omni example script needs, one module per concern.

- runtime: device, msrun ranks, seeds; installs what the device needs (`setup_runtime`)
- cpu_fallbacks / mindone_fixes / fast_paths: how mindone runs, each a `patching.PatchSet`
- cli, conversation, validation: flags, the request, and checking it before loading
- loading: processor and model
- parallel / expert_parallel: --parallel zero3 | expert | none, how msrun's workers share the model
- inputs, generation: processor outputs to `ms.Tensor`, `generate` keywords, decoding
- metrics, outputs: timings, and rank-0 output written whole or not at all
"""
