/* The README's streaming example: sends standard input to a component as a
 * streamed request body and writes the streamed response body to standard
 * output, with the host in control of flow both ways (the guest waits for
 * this program, and the engine buffers at most 256 KiB each way).
 * usage: stream_pipe COMPONENT.wasm PATH < input > output */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <wasmpool.h>

/* The ready and head callbacks run on engine threads: they only wake the
 * main thread, which does all the reading and writing. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static unsigned wakeups;
static wasmpool_result head_result = WASMPOOL_OK;
static wasmpool_response *head;
static int head_done;

static void notify(void) {
  pthread_mutex_lock(&lock);
  wakeups++;
  pthread_cond_signal(&wake);
  pthread_mutex_unlock(&lock);
}
static void on_ready(void *ud) { (void)ud; notify(); }
static void on_head(void *ud, wasmpool_result result, wasmpool_response *resp) {
  (void)ud;
  pthread_mutex_lock(&lock);
  head_result = result, head = resp, head_done = 1;
  pthread_mutex_unlock(&lock);
  notify();
}
/* Waits until a callback ran after `seen`. */
static void wait_after(unsigned seen) {
  pthread_mutex_lock(&lock);
  while (wakeups == seen) pthread_cond_wait(&wake, &lock);
  pthread_mutex_unlock(&lock);
}
static unsigned seen_now(void) {
  pthread_mutex_lock(&lock);
  unsigned s = wakeups;
  pthread_mutex_unlock(&lock);
  return s;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s COMPONENT.wasm PATH < input > output\n", argv[0]);
    return 2;
  }
  wasmpool_config *cfg = wasmpool_config_new();
  /* Streamed through, a body costs the engine at most 256 KiB whatever its
   * size: allow up to 1 TiB instead of the 16 MiB default. */
  wasmpool_config_set_max_request_body_size(cfg, 1ull << 40);
  wasmpool_handler *h;
  wasmpool_result r = wasmpool_handler_new(cfg, argv[1], &h);
  wasmpool_config_free(cfg);
  if (r != WASMPOOL_OK) {
    fprintf(stderr, "%s\n", wasmpool_last_error());
    return 1;
  }
  wasmpool_request *req = wasmpool_request_new("POST", argv[2]);
  wasmpool_body_writer *w = NULL;
  wasmpool_request_stream_body(req, &w); /* before the push */
  wasmpool_body_writer_set_ready_callback(w, on_ready, NULL);
  if (wasmpool_handler_push_streaming(h, req, on_head, NULL) != WASMPOOL_OK) {
    fprintf(stderr, "push: %s\n", wasmpool_last_error());
    return 1;
  }
  static uint8_t in[65536], out[65536];
  size_t in_len = 0, in_off = 0;
  int in_eof = 0, body_done = 0, failed = 0, cut_short = 0;
  wasmpool_response *resp = NULL;
  while (!body_done && !failed) {
    unsigned seen = seen_now();
    int progress = 0;
    /* Upload: as much as the engine takes now. */
    while (w) {
      if (in_off == in_len && !in_eof) {
        in_len = fread(in, 1, sizeof in, stdin), in_off = 0;
        if (in_len == 0) in_eof = 1;
      }
      if (in_off == in_len && in_eof) {
        wasmpool_body_writer_finish(w);
        wasmpool_body_writer_free(w); /* the engine keeps what it needs */
        w = NULL;
        break;
      }
      wasmpool_result r = wasmpool_body_writer_write(w, in + in_off, in_len - in_off);
      if (r == WASMPOOL_WOULD_BLOCK) break; /* on_ready runs when it can take more */
      if (r != WASMPOOL_OK) { /* over max_request_body_size, or the guest stopped reading */
        fprintf(stderr, "the request body was cut short: %s\n", wasmpool_last_error());
        wasmpool_body_writer_free(w);
        w = NULL;
        cut_short = 1;
        break;
      }
      in_off = in_len, progress = 1;
    }
    /* The head, once: then the response's own ready callback. */
    pthread_mutex_lock(&lock);
    if (head_done == 1) {
      head_done = 2;
      if (head_result != WASMPOOL_OK) {
        fprintf(stderr, "request failed: %s\n", wasmpool_result_str(head_result));
        failed = 1;
      } else {
        resp = head;
        fprintf(stderr, "status %u\n", wasmpool_response_status(resp));
        wasmpool_response_set_ready_callback(resp, on_ready, NULL);
      }
    }
    pthread_mutex_unlock(&lock);
    if (resp && !failed) {
      /* Download: as much as there is now. */
      for (;;) {
        size_t n = 0;
        wasmpool_result r = wasmpool_response_read(resp, out, sizeof out, &n);
        if (r == WASMPOOL_WOULD_BLOCK) break;
        if (r != WASMPOOL_OK) {
          fprintf(stderr, "body failed: %s\n", wasmpool_result_str(r));
          failed = 1;
          break;
        }
        if (n == 0) { /* the end: trailers are readable now */
          body_done = 1;
          break;
        }
        fwrite(out, 1, n, stdout), progress = 1;
      }
    }
    if (!progress && !body_done && !failed) wait_after(seen);
  }
  wasmpool_body_writer_free(w);
  wasmpool_response_free(resp);
  wasmpool_handler_free(h);
  return failed || cut_short;
}
