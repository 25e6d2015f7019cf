"""Quieter runs: what Lightning, MLflow and torchdata print on every run that says nothing about that run.

Silenced (:func:`quiet_libraries`, called where a run or an evaluation starts a Trainer; idempotent):

- Lightning's "💡 Tip: ... litlogger" advertisement, and its "Experiment with name X not found. Creating it."
  (a new experiment is the normal case);
- MLflow's "Creating initial MLflow database tables..." / "Updating database tables" (a new local store);
- deprecation warnings raised inside the libraries by the libraries themselves (torchdata's ``set_vital``,
  Lightning's ``LeafSpec`` check): nothing a user of lm_mini can change;
- Lightning's "Your `IterableDataset` has `__len__` defined": lm_mini's loader gives every worker its own
  share and defines ``__len__`` on purpose (exact mid-epoch resume, docs/internals.md).

Everything else (real warnings, Lightning's device lines, the progress bar) is left as it is. Lightning's model
summary, whose FLOPs column reads 0 without an example input, is replaced by one line per run
(``training.callbacks.PartsSummary``); ``lm-mini efficiency`` counts the FLOPs.
"""
from __future__ import annotations

import logging
import re
import warnings

# (logger, text of the records dropped)
_DROPPED_RECORDS = (
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),
    ("lightning.pytorch.loggers.mlflow", "not found. Creating it."),
    ("mlflow.store.db.utils", "database tables"),
)
# (start of the warning's message, why it says nothing to a user of lm_mini)
_IGNORED_WARNINGS = (
    ("'set_vital' is deprecated", "torchdata's StatefulDataLoader calls a deprecated torch API"),
    ("`isinstance(treespec, LeafSpec)` is deprecated", "Lightning's own pytree helper"),
    ("Your `IterableDataset` has `__len__` defined", "lm_mini's loader shares samples out per worker itself"),
)


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries() -> None:
    """Install the filters above (once per process; DataLoader workers and Lightning's ranks inherit or redo it)."""
    for name, text in _DROPPED_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
            logger.addFilter(_Drop(text))
    for start, _why in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start))
