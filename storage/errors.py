"""premem's errors: one root, a few kinds, one way to put a cause on one line.

Every error a user can fix is a :class:`PrememError` whose message says what was wrong and what to do; the CLI
prints it as one line and exits 2.  Anything else is a bug and keeps its traceback.  This module imports nothing
from premem, so every layer (models included) can raise these.
"""

from __future__ import annotations


class PrememError(Exception):
    """A problem the user can fix; the message is one line: what was wrong and what to do."""


class InputError(PrememError, ValueError):
    """A bad argument, option value, config or input file."""


class CheckpointError(PrememError, ValueError):
    """A checkpoint that cannot be found, loaded or used as asked."""


class StoreError(PrememError):
    """A store that is missing, damaged, or asked for something it does not hold."""


class FingerprintMismatch(StoreError):
    """The store (or file) holds the output of another model than the one expected."""


class LeaseHeld(StoreError):
    """Another live job holds the store's writer lease."""


class LeaseLost(StoreError):
    """This job's writer lease was taken over (it expired or was forced): the job must stop writing."""


class ReaderError(StoreError):
    """A question set, neighbours file and store that do not fit together."""


class RetrievalError(StoreError):
    """A retrieval request (index build, search) that cannot be served as asked."""


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, cut at ``limit`` characters (TensorStore's run over several)."""
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit] + "..."
