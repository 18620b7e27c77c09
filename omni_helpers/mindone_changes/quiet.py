"""Library chatter silenced at its source, so that stdout carries the answer alone.

Each line says what it silences and why it is harmless. What cannot be silenced from
here (MindSpore's C++ start-up logs under msrun; set GLOG_v=3, as the launchers do) is
explained in the README's troubleshooting section.
"""

from __future__ import annotations

import logging


def quiet_library_chatter() -> None:
    """Call before importing mindone."""
    # transformers 4.57.1 prints "Config not found for parakeet" to stdout, three times per
    # process, while documenting mindone's newer Parakeet classes; naming the config silences it.
    import importlib

    auto_docstring = importlib.import_module("transformers.utils.auto_docstring")  # the module, not its function
    auto_docstring.HARDCODED_CONFIG_FOR_MODELS.setdefault("parakeet", "ParakeetConfig")
    # ZeRO-3's set-up logs one warning per replicated parameter (norms, biases: hundreds at full size).
    logging.getLogger("mindone.trainers.zero").setLevel(logging.ERROR)
