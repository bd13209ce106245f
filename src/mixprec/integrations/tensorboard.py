"""Write :meth:`Precision.metrics() <mixprec.precision.Precision.metrics>` to TensorBoard.

Uses ``torch.utils.tensorboard`` (needs the ``tensorboard`` package: ``pip install
mixprec[tensorboard]``).

Example:
    >>> import tempfile, torch, mixprec as mp
    >>> from mixprec.integrations.tensorboard import TensorBoardLogger
    >>> precision = mp.Precision("fp16-mixed")
    >>> with TensorBoardLogger(tempfile.mkdtemp()) as tb:
    ...     tb.log(precision.metrics(), step=0)  # how many scalars were written
    4
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TensorBoardLogger", "log_metrics"]


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch.utils.tensorboard imports the tensorboard package
        raise ImportError(
            "mixprec.integrations.tensorboard needs the 'tensorboard' package: "
            "pip install 'mixprec[tensorboard]'"
        ) from err
    return SummaryWriter


def log_metrics(writer, metrics: dict[str, float], step: int) -> int:
    """``writer.add_scalar(name, value, step)`` for each entry; returns how many were written.

    Values must be numbers (``bool`` / ``int`` / ``float``); an inf or NaN is written as it
    is (TensorBoard shows it), never dropped.

    Raises:
        TypeError: a value that is not a number, naming its key.
    """
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"metric {name!r} is {type(value).__name__} {value!r}; TensorBoard scalars "
                "must be int or float"
            )
        writer.add_scalar(name, float(value), step)
    return len(metrics)


class TensorBoardLogger:
    """A ``SummaryWriter`` for mixprec's metrics dicts (a context manager that closes it).

    Args:
        log_dir: directory of the event files (``tensorboard --logdir`` it).
        writer: an existing ``SummaryWriter`` to write to instead (not closed by this).
    """

    def __init__(self, log_dir: str | Path | None = None, *, writer=None) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("give exactly one of log_dir (a directory) or writer (SummaryWriter)")
        self._owns = writer is None
        self.writer = writer if writer is not None else _summary_writer()(str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> int:
        """Write one step's metrics (see :func:`log_metrics`)."""
        return log_metrics(self.writer, metrics, step)

    def close(self) -> None:
        """Flush, and close the writer if this logger opened it."""
        self.writer.flush()
        if self._owns:
            self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
