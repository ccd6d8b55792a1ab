"""The server's HTTP protocol (server/coalesce.py: uvicorn's httptools protocol, a response's
writes sent together) answers every kind of response whole: small JSON, a body larger than the
socket's buffers, a streamed body, and a response on a connection the client closes after it.
A real uvicorn on the loopback, a real HTTP client; no cluster."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kubetune.server.coalesce import CoalescingHttpToolsProtocol

pytestmark = pytest.mark.unit

BIG = bytes(range(256)) * (16 * 1024)  # 4 MiB: past the transport's high-water mark


async def small(_: Request) -> JSONResponse:
    return JSONResponse({"id": "ftjob-1", "object": "fine_tuning.job"})


async def big(_: Request) -> Response:
    return Response(BIG, media_type="application/octet-stream")


async def streamed(_: Request) -> StreamingResponse:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(50):
            await asyncio.sleep(0)
            yield f"line {i}\n".encode()

    return StreamingResponse(parts(), media_type="text/plain")


APP = Starlette(routes=[Route("/small", small), Route("/big", big), Route("/streamed", streamed)])


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        APP, host="127.0.0.1", port=port, loop="uvloop", http=CoalescingHttpToolsProtocol,
        log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_many_small_answers_on_one_connection_each_arrive_whole(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        for _ in range(200):
            answer = client.get("/small")
            assert answer.status_code == 200
            assert answer.json() == {"id": "ftjob-1", "object": "fine_tuning.job"}


def test_a_body_larger_than_the_socket_buffers_arrives_whole(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        assert client.get("/big").content == BIG
        assert client.get("/small").status_code == 200  # the connection is still usable


def test_a_streamed_body_arrives_whole_and_in_order(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        answer = client.get("/streamed")
    assert answer.text == "".join(f"line {i}\n" for i in range(50))


def test_the_answer_to_a_connection_close_request_arrives_before_the_close(url: str) -> None:
    for _ in range(20):
        with httpx.Client(base_url=url, headers={"Connection": "close"}) as client:
            answer = client.get("/small")
        assert answer.json()["id"] == "ftjob-1"
        assert answer.headers["connection"] == "close"
