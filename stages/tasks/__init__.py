"""Task implementations (`stages.core.task.Task`), picked by `stages.core.task.resolve_task`."""
