/* An HTTP/1.1 server on libuv that hands every request to a wasmpool
 * component and streams both ways: the request body goes to the guest as
 * it arrives (reading from the client pauses while the engine's buffer is
 * full), and the response goes to the client chunk by chunk as the guest
 * writes it (the guest waits while the client is slow). One event loop,
 * no threads of its own: wasmpool runs in poll mode and its completion fd
 * is watched by the loop.
 *
 *   uv_host COMPONENT PORT
 *
 * Request bodies need a Content-Length; responses are sent chunked; one
 * request per connection (Connection: close). A client that goes away
 * cancels its request.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <uv.h>
#include <wasmpool.h>

#define HEAD_MAX 16384
#define CHUNK 65536

static wasmpool_handler *handler;
static uv_loop_t *loop;
static uv_tcp_t server;
static uv_poll_t completions;
static uv_signal_t sigterm;

typedef struct conn {
  uv_tcp_t tcp;
  char head[HEAD_MAX];
  size_t head_len;
  int in_body;             /* the head was read; body bytes follow */
  unsigned long long body_left;
  char *pending;           /* body bytes the engine did not take yet */
  size_t pending_len;
  int paused;              /* not reading from the client */
  wasmpool_body_writer *writer;
  wasmpool_cancel *cancel;
  wasmpool_response *resp;
  int head_done;           /* the head callback ran (exactly once) */
  int writing;             /* a write to the client is in flight */
  int finishing;           /* the last chunk is on its way */
  int closed;              /* uv_close was called */
  uint8_t out[CHUNK + 32];
} conn;

static void maybe_free(conn *c) {
  /* The connection goes once libuv closed it and wasmpool is done with
   * it (the head callback ran). */
  if (c->closed == 2 && c->head_done) {
    wasmpool_body_writer_free(c->writer);
    wasmpool_response_free(c->resp);
    wasmpool_cancel_free(c->cancel);
    free(c->pending);
    free(c);
  }
}

static void on_closed(uv_handle_t *h) {
  conn *c = h->data;
  c->closed = 2;
  maybe_free(c);
}

static void close_conn(conn *c) {
  if (c->closed) return;
  c->closed = 1;
  /* Stop whatever still streams: the request is cancelled, the writer and
   * response freed (no ready callback runs for them after this). */
  if (c->cancel) wasmpool_cancel_request(c->cancel); /* MISUSE if it was over */
  wasmpool_body_writer_free(c->writer);
  c->writer = NULL;
  wasmpool_response_free(c->resp);
  c->resp = NULL;
  uv_close((uv_handle_t *)&c->tcp, on_closed);
}

static void on_written_close(uv_write_t *w, int status) {
  conn *c = w->data;
  (void)status;
  free(w);
  close_conn(c);
}

/* A fixed answer of wasmpool's own, then close. */
static void reply(conn *c, int status, const char *reason) {
  char buf[256];
  int n = snprintf(buf, sizeof buf,
                   "HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %zu\r\n"
                   "connection: close\r\n\r\n%s\n",
                   status, reason, strlen(reason) + 1, reason);
  uv_write_t *w = malloc(sizeof *w + (size_t)n);
  char *copy = (char *)(w + 1);
  memcpy(copy, buf, (size_t)n);
  uv_buf_t b = uv_buf_init(copy, (unsigned)n);
  w->data = c;
  uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, on_written_close);
}

static void pump_response(conn *c);

static void on_chunk_written(uv_write_t *w, int status) {
  conn *c = w->data;
  free(w);
  c->writing = 0;
  if (status < 0 || c->finishing) {
    close_conn(c);
    return;
  }
  pump_response(c);
}

/* Sends what the guest has written so far, one chunk at a time (the next
 * read only once the client took the last chunk). */
static void pump_response(conn *c) {
  if (c->closed || c->writing || !c->resp) return;
  size_t n = 0;
  wasmpool_result r = wasmpool_response_read(c->resp, c->out + 16, CHUNK, &n);
  if (r == WASMPOOL_WOULD_BLOCK) return; /* the ready callback calls again */
  if (r != WASMPOOL_OK) {
    /* The body failed: cut the connection so the response does not look
     * complete. */
    fprintf(stderr, "response body failed: %s\n", wasmpool_last_error());
    close_conn(c);
    return;
  }
  uv_write_t *w = malloc(sizeof *w);
  w->data = c;
  uv_buf_t b;
  if (n == 0) {
    static char last[] = "0\r\n\r\n";
    b = uv_buf_init(last, sizeof last - 1);
    c->finishing = 1;
  } else {
    /* "%zx\r\n" right before the data, "\r\n" after it. */
    char size[18];
    int sn = snprintf(size, sizeof size, "%zx\r\n", n);
    memcpy(c->out + 16 - sn, size, (size_t)sn);
    memcpy(c->out + 16 + n, "\r\n", 2);
    b = uv_buf_init((char *)c->out + 16 - sn, (unsigned)(sn + n + 2));
  }
  c->writing = 1;
  uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, on_chunk_written);
}

