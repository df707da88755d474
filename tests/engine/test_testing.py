"""unbroken.testing: in-process crash injection for users' own tests."""

from __future__ import annotations

import random
from typing import Any

import pytest

from unbroken import Context
from unbroken.testing import MemoryStorage, check_resume_at_every_step, memory_engine


async def test_check_resume_at_every_step_passes_a_deterministic_workflow() -> None:
    engine = memory_engine(MemoryStorage())
    calls: list[int] = []

    @engine.workflow
    async def wf(ctx: Context, n: int) -> list[Any]:
        def op(i: int) -> int:
            calls.append(i)
            return i * i

        out = [await ctx.step(f"s{i}", op, i) for i in range(n)]
        out.append(await ctx.random())  # journaled: identical on every resume
        return out

    async with engine:
        result = await check_resume_at_every_step(engine, wf, 3, execution_id="x")
        info = await engine.get_execution("x")
    assert result[:3] == [0, 1, 4] and isinstance(result[3], float)
    assert calls == [0, 1, 2]  # killed after every step, yet no operation ran twice
    assert info is not None and info.status == "completed" and info.generation == 0


async def test_check_resume_at_every_step_catches_nondeterminism() -> None:
    engine = memory_engine()

    @engine.workflow(on_divergence="restart")
    async def wf(ctx: Context) -> Any:
        name = "a" if random.random() < 0.5 else "b"  # not journaled: nondeterministic
        first = await ctx.step(name, lambda: 1)
        return [first, await ctx.step("c", lambda: 2), await ctx.step("d", lambda: 3)]

    random.seed(3)
    async with engine:
        with pytest.raises(AssertionError, match="diverged"):
            for _ in range(5):
                await check_resume_at_every_step(engine, wf)
