"""Training data. The default task is synthetic but learnable and needs no download."""

from .teacher import TeacherTask, make_task

__all__ = ["TeacherTask", "make_task"]
