/* Push throughput of the C API: N requests of GET / with at most INFLIGHT
 * pushed and not yet completed, completions on engine threads. Compare
 * with benches/api_push.rs (the same through the Rust API).
 *
 *   push_bench COMPONENT CACHE_DIR N INFLIGHT   -> "<rate> req/s" on stdout
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <wasmpool.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long in_flight, done, failed;

static void on_response(void *user, wasmpool_result r, wasmpool_response *resp) {
  (void)user;
  if (r != WASMPOOL_OK || wasmpool_response_status(resp) != 200) __atomic_add_fetch(&failed, 1, __ATOMIC_RELAXED);
  wasmpool_response_free(resp);
  pthread_mutex_lock(&mu);
  in_flight--;
  done++;
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s COMPONENT CACHE_DIR N INFLIGHT\n", argv[0]);
    return 2;
  }
  long n = atol(argv[3]), inflight = atol(argv[4]);
  wasmpool_config *cfg = wasmpool_config_new();
  wasmpool_config_set_cache_dir(cfg, argv[2]);
  wasmpool_config_set_max_concurrent_requests(cfg, (uint32_t)inflight);
  wasmpool_handler *h = NULL;
  if (wasmpool_handler_new(cfg, argv[1], &h) != WASMPOOL_OK) {
    fprintf(stderr, "handler: %s\n", wasmpool_last_error());
    return 1;
  }
  wasmpool_config_free(cfg);
  /* warm-up */
  wasmpool_response *resp = NULL;
  for (int i = 0; i < 100; i++) {
    if (wasmpool_handler_call(h, wasmpool_request_new("GET", "/"), &resp) != WASMPOOL_OK) return 1;
    wasmpool_response_free(resp);
  }
  double t0 = now();
  for (long i = 0; i < n; i++) {
    pthread_mutex_lock(&mu);
    while (in_flight >= inflight) pthread_cond_wait(&cv, &mu);
    in_flight++;
    pthread_mutex_unlock(&mu);
    if (wasmpool_handler_push(h, wasmpool_request_new("GET", "/"), on_response, NULL) != WASMPOOL_OK) {
      fprintf(stderr, "push: %s\n", wasmpool_last_error());
      return 1;
    }
  }
  pthread_mutex_lock(&mu);
  while (done < n) pthread_cond_wait(&cv, &mu);
  pthread_mutex_unlock(&mu);
  double secs = now() - t0;
  wasmpool_handler_free(h);
  printf("%.0f req/s (%ld requests, %ld failed, %.2f s)\n", n / secs, n, failed, secs);
  return failed ? 1 : 0;
}
