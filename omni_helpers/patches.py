"""The one-time step that changes how mindone runs, in one call: `install_patches`.

- CPU fallbacks (`cpu_fallbacks`): CPU kernels for Ascend-only `mint` ops; CPU only.
- Fixes for mindone's bugs (`mindone_fixes`): every device.
- Faster paths (`fast_paths`): every device; `fast_paths=False` leaves stock mindone
  (the benchmark's baseline).
Each is a `patching.PatchSet`; installing one whose target is missing raises.
"""

from __future__ import annotations


def install_patches(device_target: str, fast_paths: bool = True) -> list[str]:
    """Install what `device_target` needs; returns the names of everything replaced."""
    from .quiet import quiet_library_chatter

    quiet_library_chatter()  # before mindone is first imported
    from .fast_paths import install_fast_paths, uninstall_fast_paths
    from .mindone_fixes import install_mindone_fixes

    replaced = []
    if device_target == "CPU":
        from .cpu_fallbacks import install_cpu_fallbacks

        replaced += install_cpu_fallbacks()
    replaced += install_mindone_fixes()
    if fast_paths:
        replaced += install_fast_paths(device_target)
    else:
        uninstall_fast_paths()
    return replaced
