"""The exception types the CLI turns into one line and an exit code."""


class UserError(Exception):
    """Bad input (a file, a field, a checkpoint, a flag): the CLI prints it as one line and exits with 2.

    The message names the thing (file and line, field, flag) and what was expected.
    """


class DiskFull(UserError):
    """A write that failed for want of room (ENOSPC, EDQUOT, EFBIG): one line naming the file, the bytes it needed
    and the bytes free; exit 2. Whatever was being written is removed and what was saved before is untouched, so
    the same command goes on from there once there is room (docs/FAULTS.md)."""


class Diverged(UserError):
    """A training stage met a non-finite loss, gradient norm, reward or weight: the step, the metric and the last
    good saved state are named; nothing non-finite was saved; exit 2."""


class Stopped(Exception):
    """A training stage stopped by SIGTERM or SIGINT at a step boundary, its resumable state saved: the CLI prints
    the message (how to resume) and exits with 0."""
