"""lm_mini: efficient LLaVA-Mini-style multimodal models on PyTorch Lightning.

Library code reports through ``logging`` (logger ``lm_mini.<module>``), never ``print``. As Lightning does for its
own logger, the ``lm_mini`` logger has a console handler: a message reaches the terminal as ``lm-mini: <message>``,
on stdout (INFO) or stderr (warnings, errors), whether lm_mini runs from ``lm-mini`` or from Python. Warnings
always show; INFO shows for ``lm_mini.training`` (a run's status lines: which run, what init_from loaded, what a
resume changes) and where a command asks for it (``lm-mini shards build``: a line per shard). Records still
propagate to the root logger (an application's own handlers, pytest's ``caplog``); an application that prints
them itself can drop ours: ``logging.getLogger("lm_mini").removeHandler(lm_mini.CONSOLE)``.
"""
import logging
import sys

__version__ = "0.1.0"


class _Console(logging.Handler):
    """INFO to stdout, warnings and errors to stderr, each as ``lm-mini: <message>``; the streams are looked up
    at every message, so a redirected ``sys.stdout`` (``contextlib.redirect_stdout``, pytest's capsys) gets it."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not end the program (logging's own rule)
            self.handleError(record)


CONSOLE = _Console()
CONSOLE.setFormatter(logging.Formatter("lm-mini: %(message)s"))
_logger = logging.getLogger(__name__)
if not any(isinstance(h, _Console) for h in _logger.handlers):
    _logger.addHandler(CONSOLE)
    logging.getLogger(f"{__name__}.training").setLevel(logging.INFO)
