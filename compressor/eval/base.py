"""The task registry: a task is a name, an options dataclass (validated when built) and `run`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from compressor.errors import CompressorError

TASKS: dict[str, Task] = {}


class Task:
    name: ClassVar[str]
    Options: ClassVar[type]

    def options(self, given: dict) -> object:
        """This task's options from the keyword arguments of run_tasks (those it does not take are
        left to other tasks)."""
        fields = {f.name for f in dataclasses.fields(self.Options)}
        return self.Options(**{k: v for k, v in given.items() if k in fields and v is not None})

    def run(self, model, tokenizer, device, options) -> dict:
        raise NotImplementedError


def register(task: type[Task]) -> type[Task]:
    TASKS[task.name] = task()
    return task


def option_names(tasks: list[Task]) -> set[str]:
    return {f.name for task in tasks for f in dataclasses.fields(task.Options)}


def check_options(tasks: list[Task], given: dict) -> None:
    unknown = sorted(set(given) - option_names(tasks))
    if unknown:
        raise CompressorError(f"no evaluation task takes an option '{unknown[0]}' (they take: {', '.join(sorted(option_names(tasks)))})")
