"""The neutral task pool against a real stack: lookup, one shared setup, keep-alive unloading, and
UnitErrors with StackFlow codes (no HTTP in sight)."""
from __future__ import annotations

import asyncio
import time

import pytest

from core.errors import ErrorCode, UnitError
from core.settings import Settings
from firmware_bridge.pool import ModelNotFound, TaskPool


def test_pool_shares_a_setup_unloads_idle_tasks_and_raises_unit_errors(stack_factory):
    stack = stack_factory(["asr"])
    settings = Settings.load(None, {"bus.run_dir": str(stack.run_dir)})

    async def run():
        pool = await TaskPool(settings, name="pooltest", keep_alive="1s").start()
        try:
            with pytest.raises(ModelNotFound) as missing:
                await pool.find("no-such-model", ("asr",))
            assert isinstance(missing.value, UnitError) and missing.value.code == ErrorCode.MODEL_LOADING
            manifest = await pool.find("WHISPER_TINY", ("asr",))  # an alias, case and `_` ignored
            assert manifest["mode"] == "whisper-tiny.en"
            first, second = await asyncio.gather(pool.acquire(manifest), pool.acquire(manifest))
            assert first is second and first.state == "loaded"
            ours = [t for t in await pool.tasks() if t.get("work_id") == first.work_id]
            assert len(ours) == 1 and len([t for t in await pool.tasks() if t.get("model")]) == 1
            with pytest.raises(UnitError) as bad:
                await pool.call(first, "asr.pcm.base64", "not base64!", "pooltest-bad")
            assert bad.value.code == ErrorCode.BASE64_DECODING
            deadline = time.monotonic() + 20
            while pool.state(manifest["mode"], "asr") != "available" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert pool.state(manifest["mode"], "asr") == "available"  # unloaded after 1 s idle
            assert not [t for t in await pool.tasks() if t.get("work_id") == first.work_id]
            tts = {"mode": "piper-en-us-joe-medium", "type": "tts", "mode_param": {}}
            with pytest.raises(UnitError) as down:
                await pool.acquire(tts)  # no tts unit in this stack
            assert down.value.code in (ErrorCode.UNIT_CALL, ErrorCode.UNIT_NOT_EXIST)
        finally:
            await pool.close()

    asyncio.run(run())
