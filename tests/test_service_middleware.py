"""The body-size limit at the ASGI level: declared lengths and streamed chunks without one."""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Scope, Send

from service.middleware import BodySizeLimit


async def echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def call(chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> list[Message]:
    sent: list[Message] = []
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
               for i, c in enumerate(chunks)]

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": headers}
    asyncio.run(BodySizeLimit(echo_length, max_bytes=10)(scope, receive, send))
    return sent


def test_streamed_body_over_limit_is_413_without_content_length() -> None:
    sent = call([b"123456", b"78901"], [])
    assert sent[0]["status"] == 413
    assert b"over the limit of 10 bytes" in sent[1]["body"]


def test_streamed_body_within_limit_reaches_the_app_whole() -> None:
    sent = call([b"12345", b"67890"], [])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"10"


def test_declared_length_over_limit_is_413_before_reading() -> None:
    assert call([b"1"], [(b"content-length", b"11")])[0]["status"] == 413
    assert call([b"1"], [(b"content-length", b"abc")])[0]["status"] == 400
