"""A streamed answer ends its `running` count however it ends, on the ASGI interface itself: a client that goes
away mid-stream (as a killed load client does) must not leave the gauge up until its generator is collected."""

import asyncio
from collections.abc import AsyncGenerator

import pytest
from prometheus_client import CollectorRegistry, Gauge
from starlette.requests import ClientDisconnect

from serving.generation import RunningStream


async def endless(closed: list[bool]) -> AsyncGenerator[str, None]:
    try:
        while True:
            await asyncio.sleep(0)  # as the events of a real stream wait for the next piece
            yield "data: {}\n\n"
    finally:
        closed.append(True)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_client_gone_mid_stream_ends_the_count_and_the_events(spec_version: str) -> None:
    registry = CollectorRegistry()
    running = Gauge("running", "Streams being sent.", registry=registry)
    closed: list[bool] = []
    response = RunningStream(endless(closed), running, {})
    assert registry.get_sample_value("running") == 1
    gone = asyncio.Event()

    async def send(message: dict) -> None:
        if gone.is_set() and spec_version == "2.4":
            raise OSError("the connection is closed")  # how ASGI 2.4 servers report it
        if message.get("body"):
            gone.set()  # one chunk read, then the client leaves

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def serve() -> None:
        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        await asyncio.wait_for(response(scope, receive, send), timeout=10)

    if spec_version == "2.4":
        with pytest.raises(ClientDisconnect):
            asyncio.run(serve())
    else:
        asyncio.run(serve())
    assert registry.get_sample_value("running") == 0
    assert closed == [True]  # the events are closed, which stops the choices' decoding
