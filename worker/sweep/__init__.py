"""The sweep: one pass over one store for every due policy, and the passes beside it.

`run` holds the pass itself (`sweep`, its options and its report); `planning`,
`quota` and `orphans` feed it decisions; `purge` and `reclaim` reuse its
batches and its report. The names below are what the service layer calls.
"""

# The service layer imports these same names (`worker.service.cli`): an import
# list, not logic.
from worker.sweep.run import (
    BatchFn,
    Outcome,
    PolicyReport,
    ProgressFn,
    SweepOptions,
    SweepReport,
    ThreadFn,
    ThreadPlan,
    open_archive,
    sweep,
)

__all__ = [
    "BatchFn",
    "Outcome",
    "PolicyReport",
    "ProgressFn",
    "SweepOptions",
    "SweepReport",
    "ThreadFn",
    "ThreadPlan",
    "open_archive",
    "sweep",
]
