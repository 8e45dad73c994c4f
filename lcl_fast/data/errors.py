"""The data layer's user error: input that cannot be trained on, said in one line naming the file."""

from __future__ import annotations

from ..errors import UserError


class DataError(UserError):
    """Data a run cannot use (no shard gives a sample, a shard that cannot be read, ...). A
    :class:`~lcl_fast.errors.UserError`: the message is one line that names the file or flag and
    what is wrong; a command line prints it as is, without a traceback."""


class NoUsableData(DataError, RuntimeError):
    """A whole pass over a stream's shards gave no usable sample (raised while reading, instead of
    looping forever); names the last thing skipped. Also a ``RuntimeError``, as it always was."""
