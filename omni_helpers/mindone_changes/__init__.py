"""Everything that changes how mindone runs, installed in one order by `patches.install_patches`:
the names of mindone the project calls, checked first (library_names); CPU kernels for operations with
none on CPU (cpu_fallbacks, CPU only); mindone's bugs fixed (mindone_fixes, with speech_sampling and batched_speech for its speech); then, unless --no-fast_paths,
the faster paths and compiled graphs (faster/). quiet keeps library chatter off stdout.
"""