static void on_response_ready(void *ud) { pump_response(ud); }

static int hop_by_hop(const char *name, size_t len) {
  static const char *skip[] = {"connection", "transfer-encoding", "content-length", "keep-alive", NULL};
  for (int i = 0; skip[i]; i++)
    if (strlen(skip[i]) == len && strncasecmp(name, skip[i], len) == 0) return 1;
  return 0;
}

static void on_head(void *ud, wasmpool_result result, wasmpool_response *resp) {
  conn *c = ud;
  c->head_done = 1;
  if (c->closed) {
    wasmpool_response_free(resp);
    maybe_free(c);
    return;
  }
  if (result != WASMPOOL_OK) {
    int status = result == WASMPOOL_OVERLOADED ? 503 : result == WASMPOOL_TIMEOUT ? 504 : 500;
    reply(c, status, wasmpool_result_str(result));
    return;
  }
  c->resp = resp;
  char head[HEAD_MAX];
  int n = snprintf(head, sizeof head, "HTTP/1.1 %u OK\r\n", wasmpool_response_status(resp));
  size_t count = wasmpool_response_header_count(resp);
  for (size_t i = 0; i < count; i++) {
    const uint8_t *name, *value;
    size_t nl, vl;
    wasmpool_response_header(resp, i, &name, &nl, &value, &vl);
    if (hop_by_hop((const char *)name, nl)) continue;
    if ((size_t)n + nl + vl + 4 >= sizeof head - 64) break;
    n += snprintf(head + n, sizeof head - (size_t)n, "%.*s: %.*s\r\n", (int)nl, name, (int)vl, value);
  }
  n += snprintf(head + n, sizeof head - (size_t)n, "transfer-encoding: chunked\r\nconnection: close\r\n\r\n");
  uv_write_t *w = malloc(sizeof *w + (size_t)n);
  memcpy(w + 1, head, (size_t)n);
  uv_buf_t b = uv_buf_init((char *)(w + 1), (unsigned)n);
  w->data = c;
  c->writing = 1;
  wasmpool_response_set_ready_callback(resp, on_response_ready, c);
  uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, on_chunk_written);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  buf->base = malloc(suggested);
  buf->len = buf->base ? suggested : 0;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* Hands body bytes to the engine; what it cannot take yet waits, and
 * reading from the client pauses until the writer's ready callback. */
static void feed_body(conn *c, const char *data, size_t len) {
  if (len > c->body_left) len = (size_t)c->body_left; /* no pipelining */
  while (len > 0) {
    size_t n = len > CHUNK ? CHUNK : len;
    wasmpool_result r = wasmpool_body_writer_write(c->writer, (const uint8_t *)data, n);
    if (r == WASMPOOL_WOULD_BLOCK) {
      c->pending = realloc(c->pending, c->pending_len + len);
      memcpy(c->pending + c->pending_len, data, len);
      c->pending_len += len;
      if (!c->paused) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->paused = 1;
      }
      return;
    }
    if (r != WASMPOOL_OK) {
      /* The request is over (the guest answered without reading on, or
       * it failed): drop the rest. */
      c->body_left = 0;
      return;
    }
    c->body_left -= n;
    data += n;
    len -= n;
  }
  if (c->body_left == 0) wasmpool_body_writer_finish(c->writer);
}

static void on_writer_ready(void *ud) {
  conn *c = ud;
  if (c->closed || !c->writer) return;
  char *p = c->pending;
  size_t len = c->pending_len;
  c->pending = NULL;
  c->pending_len = 0;
  feed_body(c, p, len);
  free(p);
  if (c->pending_len == 0 && c->paused && c->body_left > 0) {
    c->paused = 0;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  }
}

