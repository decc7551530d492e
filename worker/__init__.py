"""checkpoint-janitor's imperative shell: CLI, store engines, sweeps, daemon, saver wrapper."""

from worker.saver import RetentionSaver

__all__ = ["RetentionSaver"]
