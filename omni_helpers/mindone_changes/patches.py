"""The one-time step that changes how mindone runs, in one call: `install_patches`.

- CPU fallbacks (`cpu_fallbacks`): CPU kernels for Ascend-only `mint` ops; CPU only.
- Fixes for mindone's bugs (`mindone_fixes`): every device.
- Faster paths (`fast_paths`): every device, optional (`--no-fast_paths`): without them
  mindone runs with this project's bug fixes alone, and the faster-path and compiled-graph
  modules are not even imported.
Each is a `patching.PatchSet`; installing one whose target is missing raises. The order is
fixed here, and only here: CPU fallbacks, then the fixes, then the faster paths, because the faster
paths replace three of the methods the fixes replace (`TWICE_REPLACED`) and fall back to the fixed
ones (tests/test_patching.py follows each chain).
"""

from __future__ import annotations

import sys

from omni_helpers.mindone_changes.library_names import AUDIO_FORWARD, FLASH_MASKS, ROPE_INDEX

FASTER_PATHS_MODULE = "omni_helpers.mindone_changes.faster.fast_paths"


TWICE_REPLACED = [(ROPE_INDEX, None), (AUDIO_FORWARD, None), (FLASH_MASKS, "flash_attention_2")]  # (target, entry)


def install_patches(device_target: str, fast_paths: bool = True) -> list[str]:
    """Install what `device_target` needs; returns the names of everything replaced."""
    from omni_helpers.mindone_changes.quiet import quiet_library_chatter

    quiet_library_chatter()  # before mindone is first imported
    from omni_helpers.mindone_changes.library_names import check_library_names
    from omni_helpers.mindone_changes.mindone_fixes import install_mindone_fixes

    check_library_names()  # what the project calls of mindone, there before anything is replaced

    replaced = []
    if device_target == "CPU":
        from omni_helpers.mindone_changes.cpu_fallbacks import install_cpu_fallbacks

        replaced += install_cpu_fallbacks()
    replaced += install_mindone_fixes()  # first: the faster paths are layered on the fixed methods
    if fast_paths:
        from omni_helpers.mindone_changes.faster.fast_paths import install_fast_paths

        replaced += install_fast_paths(device_target)
    elif FASTER_PATHS_MODULE in sys.modules:  # installed earlier in this process (the benchmark's stock runs)
        sys.modules[FASTER_PATHS_MODULE].uninstall_fast_paths()
    return replaced
