"""What every Qwen3-Omni example script needs, one module per idea.

Request (imports nothing heavy, so --help and bad requests answer at once):
- cli: the shared flags; settings: GenerationSettings; errors: RequestError
- conversation, requests, media, checkpoint, validation: building a request and checking it
- openai_api: Chat Completions bodies to conversations and settings, answers to responses

Model (MindSpore and mindone):
- runtime: device, msrun ranks, seeds
- patches: install_patches, the one step that changes how mindone runs, from three PatchSets
  (patching): cpu_fallbacks (CPU only), mindone_fixes and fast_paths (every device)
- loading, parallel, expert_parallel, sparse_moe: loading, and --parallel zero3 | expert | none
- decode_loop, decode_steps: the generation loop and the thinker's and talker's decode steps
  with one host read per step (faster paths); decode_graph: those steps compiled, on KV caches
  written in place
- core: the one generation call, generate_answers; inputs, streaming (text), speech_stream (speech),
  forward_taps (timing forwards without a hook per request)
- answering, outputs: printing, streaming and filing answers; quiet: library chatter off stdout
- metrics, collectives, host_syncs: figures returned as values, counters installed only while counting

Server (web_demo.py): serving (the engine, in arrival order), lockstep (jobs to every rank),
http_api (the OpenAI-compatible routes), web_ui (the Gradio UI).
"""
