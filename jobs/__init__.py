"""The task table: edit TASKS to schedule your own work.

Each Task calls ``func`` once per param at each slot; every node runs the same
code, and each run executes once, on whichever node's worker pulls it first.
"""

from dailyq import Task
from jobs.example import crunch

__all__ = ["TASKS", "Task"]

TASKS = [
    # Modelled on the original article's TASK_LIST: one function, four params.
    Task(name="daily_report", func=crunch, params=["任务参数1", "任务参数2", "任务参数3", "任务参数4"],
         at="09:00", tz="Asia/Shanghai", timeout_s=600, retries=2),
]
