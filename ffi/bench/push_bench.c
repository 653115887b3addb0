/* Push throughput of the C API: N requests of GET / with at most INFLIGHT
 * pushed and not yet completed, completions on engine threads. Compare
 * with benches/api_push.rs (the same through the Rust API).
 *
 *   push_bench COMPONENT CACHE_DIR N INFLIGHT [BATCH] -> "<rate> req/s" on stdout
 */
#define _POSIX_C_SOURCE 200809L
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <wasmpool.h>

/* The pusher keeps at most INFLIGHT requests in flight and, once there,
 * sleeps until BATCH of them have completed, as a host's event loop takes
 * completions in batches. BATCH 1 wakes it for every completion. Counters
 * are atomics: nothing here is a lock that engine threads and the pusher
 * contend on. */
static long in_flight, completed, n_total, wake_at;
static sem_t wake, all_done;
static long failed;

static void on_response(void *user, wasmpool_result r, wasmpool_response *resp) {
  (void)user;
  if (r != WASMPOOL_OK || wasmpool_response_status(resp) != 200) __atomic_add_fetch(&failed, 1, __ATOMIC_RELAXED);
  wasmpool_response_free(resp);
  if (__atomic_sub_fetch(&in_flight, 1, __ATOMIC_ACQ_REL) == wake_at) sem_post(&wake);
  if (__atomic_add_fetch(&completed, 1, __ATOMIC_ACQ_REL) == n_total) sem_post(&all_done);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 5 && argc != 6) {
    fprintf(stderr, "usage: %s COMPONENT CACHE_DIR N INFLIGHT [BATCH]\n", argv[0]);
    return 2;
  }
  long n = atol(argv[3]), inflight = atol(argv[4]), batch = argc == 6 ? atol(argv[5]) : 16;
  if (n < 1 || inflight < 1 || batch < 1 || batch > inflight) {
    fprintf(stderr, "N, INFLIGHT and BATCH must be positive, BATCH at most INFLIGHT\n");
    return 2;
  }
  n_total = n;
  wake_at = inflight - batch;
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
  if (sem_init(&wake, 0, 0) != 0 || sem_init(&all_done, 0, 0) != 0) {
    perror("sem_init");
    return 1;
  }
  double t0 = now();
  for (long i = 0; i < n; i++) {
    /* A post may be left from a batch that completed while pushing: look
     * again after every wake. */
    while (__atomic_load_n(&in_flight, __ATOMIC_ACQUIRE) >= inflight) sem_wait(&wake);
    __atomic_add_fetch(&in_flight, 1, __ATOMIC_ACQ_REL);
    if (wasmpool_handler_push(h, wasmpool_request_new("GET", "/"), on_response, NULL) != WASMPOOL_OK) {
      fprintf(stderr, "push: %s\n", wasmpool_last_error());
      return 1;
    }
  }
  while (sem_wait(&all_done) != 0) {
  }
  double secs = now() - t0;
  wasmpool_handler_free(h);
  printf("%.0f req/s (%ld requests, %ld failed, %.2f s)\n", n / secs, n, failed, secs);
  return failed ? 1 : 0;
}
