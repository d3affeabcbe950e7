"""Errors of the pruning maths that callers must tell apart (torch-free, so the worker's error
mapping can import them without loading torch)."""

from __future__ import annotations


class NonFiniteHessianError(ValueError):
    """A layer-input Hessian holds NaN or Inf entries.

    The activations overflowed (fp16) or a calibration window produced non-finite values; no
    amount of damping makes such a matrix usable, so this is not worth retrying as is.
    """

    def __init__(self, where: str, bad_entries: int, total_entries: int) -> None:
        self.where = where
        self.bad_entries = bad_entries
        super().__init__(
            f"{where}: the Hessian of the calibration activations has {bad_entries} of "
            f"{total_entries} entries NaN or Inf (an fp16 overflow or a broken calibration "
            "window); damping cannot repair it: prune in bfloat16 or float32, or check the "
            "calibration text"
        )


class SettingUnavailableError(ValueError):
    """A pruning setting that this model's family, its placement, the GPU count or the GPU's
    memory cannot run (:mod:`slimgpt_core.availability`): every attempt would fail the same
    way. ``fallback``: the preset to submit with instead."""

    def __init__(self, message: str, fallback: str = "standard") -> None:
        super().__init__(message)
        self.fallback = fallback


class RankFailed(RuntimeError):
    """A rank of a multi-GPU job exited abnormally (or never became ready); the job stopped.

    ``rank`` is the failed rank, ``cause`` how it ended ("killed by SIGKILL", "exited with
    code 1"). The layers the job finished are checkpointed, so another attempt resumes after
    them.
    """

    def __init__(self, message: str, rank: int | None = None, cause: str | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.cause = cause
