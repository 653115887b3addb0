"""WASIp3 test guest built with componentize-py (a real toolchain).

Routes: /counter (per-instance counter), /sleep/MS (async sleep), else a
greeting.
"""

from typing import Optional

import componentize_py_async_support
import wit_world
from componentize_py_async_support.streams import ByteStreamWriter
from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports import monotonic_clock
from wit_world.imports.wasi_http_types import Fields, Request, Response

counter = 0


class Handler(exports.Handler):
    async def handle(self, request: Request) -> Response:
        global counter
        counter += 1
        path = request.get_path_with_query() or "/"
        if path.startswith("/counter"):
            body = str(counter).encode()
        elif path.startswith("/sleep/"):
            await monotonic_clock.wait_for(int(path[len("/sleep/"):]) * 1_000_000)
            body = b"slept\n"
        else:
            body = b"hello from python p3\n"
        tx, rx = wit_world.byte_stream()
        componentize_py_async_support.spawn(write_body(tx, body))
        trailers = wit_world.result_option_wasi_http_types_fields_wasi_http_types_error_code_future(lambda: Ok(None))[1]
        return Response.new(Fields.from_list([("content-type", b"text/plain")]), rx, trailers)[0]


async def write_body(tx: ByteStreamWriter, body: bytes) -> None:
    with tx:
        await tx.write_all(body)
