"""One small mechanism for replacing attributes of installed packages at run time.

The project never edits installed files. What changes how mindone runs (CPU fallbacks,
fixes for mindone's bugs, faster paths) is a `PatchSet`: a named list of
`module:attribute` targets and their replacements, installed in one call and
removable again (tests remove a set to show that it is needed).

A patch is written against one version of its package. Installing it where its target
no longer exists is an error naming the target (a silent no-op would leave the bug or
the slow path in place while claiming otherwise); on another version of the package it
still installs, with one warning.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
from typing import Callable, Optional


class PatchTargetMissing(RuntimeError):
    """A patch's target is not where its PatchSet expects it (another version of the package?)."""


def resolve_owner(path: str):
    """Import `path`; if it names a class inside a module (`pkg.module.Class`), return the class."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, _, cls = path.rpartition(".")
        return getattr(importlib.import_module(module), cls)


class PatchSet:
    """Replacements for attributes of one package, written for one version of it."""

    def __init__(self, name: str, package: str, written_for: str):
        self.name, self.package, self.written_for = name, package, written_for
        self._replacements: dict[tuple[str, str], Callable] = {}
        self._new: set[tuple[str, str]] = set()  # targets that do not exist until installed
        self._entries: dict[tuple[str, str, str], Callable] = {}  # (owner, dict attribute, key) -> value
        self._original_entries: dict[tuple[str, str, str], object] = {}
        self._originals: dict[tuple[str, str], object] = {}
        self._version_checked = False

    def replaces(self, *targets: str):
        """Decorator: the function replaces each existing `module:attribute` target when the set is installed."""

        def register(fn):
            for target in targets:
                module, attr = target.split(":")
                self._replacements[(module, attr)] = fn
            return fn

        return register

    def adds(self, target: str):
        """Decorator: the function becomes a new attribute (a module global shadowing a builtin)."""

        def register(fn):
            module, attr = target.split(":")
            self._replacements[(module, attr)] = fn
            self._new.add((module, attr))
            return fn

        return register

    def replaces_entry(self, target: str, key: str):
        """Decorator: the function replaces `key` of the dict at `module:attribute` (a registry
        such as mindone's attention-mask interface, which looks its functions up by name)."""

        def register(fn):
            module, attr = target.split(":")
            self._entries[(module, attr, key)] = fn
            return fn

        return register

    def original(self, target: str):
        """What `target` was before this set was installed (the current value if it is not)."""
        module, attr = target.split(":")
        if (module, attr) in self._originals:
            return self._originals[(module, attr)]
        return getattr(resolve_owner(module), attr)

    def original_entry(self, target: str, key: str):
        """What `key` of the dict at `target` was before this set was installed (the current value if it is not)."""
        module, attr = target.split(":")
        if (module, attr, key) in self._original_entries:
            return self._original_entries[(module, attr, key)]
        return getattr(resolve_owner(module), attr)[key]

    def replacement(self, target: str, key: Optional[str] = None):
        """What this set puts at `target` (at its entry `key`, for a dict) when installed."""
        module, attr = target.split(":")
        return self._replacements[(module, attr)] if key is None else self._entries[(module, attr, key)]

    @property
    def installed(self) -> bool:
        return bool(self._originals or self._original_entries)

    def targets(self) -> list[str]:
        return sorted(
            [f"{module}.{attr}" for module, attr in self._replacements]
            + [f"{module}.{attr}[{key!r}]" for module, attr, key in self._entries]
        )

    def installed_version(self) -> Optional[str]:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def _warn_once_on_another_version(self) -> None:
        if self._version_checked:
            return
        self._version_checked = True
        version = self.installed_version()
        if version != self.written_for:
            print(
                f"warning: the {self.name} were written for {self.package} {self.written_for}, "
                f"this is {version}; the parity tests tell whether they still hold",
                file=sys.stderr,
            )

    def _owner_of(self, module: str, attr: str):
        try:
            owner = resolve_owner(module)
        except (ImportError, AttributeError) as error:
            raise PatchTargetMissing(
                f"{self.name}: cannot patch {module}.{attr}: {module} is missing ({error})"
            ) from error
        if (module, attr) not in self._new and not hasattr(owner, attr):
            raise PatchTargetMissing(
                f"{self.name}: cannot patch {module}.{attr}: it does not exist in {self.package} "
                f"{self.installed_version()} (written for {self.written_for})"
            )
        return owner

    def _registry_of(self, module: str, attr: str, key: str) -> dict:
        registry = getattr(self._owner_of(module, attr), attr)
        if not isinstance(registry, dict) or key not in registry:
            raise PatchTargetMissing(
                f"{self.name}: cannot patch {module}.{attr}[{key!r}]: no such entry in "
                f"{self.package} {self.installed_version()} (written for {self.written_for})"
            )
        return registry

    def install(self) -> list[str]:
        """Put every replacement in place (idempotent); returns the targets replaced."""
        self._warn_once_on_another_version()
        owners = {key: self._owner_of(*key) for key in self._replacements}  # every target checked before any change
        registries = {key: self._registry_of(*key) for key in self._entries}
        for (module, attr), fn in self._replacements.items():
            if (module, attr) not in self._originals:
                self._originals[(module, attr)] = getattr(owners[(module, attr)], attr, None)
            setattr(owners[(module, attr)], attr, fn)
        for entry, fn in self._entries.items():
            self._original_entries.setdefault(entry, registries[entry][entry[2]])
            registries[entry][entry[2]] = fn
        return self.targets()

    @contextlib.contextmanager
    def applied(self):
        """Installed for the length of a `with` block only (counters that exist while counting)."""
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def uninstall(self) -> None:
        """Put back what was there before `install`."""
        for (module, attr), previous in self._originals.items():
            owner = resolve_owner(module)
            if (module, attr) in self._new:
                delattr(owner, attr)
            else:
                setattr(owner, attr, previous)
        for (module, attr, key), previous in self._original_entries.items():
            getattr(resolve_owner(module), attr)[key] = previous
        self._originals.clear()
        self._original_entries.clear()
