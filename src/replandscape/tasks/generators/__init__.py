"""One module per task; each defines ``TASK`` (a :class:`~replandscape.tasks.base.TaskSpec`).

Adding a task is adding a module here: the registry finds every module that defines ``TASK``.
"""
