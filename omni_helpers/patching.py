"""One small mechanism for replacing attributes of installed packages at run time.

The project never edits installed files. What changes how mindone runs (CPU fallbacks,
fixes for mindone's bugs, faster paths) is a `PatchSet`: a named list of
`module:attribute` targets and their replacements, installed in one call and
removable again (tests remove a set to show that it is needed).
"""

from __future__ import annotations

import importlib
from typing import Callable


def resolve_owner(path: str):
    """Import `path`; if it names a class inside a module (`pkg.module.Class`), return the class."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, _, cls = path.rpartition(".")
        return getattr(importlib.import_module(module), cls)


class PatchSet:
    def __init__(self, name: str):
        self.name = name
        self._replacements: dict[tuple[str, str], Callable] = {}
        self._originals: dict[tuple[str, str], object] = {}

    def replaces(self, *targets: str):
        """Decorator: the function replaces each `module:attribute` target when the set is installed."""

        def register(fn):
            for target in targets:
                module, attr = target.split(":")
                self._replacements[(module, attr)] = fn
            return fn

        return register

    def original(self, target: str):
        """What `target` was before this set was installed (the current value if it is not)."""
        module, attr = target.split(":")
        if (module, attr) in self._originals:
            return self._originals[(module, attr)]
        return getattr(resolve_owner(module), attr)

    @property
    def installed(self) -> bool:
        return bool(self._originals)

    def targets(self) -> list[str]:
        return sorted(f"{module}.{attr}" for module, attr in self._replacements)

    def install(self) -> list[str]:
        """Put every replacement in place (idempotent); returns the targets replaced."""
        for (module, attr), fn in self._replacements.items():
            owner = resolve_owner(module)
            if (module, attr) not in self._originals:
                self._originals[(module, attr)] = getattr(owner, attr, None)
            setattr(owner, attr, fn)
        return self.targets()

    def uninstall(self) -> None:
        """Put back what was there before `install`."""
        for (module, attr), previous in self._originals.items():
            owner = resolve_owner(module)
            if previous is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, previous)
        self._originals.clear()
