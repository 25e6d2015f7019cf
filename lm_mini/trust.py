"""What lm_mini opens from other people, and the explicit opt-ins for the two things that run code.

- **Checkpoints** (``*.ckpt`` files, FSDP checkpoint folders) are pickles, and unpickling can run any code
  the file names. lm_mini reads them with ``torch.load(weights_only=True)`` (and a restricted unpickler for
  the ``.metadata`` of a sharded folder), which takes tensors, numbers, strings and containers only; a
  checkpoint holding anything else is refused with :class:`UntrustedCheckpoint`. Trusting checkpoints
  (``--trust-checkpoint``, or ``LM_MINI_TRUST_CHECKPOINTS=1``) reads them with plain pickle: it RUNS
  ARBITRARY CODE FROM THE FILE.
- **Component names** ``package.module:Class`` in a config import that module. A config the user passes
  is theirs; a config found in a model or run directory (someone else's) may name such imports only when
  the user allows that name: ``--allow-import package.module:Class`` (or the module, or ``*``), or
  ``LM_MINI_ALLOW_IMPORTS`` (comma-separated). Names registered by installed packages (entry points of
  ``lm_mini.compressors``) need no opt-in: installing the package was the user's choice.

Light on purpose (no torch): the CLI reads it for ``--help``.
"""
from __future__ import annotations

import os
from typing import FrozenSet

TRUST_CHECKPOINTS_ENV = "LM_MINI_TRUST_CHECKPOINTS"
ALLOW_IMPORTS_ENV = "LM_MINI_ALLOW_IMPORTS"
_TRUE = ("1", "true", "yes", "y")


def checkpoints_trusted() -> bool:
    """Did the user opt in to unpickling checkpoints as they are (``LM_MINI_TRUST_CHECKPOINTS``)?"""
    return os.environ.get(TRUST_CHECKPOINTS_ENV, "").strip().lower() in _TRUE


def allowed_imports() -> FrozenSet[str]:
    """The ``module:Attr`` names (or whole modules, or ``*``) a directory's config may import."""
    return frozenset(s.strip() for s in os.environ.get(ALLOW_IMPORTS_ENV, "").split(",") if s.strip())


def import_allowed(name: str) -> bool:
    allowed = allowed_imports()
    return "*" in allowed or name in allowed or name.partition(":")[0] in allowed


class UntrustedCheckpoint(ValueError):
    """A checkpoint that holds more than tensors, numbers, strings and containers (it could run code)."""

    def __init__(self, path: object, offending: str):
        self.path, self.offending = str(path), offending
        super().__init__(
            f"{path}: refused to open this checkpoint: it holds {offending}, which lm_mini's checkpoints never hold "
            "(they are tensors, numbers, strings and containers); unpickling it could run code from the file. "
            f"Only if you trust where it came from: pass --trust-checkpoint (or set {TRUST_CHECKPOINTS_ENV}=1), which "
            "RUNS ARBITRARY CODE FROM THE FILE. To keep a safe copy, convert it once while trusting it: "
            "`lm-mini export CHECKPOINT --out DIR --trust-checkpoint` writes a model directory (safetensors) that "
            "generate, eval and train.init_from read without trust")
