"""One small registry type for the swappable parts (timm-style ``register`` + ``create``).

A name resolves, in order, to: a registered entry; ``package.module:Attr`` (imported);
an entry point of the registry's group (e.g. ``lm_mini.compressors``). Anything else is
refused with the list of known names.

The built-in entries register themselves when their ``home`` module is imported (which imports torch); each
registry also lists their names (``builtin``), so that a config can be checked (:meth:`Registry.check`) and
``lm-mini config show`` run without importing any model code. ``tests/test_registry.py`` keeps the two in step.

``package.module:Attr`` is imported from ``sys.path`` or, as ``python -m`` does, the working directory.
It imports code, so while a config that came with a model or run directory is
read (:func:`config_from_directory`) such a name is refused unless the user allowed it
(``--allow-import``, ``LM_MINI_ALLOW_IMPORTS``; see ``lm_mini.trust``).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, Sequence, TypeVar

from lm_mini.trust import ALLOW_IMPORTS_ENV, import_allowed

T = TypeVar("T")
_CONFIG_FROM: ContextVar[Optional[str]] = ContextVar("lm_mini_config_from", default=None)


@contextmanager
def config_from_directory(where: str) -> Iterator[None]:
    """Within: ``package.module:Attr`` names are refused unless allowed (the config at ``where`` is not the user's)."""
    token = _CONFIG_FROM.set(str(where))
    try:
        yield
    finally:
        _CONFIG_FROM.reset(token)


def _import_user_module(kind: str, name: str, module_name: str) -> Any:
    """Import the module of a ``package.module:Attr`` name from ``sys.path`` and, as ``python -m`` would, the working
    directory (the ``lm-mini`` script does not put it on ``sys.path``); a module found in neither is an error that
    says where to put it."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd, top = os.getcwd(), module_name.split(".")[0]
        in_cwd = (e.name == top and cwd not in sys.path and "" not in sys.path
                  and importlib.machinery.PathFinder.find_spec(top, [cwd]) is not None)
        if not in_cwd:
            raise KeyError(_cannot_import(kind, name, module_name, e)) from e
        sys.path.append(cwd)  # after everything installed: a local file never shadows a package
        importlib.invalidate_caches()
        try:
            return importlib.import_module(module_name)
        except ImportError as again:
            raise KeyError(_cannot_import(kind, name, module_name, again)) from again
    except ImportError as e:
        raise KeyError(_cannot_import(kind, name, module_name, e)) from e


def _cannot_import(kind: str, name: str, module_name: str, e: BaseException) -> str:
    return (f"{kind} '{name}': cannot import module '{module_name}' ({e}); looked on sys.path and in the working "
            f"directory {os.getcwd()}: install its package, or set PYTHONPATH to the folder that holds it")


class ImportNotAllowed(KeyError):
    """A ``package.module:Attr`` name in a config that came with a model or run directory, not allowed by the user."""


class Registry(Generic[T]):
    def __init__(self, kind: str, home: Optional[str] = None, entry_point_group: Optional[str] = None,
                 builtin: Sequence[str] = ()):
        self.kind = kind
        self.home = home  # module whose import registers the built-in entries
        self.entry_point_group = entry_point_group
        self.builtin = tuple(builtin)  # the names ``home`` registers, known without importing it (empty: import it)
        self._entries: Dict[str, T] = {}

    def register(self, name: Optional[str] = None) -> Callable[[T], T]:
        """Decorator: ``@COMPRESSORS.register("my_pool")``."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._entries and self._entries[key] is not obj:
                raise KeyError(f"{self.kind} '{key}' is already registered")
            self._entries[key] = obj
            return obj

        return deco

    def _load_home(self) -> None:
        if self.home:
            importlib.import_module(self.home)

    def _entry_points(self) -> Dict[str, Any]:
        if not self.entry_point_group:
            return {}
        return {ep.name: ep for ep in entry_points(group=self.entry_point_group)}

    def names(self) -> List[str]:
        if not self.builtin:
            self._load_home()
        return sorted(set(self.builtin) | set(self._entries) | set(self._entry_points()))

    def check(self, name: str) -> None:
        """Raise :meth:`get`'s ``KeyError`` for a name that does not resolve, without importing a built-in entry's
        or an entry point's code (a ``package.module:Attr`` name is imported: that is how it resolves)."""
        if name in self.builtin or name in self._entries or name in self._entry_points():
            return
        self.get(name)

    def get(self, name: str) -> T:
        self._load_home()
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            where = _CONFIG_FROM.get()
            if where is not None and not import_allowed(name):
                raise ImportNotAllowed(
                    f"{self.kind} '{name}' in {where} would import Python code (module '{module_name}'); a config that "
                    f"comes with a model or run directory may not import code unless you allow it. If you trust it and "
                    f"have that package installed: --allow-import {name} (or {ALLOW_IMPORTS_ENV}={name})")
            module = _import_user_module(self.kind, name, module_name)
            if not hasattr(module, attr):
                raise KeyError(f"{self.kind} '{name}': module '{module_name}' has no attribute '{attr}'")
            return getattr(module, attr)
        eps = self._entry_points()
        if name in eps:
            return eps[name].load()
        known = ", ".join(self.names()) or "(none)"
        hint = "; or 'package.module:Class'" + (f" or an entry point in group '{self.entry_point_group}'" if self.entry_point_group else "")
        raise KeyError(f"unknown {self.kind} '{name}'. Known {self.kind}s: {known}{hint}")

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except KeyError:
            return False

    def __iter__(self):
        """The known names (as :meth:`names`), so ``sorted(REGISTRY)`` lists them."""
        return iter(self.names())


ENCODERS: Registry = Registry("vision encoder", home="lm_mini.models.encoders", builtin=("hf_clip", "hf_siglip", "timm"))
PROJECTORS: Registry = Registry("projector", home="lm_mini.models.projector", builtin=("linear", "mlp2x_gelu"))
COMPRESSORS: Registry = Registry("compressor", home="lm_mini.models.compressors", entry_point_group="lm_mini.compressors",
                                 builtin=("avg_pool", "identity", "qformer", "query_attention"))
LLMS: Registry = Registry("llm builder", home="lm_mini.models.llm", builtin=("hf_causal_lm",))
TEMPLATES: Registry = Registry("conversation template", home="lm_mini.data.conversation",
                               builtin=("llama3", "llava_llama_3_1", "plain", "vicuna_v1"))
METRICS: Registry = Registry("metric", home="lm_mini.eval.metrics", entry_point_group="lm_mini.metrics",
                             builtin=("exact_match", "multiple_choice", "multiple_choice_lenient", "pope", "pope_lenient",
                                      "vqa_accuracy"))
