"""WASIp2 test guest built with componentize-py (a real toolchain).

Routes: /counter (per-instance counter), /fetch/PORT (outgoing GET to
http://127.0.0.1:PORT/), /print (a line on stdout), /env, /echo (the
request body, received in full before answering), /big/N (N bytes), else a
greeting.
"""

import asyncio
import os

import poll_loop
from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingRequest,
    OutgoingResponse,
    ResponseOutparam,
    Scheme_Http,
)

counter = 0


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        loop = poll_loop.PollLoop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(handle_async(request, response_out))


async def respond(response_out: ResponseOutparam, status: int, body: bytes) -> None:
    response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
    response.set_status_code(status)
    body_handle = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    sink = poll_loop.Sink(body_handle)
    await sink.send(body)
    sink.close()


async def handle_async(request: IncomingRequest, response_out: ResponseOutparam) -> None:
    global counter
    counter += 1
    path = request.path_with_query() or "/"
    if path.startswith("/counter"):
        await respond(response_out, 200, str(counter).encode())
    elif path.startswith("/fetch/"):
        port = int(path[len("/fetch/"):])
        outgoing = OutgoingRequest(Fields())
        outgoing.set_scheme(Scheme_Http())
        outgoing.set_authority(f"127.0.0.1:{port}")
        outgoing.set_path_with_query("/")
        try:
            upstream = await poll_loop.send(outgoing)
            status = upstream.status()
            upstream.__exit__(None, None, None)
            await respond(response_out, 200, f"upstream {status}".encode())
        except Exception as e:  # the host refused or the fetch failed
            await respond(response_out, 502, f"fetch failed: {e!r}".encode())
    elif path.startswith("/print"):
        print("python p2 guest says hi", flush=True)
        await respond(response_out, 200, b"printed\n")
    elif path.startswith("/echo"):
        stream = poll_loop.Stream(request.consume())
        chunks = []
        while True:
            chunk = await stream.next()
            if chunk is None:
                break
            chunks.append(chunk)
        await respond(response_out, 200, b"".join(chunks))
    elif path.startswith("/big/"):
        await respond(response_out, 200, b"x" * int(path[len("/big/"):]))
    elif path.startswith("/env"):
        lines = "".join(f"{k}={v}\n" for k, v in sorted(os.environ.items()))
        await respond(response_out, 200, lines.encode())
    else:
        await respond(response_out, 200, b"hello from python p2\n")