/* Parses the request head and pushes the request. */
static void start_request(conn *c, size_t head_end) {
  char *line_end = memmem(c->head, head_end, "\r\n", 2);
  char method[16], target[4096];
  if (!line_end || sscanf(c->head, "%15s %4095s HTTP/1.", method, target) != 2) {
    reply(c, 400, "bad request line");
    return;
  }
  wasmpool_request *req = wasmpool_request_new(method, target);
  if (!req) {
    reply(c, 400, wasmpool_last_error());
    return;
  }
  unsigned long long length = 0;
  char *p = line_end + 2;
  while (p < c->head + head_end) {
    /* Each header line ends in CRLF; the last one's is the head's end. */
    char *eol = memmem(p, (size_t)(c->head + head_end + 2 - p), "\r\n", 2);
    char *colon = eol ? memchr(p, ':', (size_t)(eol - p)) : NULL;
    if (!colon) {
      wasmpool_request_free(req);
      reply(c, 400, "bad header");
      return;
    }
    size_t nl = (size_t)(colon - p);
    char *v = colon + 1;
    while (v < eol && (*v == ' ' || *v == '\t')) v++;
    char name[256];
    if (nl >= sizeof name) nl = sizeof name - 1;
    memcpy(name, p, nl);
    name[nl] = 0;
    if (strcasecmp(name, "content-length") == 0) length = strtoull(v, NULL, 10);
    if (strcasecmp(name, "transfer-encoding") == 0) {
      wasmpool_request_free(req);
      reply(c, 501, "chunked request bodies are not supported here");
      return;
    }
    if (!hop_by_hop(name, nl)) wasmpool_request_add_header(req, name, (const uint8_t *)v, (size_t)(eol - v));
    p = eol + 2;
  }
  c->cancel = wasmpool_request_cancel_handle(req);
  if (length > 0) {
    wasmpool_request_stream_body(req, &c->writer);
    wasmpool_body_writer_set_ready_callback(c->writer, on_writer_ready, c);
  }
  c->body_left = length;
  c->in_body = 1;
  if (wasmpool_handler_push_streaming(handler, req, on_head, c) != WASMPOOL_OK) {
    c->head_done = 1; /* no callback will come */
    reply(c, 503, wasmpool_last_error());
    return;
  }
  if (c->head_len > head_end + 4) feed_body(c, c->head + head_end + 4, c->head_len - head_end - 4);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn *c = s->data;
  if (nread < 0) {
    /* The client went away (or closed its side): if it did before the
     * request and its answer are through, cancel. */
    free(buf->base);
    if (nread == UV_EOF && c->in_body && c->body_left == 0) return; /* half-close after the body */
    close_conn(c);
    return;
  }
  if (!c->in_body) {
    size_t n = (size_t)nread;
    if (c->head_len + n > HEAD_MAX) {
      free(buf->base);
      reply(c, 431, "request head too large");
      uv_read_stop(s);
      return;
    }
    memcpy(c->head + c->head_len, buf->base, n);
    c->head_len += n;
    char *end = memmem(c->head, c->head_len, "\r\n\r\n", 4);
    if (end) start_request(c, (size_t)(end - c->head));
  } else if (c->writer && c->body_left > 0) {
    feed_body(c, buf->base, (size_t)nread);
  }
  free(buf->base);
}

static void on_connection(uv_stream_t *srv, int status) {
  if (status < 0) return;
  conn *c = calloc(1, sizeof *c);
  uv_tcp_init(loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(srv, (uv_stream_t *)&c->tcp) == 0) {
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  } else {
    c->head_done = 1;
    close_conn(c);
  }
}

static void on_completions(uv_poll_t *p, int status, int events) {
  (void)p;
  (void)status;
  (void)events;
  wasmpool_handler_poll(handler, 256);
}

static void on_sigterm(uv_signal_t *s, int sig) {
  (void)sig;
  uv_close((uv_handle_t *)&server, NULL);
  uv_close((uv_handle_t *)s, NULL);
  uv_poll_stop(&completions);
  uv_close((uv_handle_t *)&completions, NULL);
  uv_stop(loop);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s COMPONENT PORT\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  wasmpool_config *cfg = wasmpool_config_new();
  wasmpool_config_set_completion_mode(cfg, WASMPOOL_COMPLETION_POLL);
  wasmpool_config_set_max_request_body_size(cfg, UINT64_MAX);
  if (wasmpool_handler_new(cfg, argv[1], &handler) != WASMPOOL_OK) {
    fprintf(stderr, "%s\n", wasmpool_last_error());
    return 1;
  }
  wasmpool_config_free(cfg);
  loop = uv_default_loop();
  uv_poll_init(loop, &completions, wasmpool_handler_completion_fd(handler));
  uv_poll_start(&completions, UV_READABLE, on_completions);
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigterm, on_sigterm, SIGTERM);
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", atoi(argv[2]), &addr);
  uv_tcp_init(loop, &server);
  int r = uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
  if (r == 0) r = uv_listen((uv_stream_t *)&server, 128, on_connection);
  if (r != 0) {
    fprintf(stderr, "listen: %s\n", uv_strerror(r));
    return 1;
  }
  fprintf(stderr, "listening on 127.0.0.1:%s\n", argv[2]);
  uv_run(loop, UV_RUN_DEFAULT);
  /* Open connections are dropped; the handler waits for its requests
   * (running their callbacks here) and stops. */
  wasmpool_handler_free(handler);
  return 0;
}
