"""The in-app retention wrapper: `RetentionSaver` around an application's checkpointer.

- `wrapper`: `RetentionSaver` itself (what runs on the application's puts and reads);
- `operations`: the typed operations its retention logic asks of a backend;
- `backends`: the `Backend` interface and how a saver's backend is chosen;
  `memory`, `sqlite`, `postgres`: one backend per saver family, each imported
  only when a saver of its family is wrapped;
- `metrics`: its `checkpoint_janitor_saver_*` counters.
"""

from worker.saver.metrics import SaverMetrics
from worker.saver.wrapper import RetentionSaver

__all__ = ["RetentionSaver", "SaverMetrics"]
