// Reusable entry point: exports wasi:http/incoming-handler@0.2.10 directly,
// so one instance can serve many requests (StarlingMonkey's fetch-event
// glue answers only the first). Exporting `incomingHandler` makes
// componentize-js drop its fetch-event feature.
//
// handle() translates the wasi:http request into a standard Request, calls
// app.fetch, and writes the Response back through the wasi:http types. It is
// async: componentize-js resolves a Promise returned by an export by running
// the engine's event loop before the export returns.
import { app } from "./app.js";
import {
  Fields,
  IncomingBody,
  OutgoingBody,
  OutgoingResponse,
  ResponseOutparam,
} from "wasi:http/types@0.2.10";

// output-stream.blocking-write-and-flush takes at most 4096 bytes a call.
const WRITE_CHUNK = 4096;
const READ_CHUNK = 65536n;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// The generated bindings drop a resource handle on [Symbol.dispose]() (or,
// late, from a FinalizationRegistry). Drop them eagerly: a reused instance
// would otherwise pile up host handles between garbage collections.
const dispose = Symbol.dispose ?? Symbol.for("dispose");
function drop(resource) {
  resource?.[dispose]?.();
}

function methodOf(request) {
  const m = request.method();
  return m.tag === "other" ? m.val : m.tag.toUpperCase();
}

function urlOf(request) {
  const s = request.scheme();
  const scheme = s === undefined ? "http" : s.tag === "other" ? s.val : s.tag.toLowerCase();
  const authority = request.authority() ?? "localhost";
  return `${scheme}://${authority}${request.pathWithQuery() ?? "/"}`;
}

function headersOf(request) {
  const fields = request.headers();
  const headers = new Headers();
  for (const [name, value] of fields.entries()) headers.append(name, decoder.decode(value));
  drop(fields);
  return headers;
}

// Reads the whole request body (blocking reads until the stream closes).
function readBody(request) {
  const body = request.consume();
  const stream = body.stream();
  const chunks = [];
  let len = 0;
  for (;;) {
    let chunk;
    try {
      chunk = stream.blockingRead(READ_CHUNK);
    } catch (e) {
      if (e?.payload?.tag === "closed" || e?.tag === "closed") break;
      throw e;
    }
    chunks.push(chunk);
    len += chunk.length;
  }
  drop(stream);
  drop(IncomingBody.finish(body));
  const out = new Uint8Array(len);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

function toRequest(request) {
  const method = methodOf(request);
  const init = { method, headers: headersOf(request) };
  if (method !== "GET" && method !== "HEAD") init.body = readBody(request);
  const url = urlOf(request);
  drop(request);
  return new Request(url, init);
}

async function writeResponse(response, responseOut) {
  const fields = new Fields();
  for (const [name, value] of response.headers) fields.append(name, encoder.encode(value));
  // new OutgoingResponse takes ownership of the fields.
  const out = new OutgoingResponse(fields);
  out.setStatusCode(response.status);
  const body = out.body();
  const bytes = response.body ? new Uint8Array(await response.arrayBuffer()) : new Uint8Array(0);
  ResponseOutparam.set(responseOut, { tag: "ok", val: out });
  const stream = body.write();
  for (let at = 0; at < bytes.length; at += WRITE_CHUNK) {
    stream.blockingWriteAndFlush(bytes.subarray(at, at + WRITE_CHUNK));
  }
  drop(stream);
  OutgoingBody.finish(body, undefined);
}

export const incomingHandler = {
  async handle(request, responseOut) {
    let response;
    try {
      response = await app.fetch(toRequest(request));
    } catch (e) {
      response = new Response(`internal error: ${e}\n`, { status: 500 });
    }
    await writeResponse(response, responseOut);
  },
};
