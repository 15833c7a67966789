"""The Unit base, in parts: base.py (the Unit class and its hooks), task.py (tasks, jobs, their queue),
inputs.py (input lists, links, inference data) and session.py (the line to sys)."""
from core.unit.base import Unit, restartable
from core.unit.task import Job, Task, decode_audio

__all__ = ["Job", "Task", "Unit", "decode_audio", "restartable"]
