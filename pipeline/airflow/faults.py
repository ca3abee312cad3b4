"""Test-only fault injection for the DAG's tasks (``ASR_RETUNE_TEST_FAIL_ONCE``).

``ASR_RETUNE_TEST_FAIL_ONCE="task_id[:before|:after],..."`` makes each named task fail on
its first try only: either before its stage runs (``before``, the default), or after the
stage wrote its outputs, with its completion marker removed and a stray file left in its
partition (``after``: a crash just before the commit). The DAG imports this module only
when the variable is set; it is never set in production.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.run import SUCCESS, RunContext

FAULT_ENV = "ASR_RETUNE_TEST_FAIL_ONCE"


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook (``ASR_RETUNE_TEST_FAIL_ONCE``)."""


def fault_plan(value: str | None = None) -> dict[str, str]:
    """``{task_id: "before" | "after"}`` from the variable's value."""
    plan = {}
    for item in (os.environ.get(FAULT_ENV, "") if value is None else value).split(","):
        name, _, when = item.strip().partition(":")
        if name:
            if (when or "before") not in ("before", "after"):
                raise ValueError(f"{FAULT_ENV}: {item.strip()!r}: the phase is 'before' or 'after'")
            plan[name] = when or "before"
    return plan


@contextlib.contextmanager
def fault_point(ctx: RunContext, stage: str | None, context: Mapping[str, Any]) -> Iterator[None]:
    """Fail the first try of a task named in ``ASR_RETUNE_TEST_FAIL_ONCE``; else do nothing."""
    ti = context["ti"]
    when = fault_plan().get(ti.task_id) if ti.try_number == 1 else None
    if when is None:
        yield
        return

    def leave_debris() -> None:
        if stage is not None:
            ctx.store.put_text(ctx.stage_key(stage, "_debris_of_failed_attempt"), "partial output\n")

    if when == "before":
        leave_debris()
        raise InjectedFault(f"{FAULT_ENV}: {ti.task_id} fails its first try before its stage runs")
    yield
    if stage is not None:
        ctx.store.delete(ctx.stage_key(stage, SUCCESS))
    leave_debris()
    raise InjectedFault(f"{FAULT_ENV}: {ti.task_id} fails its first try after its stage wrote, before its commit")
