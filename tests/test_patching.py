"""Patches fail loudly: a target that is not there is an error at install time, naming it."""

from __future__ import annotations

import functools

import pytest

from omni_helpers.patching import PatchSet, PatchTargetMissing


def test_a_missing_attribute_is_an_error_naming_it_and_nothing_is_half_installed():
    import json

    patches = PatchSet("test patches", package="numpy", written_for="1.26.4")
    patches.replaces("json:dumps")(lambda *a, **k: "patched")
    patches.replaces("json:no_such_function")(lambda: None)
    with pytest.raises(PatchTargetMissing, match=r"json\.no_such_function: it does not exist in numpy"):
        patches.install()
    assert json.dumps({}) == "{}" and not patches.installed  # checked before anything changed


def test_a_missing_module_is_an_error_naming_it():
    patches = PatchSet("test patches", package="numpy", written_for="1.26.4")
    patches.replaces("no_such_package.module:thing")(lambda: None)
    with pytest.raises(PatchTargetMissing, match="no_such_package.module.thing"):
        patches.install()


def test_install_and_uninstall_put_back_what_was_there(capsys):
    import json

    original = json.dumps
    patches = PatchSet("test patches", package="numpy", written_for="0.0.1")  # another version: one warning
    patches.replaces("json:dumps")(lambda *a, **k: "patched")
    patches.adds("json:brand_new")(lambda: "new")
    patches.install()
    patches.install()  # idempotent, and warns only once
    try:
        assert json.dumps({}) == "patched" and json.brand_new() == "new" and patches.original("json:dumps") is original
    finally:
        patches.uninstall()
    assert json.dumps is original and not hasattr(json, "brand_new")
    assert capsys.readouterr().err.count("written for numpy 0.0.1") == 1


def test_a_dict_entry_is_replaced_and_put_back_over_an_earlier_set():
    """Two sets on one registry entry (the flash mask: a fix, then a faster path over it): each
    knows what it replaced, and removing the later one leaves the earlier one in place."""
    import json.decoder as decoder

    stock = decoder.BACKSLASH["n"]
    fix, faster = (PatchSet(name, package="numpy", written_for="1.26.4") for name in ("fix", "faster"))
    fix.replaces_entry("json.decoder:BACKSLASH", "n")("fixed")
    faster.replaces_entry("json.decoder:BACKSLASH", "n")("faster")
    fix.install()
    faster.install()
    try:
        assert decoder.BACKSLASH["n"] == "faster" and faster.original_entry("json.decoder:BACKSLASH", "n") == "fixed"
        faster.uninstall()
        assert decoder.BACKSLASH["n"] == "fixed" and fix.original_entry("json.decoder:BACKSLASH", "n") == stock
    finally:
        faster.uninstall()
        fix.uninstall()
    assert decoder.BACKSLASH["n"] == stock


def test_the_projects_patches_are_written_for_the_installed_versions():
    from omni_helpers.mindone_changes.cpu_fallbacks import CPU_FALLBACKS
    from omni_helpers.mindone_changes.faster.fast_paths import FAST_PATHS
    from omni_helpers.mindone_changes.mindone_fixes import MINDONE_FIXES

    for patches in (CPU_FALLBACKS, FAST_PATHS, MINDONE_FIXES):
        assert patches.installed_version() == patches.written_for, patches.name


def test_without_the_faster_paths_their_modules_are_not_even_imported(tiny_checkpoint, tmp_path):
    """--no-fast_paths: mindone with the bug fixes (and the CPU kernels) only; a renamed faster-path target cannot stop it."""
    import subprocess
    import sys

    from tests.script_runs import ROOT, script_env

    program = (
        "import sys; from pathlib import Path\n"
        "from omni_helpers.runtime import setup_runtime\n"
        "from omni_helpers.mindone_changes.patches import install_patches\n"
        "from omni_helpers.loading import load_model, shard_model\n"
        "runtime = setup_runtime('CPU'); replaced = install_patches('CPU', fast_paths=False)\n"
        f"shard_model(load_model(Path({str(tiny_checkpoint)!r}), 'float32', 'eager', True), runtime, stack=False)\n"
        "import omni_helpers.generation.core, omni_helpers.serving.engine\n"
        "faster = ['fast_paths', 'decode_graph', 'prompt_graph', 'encoder_graph', 'compiled', 'decode_loop', 'decode_steps',"
        " 'host_positions', 'thinker_prompt', 'graph_ops']\n"
        "print(sorted(m for m in faster if 'omni_helpers.' + m in sys.modules), len(replaced))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300, env=script_env(), cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported, replaced = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert imported == "[]" and int(replaced) > 0


def test_every_library_name_the_project_calls_is_there_and_a_missing_one_is_named(runtime_cpu, monkeypatch):
    from mindone.transformers.generation.utils import GenerationMixin

    from omni_helpers.mindone_changes.library_names import check_library_names, missing

    assert missing() == []
    monkeypatch.delattr(GenerationMixin, "_valid_auto_compile_criteria")
    with pytest.raises(RuntimeError, match="GenerationMixin._valid_auto_compile_criteria, which the installed"):
        check_library_names()


def test_each_target_replaced_twice_chains_faster_path_then_fix_then_mindone(runtime_cpu):
    from omni_helpers.mindone_changes.faster.fast_paths import FAST_PATHS
    from omni_helpers.mindone_changes.mindone_fixes import MINDONE_FIXES
    from omni_helpers.mindone_changes.patches import TWICE_REPLACED
    from omni_helpers.patching import resolve_owner

    named = {target.replace(":", ".") + ("" if key is None else f"[{key!r}]") for target, key in TWICE_REPLACED}
    assert set(MINDONE_FIXES.targets()) & set(FAST_PATHS.targets()) == named  # no other target is replaced twice
    for target, key in TWICE_REPLACED:
        module, attribute = target.split(":")
        installed = getattr(resolve_owner(module), attribute)
        installed = installed if key is None else installed[key]
        original = FAST_PATHS.original if key is None else functools.partial(FAST_PATHS.original_entry, key=key)
        stock = MINDONE_FIXES.original if key is None else functools.partial(MINDONE_FIXES.original_entry, key=key)
        assert installed is FAST_PATHS.replacement(target, key)
        assert original(target) is MINDONE_FIXES.replacement(target, key)  # what the faster path falls back to
        assert stock(target).__module__.startswith("mindone.")  # what the fix wraps
