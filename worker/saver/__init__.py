"""The in-app retention wrapper: `RetentionSaver` around an application's checkpointer.

- `wrapper`: `RetentionSaver` itself (what runs on the application's puts and reads);
- `backends`: the storage operations it needs, one backend per saver family.
"""

from worker.saver.wrapper import RetentionSaver, SaverMetrics

__all__ = ["RetentionSaver", "SaverMetrics"]
