"""What every Qwen3-Omni example script needs, one folder per concern, layers importing downward only
(tests/test_layout.py checks it):

    request/          flags, settings, errors, conversations, request files, media, checkpoints, validation,
                      parallel mode names, cancellation: imports no MindSpore, so --help and bad requests
                      answer before anything loads
    patching.py       PatchSet: replacing a library's attribute, its target checked at install
    measuring/        metrics, collective and host-read counters, forward taps
    runtime.py        device, msrun ranks, seeds, threads
    parallel/         --parallel expert (each rank's experts) and the MoE forward on stacked experts
    mindone_changes/  what changes how mindone runs, installed in one place (patches.install_patches):
                      the names it calls, CPU kernels, bug fixes (speech sampled as released and for
                      every row of a batch among them); faster/: the faster paths and compiled graphs
                      (not imported with --no-fast_paths)
    loading.py        from_pretrained, the processor, and --parallel applied
    generation/       the one generation call (core.generate_answers), streamed text and speech
    outputs/          printing and filing answers (stdout, results.jsonl, WAV files)
    serving/          web_demo.py's engine, rank lockstep, OpenAI-compatible HTTP API and Gradio UI

A script reads top to bottom as the seed does: `request.cli` parses, `request.validation` refuses bad
input, `runtime.setup_runtime` and `mindone_changes.patches.install_patches` prepare MindSpore,
`loading.load_model` loads and shards, `outputs.answering` calls `generation.core.generate_answers` and
files what comes back.
"""
