"""WASIp2 guest (componentize-py) that uses what a host may grant:
preopened directories and wasi:config variables.

Routes:
  /read/PATH   the file at /PATH (200), or 404/403 with the error
  /write/PATH  writes "written" to /PATH (200), or 403 with the error
  /list/PATH   the entries of directory /PATH, one per line
  /config/KEY  the wasi:config variable KEY (200), or 404
"""

import os

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports import store
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


def respond(out: ResponseOutparam, status: int, body: bytes) -> None:
    response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
    response.set_status_code(status)
    body_handle = response.body()
    ResponseOutparam.set(out, Ok(response))
    stream = body_handle.write()
    stream.blocking_write_and_flush(body)
    stream.__exit__(None, None, None)
    OutgoingBody.finish(body_handle, None)


def error_status(e: OSError) -> int:
    if isinstance(e, FileNotFoundError):
        return 404
    return 403


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, out: ResponseOutparam) -> None:
        path = request.path_with_query() or "/"
        try:
            if path.startswith("/read/"):
                with open("/" + path[len("/read/"):], "rb") as f:
                    respond(out, 200, f.read())
            elif path.startswith("/write/"):
                with open("/" + path[len("/write/"):], "w") as f:
                    f.write("written")
                respond(out, 200, b"written\n")
            elif path.startswith("/list/"):
                names = sorted(os.listdir("/" + path[len("/list/"):]))
                respond(out, 200, ("\n".join(names) + "\n").encode())
            elif path.startswith("/config/"):
                value = store.get(path[len("/config/"):])
                if value is None:
                    respond(out, 404, b"no such variable\n")
                else:
                    respond(out, 200, value.encode())
            else:
                respond(out, 200, b"grants guest\n")
        except OSError as e:
            respond(out, error_status(e), f"{type(e).__name__}: {e}\n".encode())
