"""Plugin registries, filled from entry-point groups.

Built-in methods, models, datasets and backends register through exactly the entry-point groups
a third-party distribution uses (``fqtbench.methods``, ``fqtbench.models``, ``fqtbench.datasets``,
``fqtbench.backends``). A plugin that fails to import is kept as a *broken* entry (listed with its
distribution and error) while the others keep working; two plugins claiming one name are refused
with a message naming both distributions.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, Iterable, TypeVar

from .errors import UnknownNameError, UserError

T = TypeVar("T")

RUNTIME_DIST = "<runtime>"


class DuplicateNameError(UserError):
    """Two plugins claim one name in one registry."""


class BrokenPluginError(UserError):
    """The requested plugin exists but failed to load."""


@dataclass(frozen=True)
class PluginInfo:
    """What `fqtbench list` shows for one plugin."""

    kind: str
    name: str
    version: str
    dist: str
    description: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Registry(Generic[T]):
    """Name -> plugin object for one kind. Entry points load lazily, once, on first access."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}
        self._info: dict[str, PluginInfo] = {}
        self._broken: dict[str, PluginInfo] = {}
        self._conflicts: dict[str, str] = {}  # name -> duplicate-name message
        self._loaded = False

    # -- registration -----------------------------------------------------------------------
    def register(self, obj: T, dist: str = RUNTIME_DIST) -> T:
        """Add a plugin object (it must carry `name`, `version`, `description`)."""
        self._ensure_loaded()
        self._add(obj, dist)
        return obj

    def _add(self, obj: T, dist: str) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise UserError(f"{self.kind} plugin from {dist} has no 'name' attribute")
        if name in self._items:
            other = self._info[name].dist
            raise DuplicateNameError(
                f"duplicate {self.kind} name '{name}': provided by both '{other}' and '{dist}'; "
                f"uninstall one of them or rename the plugin"
            )
        self._items[name] = obj
        self._info[name] = PluginInfo(
            kind=self.kind,
            name=name,
            version=str(getattr(obj, "version", "?")),
            dist=dist,
            description=str(getattr(obj, "description", "")).strip().splitlines()[0]
            if getattr(obj, "description", "")
            else "",
        )

    def unregister(self, name: str) -> None:
        """Remove a runtime-registered plugin (tests)."""
        self._items.pop(name, None)
        self._info.pop(name, None)
        self._broken.pop(name, None)
        self._conflicts.pop(name, None)

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        eps = sorted(metadata.entry_points(group=self.group), key=lambda e: (e.name, _dist_name(e)))
        for ep in eps:
            dist = _dist_name(ep)
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._broken[ep.name] = PluginInfo(self.kind, ep.name, "?", dist, "", _one_line(exc))
                continue
            problem = self._entry_point_problem(ep.name, obj)
            if problem:
                self._broken[ep.name] = PluginInfo(self.kind, ep.name, "?", dist, "", problem)
                continue
            try:
                self._add(obj, dist)
            except DuplicateNameError as exc:
                self._broken[f"{ep.name}@{dist}"] = PluginInfo(
                    self.kind, ep.name, str(getattr(obj, "version", "?")), dist, "", str(exc)
                )
                self._conflicts[ep.name] = str(exc)
                first = self._info[ep.name]  # neither may run, so `list` shows both as refused
                self._info[ep.name] = PluginInfo(first.kind, first.name, first.version, first.dist, first.description, str(exc))

    def _entry_point_problem(self, ep_name: str, obj: Any) -> str | None:
        """Why a loaded entry point is not a usable plugin object, or None."""
        if isinstance(obj, type):
            return (f"entry point '{ep_name}' loads the class {obj.__name__}; point it at an instance "
                    f"(e.g. PLUGIN = {obj.__name__}())")
        name = getattr(obj, "name", None)
        if name is None:
            return f"entry point '{ep_name}' loads a {type(obj).__name__} with no 'name'; expected a {self.kind} object named '{ep_name}'"
        if name != ep_name:
            return f"entry point '{ep_name}' loads a {self.kind} named {name!r}; the two names must match"
        return None

    # -- lookup ------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        self._ensure_loaded()
        if name in self._conflicts:
            raise DuplicateNameError(self._conflicts[name])
        if name in self._items:
            return self._items[name]
        if name in self._broken:
            info = self._broken[name]
            raise BrokenPluginError(f"{self.kind} '{name}' from '{info.dist}' failed to load: {info.error}")
        allowed = ", ".join(self.names()) or "(none installed)"
        raise UnknownNameError(f"unknown {self.kind} '{name}'; available: {allowed}")

    def names(self, pattern: str | None = None) -> list[str]:
        self._ensure_loaded()
        names = sorted(self._items)
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._items

    def infos(self, include_broken: bool = True) -> list[PluginInfo]:
        self._ensure_loaded()
        rows: Iterable[PluginInfo] = list(self._info.values())
        if include_broken:
            rows = list(rows) + list(self._broken.values())
        return sorted(rows, key=lambda i: (i.name, i.dist))

    def info(self, name: str) -> PluginInfo:
        self.get(name)
        return self._info[name]

    def reload(self) -> None:
        """Forget everything and re-read entry points (after installing a plugin in-process)."""
        self._items.clear()
        self._info.clear()
        self._broken.clear()
        self._conflicts.clear()
        self._loaded = False


methods: Registry[Any] = Registry("method", "fqtbench.methods")
models: Registry[Any] = Registry("model", "fqtbench.models")
datasets: Registry[Any] = Registry("dataset", "fqtbench.datasets")
backends: Registry[Any] = Registry("backend", "fqtbench.backends")

REGISTRIES: dict[str, Registry[Any]] = {
    "methods": methods,
    "models": models,
    "datasets": datasets,
    "backends": backends,
}
