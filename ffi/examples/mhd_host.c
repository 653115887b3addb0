/* A small HTTP server in C: libmicrohttpd accepts requests and every
 * request goes through wasmpool_handler_push; the connection is suspended
 * until the completion callback (on an engine thread) resumes it.
 *
 * usage: mhd_host COMPONENT.wasm PORT
 * build: cc mhd_host.c $(pkg-config --cflags --libs wasmpool libmicrohttpd)
 */
#define _GNU_SOURCE
#include "wasmpool.h"

#include <microhttpd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static wasmpool_handler *handler;
static volatile sig_atomic_t stop;

/* One request/response exchange. */
typedef struct {
  struct MHD_Connection *conn;
  char *body;
  size_t body_len;
  int pushed;
  volatile int completed;
  wasmpool_result result;
  wasmpool_response *response;
} exchange;

static enum MHD_Result add_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
  (void)kind;
  if (value) wasmpool_request_add_header(cls, key, (const uint8_t *)value, strlen(value));
  return MHD_YES;
}

/* Runs on an engine thread: keep the response and wake the connection. */
static void on_response(void *userdata, wasmpool_result result, wasmpool_response *response) {
  exchange *x = userdata;
  x->result = result;
  x->response = response;
  __atomic_store_n(&x->completed, 1, __ATOMIC_RELEASE);
  MHD_resume_connection(x->conn);
}

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *text) {
  struct MHD_Response *r = MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_MUST_COPY);
  enum MHD_Result ok = MHD_queue_response(conn, status, r);
  MHD_destroy_response(r);
  return ok;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size, void **state) {
  (void)cls;
  (void)version;
  exchange *x = *state;
  if (x == NULL) {
    x = calloc(1, sizeof *x);
    if (!x) return MHD_NO;
    x->conn = conn;
    *state = x;
    return MHD_YES;
  }
  if (*upload_size > 0) { /* collect the body */
    char *grown = realloc(x->body, x->body_len + *upload_size);
    if (!grown) return MHD_NO;
    x->body = grown;
    memcpy(x->body + x->body_len, upload_data, *upload_size);
    x->body_len += *upload_size;
    *upload_size = 0;
    return MHD_YES;
  }
  if (__atomic_load_n(&x->completed, __ATOMIC_ACQUIRE)) { /* resumed: answer */
    if (x->result != WASMPOOL_OK) {
      unsigned status = x->result == WASMPOOL_OVERLOADED ? 503 : x->result == WASMPOOL_TIMEOUT ? 504 : 500;
      return reply(conn, status, wasmpool_result_str(x->result));
    }
    size_t len = 0;
    const uint8_t *body = wasmpool_response_body(x->response, &len);
    struct MHD_Response *r = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    size_t n = wasmpool_response_header_count(x->response);
    for (size_t i = 0; i < n; i++) {
      const uint8_t *name, *value;
      size_t nl, vl;
      if (wasmpool_response_header(x->response, i, &name, &nl, &value, &vl) != WASMPOOL_OK) continue;
      char *k = strndup((const char *)name, nl), *v = strndup((const char *)value, vl);
      MHD_add_response_header(r, k, v);
      free(k);
      free(v);
    }
    enum MHD_Result ok = MHD_queue_response(conn, wasmpool_response_status(x->response), r);
    MHD_destroy_response(r);
    return ok;
  }
  if (x->pushed) return MHD_YES;
  wasmpool_request *req = wasmpool_request_new(method, url);
  if (!req) return reply(conn, 400, wasmpool_last_error());
  MHD_get_connection_values(conn, MHD_HEADER_KIND, add_header, req);
  wasmpool_request_set_body(req, (const uint8_t *)x->body, x->body_len);
  x->pushed = 1;
  MHD_suspend_connection(conn);
  wasmpool_result r = wasmpool_handler_push(handler, req, on_response, x);
  if (r != WASMPOOL_OK) { /* the callback will not run */
    x->result = r;
    __atomic_store_n(&x->completed, 1, __ATOMIC_RELEASE);
    MHD_resume_connection(conn);
  }
  return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **state, enum MHD_RequestTerminationCode code) {
  (void)cls;
  (void)conn;
  (void)code;
  exchange *x = *state;
  if (!x) return;
  wasmpool_response_free(x->response);
  free(x->body);
  free(x);
  *state = NULL;
}

static void on_signal(int sig) {
  (void)sig;
  stop = 1;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s COMPONENT.wasm PORT\n", argv[0]);
    return 2;
  }
  wasmpool_config *cfg = wasmpool_config_new();
  wasmpool_result r = wasmpool_handler_new(cfg, argv[1], &handler);
  wasmpool_config_free(cfg);
  if (r != WASMPOOL_OK) {
    fprintf(stderr, "cannot load %s: %s: %s\n", argv[1], wasmpool_result_str(r), wasmpool_last_error());
    return 1;
  }
  struct MHD_Daemon *d = MHD_start_daemon(
      MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG, (uint16_t)atoi(argv[2]), NULL,
      NULL, on_request, NULL, MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL, MHD_OPTION_END);
  if (!d) {
    fprintf(stderr, "cannot listen on port %s\n", argv[2]);
    wasmpool_handler_free(handler);
    return 1;
  }
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  printf("listening on port %s\n", argv[2]);
  fflush(stdout);
  while (!stop) pause();
  MHD_stop_daemon(d);
  wasmpool_handler_free(handler);
  return 0;
}
