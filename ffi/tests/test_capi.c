/* Tests of the wasmpool C API: every function, its errors and defined
 * misuse, concurrency, poll mode, and freeing a handler with requests in
 * flight. Run under AddressSanitizer/UBSan and valgrind by tests/c_api.rs.
 *
 * usage: test_capi P2_SUITE.wasm P3_SUITE.wasm CACHE_DIR [quick]
 */
#define _GNU_SOURCE
#include "wasmpool.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                              \
  do {                                                                           \
    checks++;                                                                    \
    if (!(cond)) {                                                               \
      failures++;                                                                \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, \
              __LINE__, #cond, wasmpool_last_error());                           \
    }                                                                            \
  } while (0)

#define CHECK_RESULT(expr, expected)                                             \
  do {                                                                           \
    wasmpool_result r_ = (expr);                                                 \
    checks++;                                                                    \
    if (r_ != (expected)) {                                                      \
      failures++;                                                                \
      fprintf(stderr, "%s:%d: %s returned %s, expected %s (last error: %s)\n",  \
              __FILE__, __LINE__, #expr, wasmpool_result_str(r_),                \
              wasmpool_result_str(expected), wasmpool_last_error());             \
    }                                                                            \
  } while (0)

static const char *p2_path, *p3_path, *cache_dir;
static int quick = 0;

static wasmpool_config *small_config(void) {
  wasmpool_config *cfg = wasmpool_config_new();
  CHECK(cfg != NULL);
  /* Small pools keep the address-space reservation modest (valgrind). */
  CHECK_RESULT(wasmpool_config_set_max_concurrent_requests(cfg, 16), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_memory_size(cfg, 16u << 20), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_memory_keep_resident(cfg, 256u << 10), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_cache_dir(cfg, cache_dir), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_engine_threads(cfg, 2), WASMPOOL_OK);
  return cfg;
}

static wasmpool_handler *new_handler(wasmpool_config *cfg, const char *path) {
  wasmpool_handler *h = NULL;
  CHECK_RESULT(wasmpool_handler_new(cfg, path, &h), WASMPOOL_OK);
  CHECK(h != NULL);
  return h;
}

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n);
  if (fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
  fclose(f);
  *len = (size_t)n;
  return buf;
}

static int body_is(const wasmpool_response *resp, const char *expected) {
  size_t len = 0;
  const uint8_t *body = wasmpool_response_body(resp, &len);
  return len == strlen(expected) && (len == 0 || memcmp(body, expected, len) == 0);
}

static void test_basics(void) {
  CHECK(strcmp(wasmpool_version(), WASMPOOL_VERSION_STRING) == 0);
  CHECK(strcmp(wasmpool_result_str(WASMPOOL_OK), "ok") == 0);
  for (unsigned i = 0; i <= WASMPOOL_MISUSE; i++) CHECK(strlen(wasmpool_result_str(i)) > 0);
  CHECK(strcmp(wasmpool_result_str(9999), "unknown result") == 0);
  CHECK(WASMPOOL_OK == 0 && WASMPOOL_NULL_ARGUMENT == 1 && WASMPOOL_PANIC == 8 && WASMPOOL_IO == 9);
  CHECK(wasmpool_last_error() != NULL);
}

static void test_config(void) {
  wasmpool_config *cfg = wasmpool_config_new();
  CHECK(cfg != NULL);
  CHECK_RESULT(wasmpool_config_set_max_instance_reuse_count(cfg, 8), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_instance_reuse_count(cfg, 0), WASMPOOL_INVALID_ARGUMENT);
  CHECK(strstr(wasmpool_last_error(), "max-instance-reuse-count") != NULL);
  CHECK_RESULT(wasmpool_config_set_max_instance_concurrent_reuse_count(cfg, 4), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_instance_concurrent_reuse_count(cfg, 0), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_idle_instance_timeout_ms(cfg, 0), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_idle_instance_timeout_ms(cfg, UINT64_MAX), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_request_timeout_ms(cfg, 5000), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_request_timeout_ms(cfg, 0), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_max_concurrent_requests(cfg, 10), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_concurrent_requests(cfg, 0), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_max_queued_requests(cfg, 0), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_queue_wait_ms(cfg, 100), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_memory_size(cfg, 1u << 20), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_memory_size(cfg, 0), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_max_memory_size(cfg, 8ull << 30), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_memory_keep_resident(NULL, 0), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_memory_budget(cfg, 64u << 20), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_memory_budget(cfg, 0), WASMPOOL_OK); /* auto */
  CHECK_RESULT(wasmpool_config_set_memory_budget(cfg, 1000), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_memory_budget(cfg, UINT64_MAX), WASMPOOL_INVALID_ARGUMENT);
  CHECK(strstr(wasmpool_last_error(), "memory-budget") != NULL);
  CHECK_RESULT(wasmpool_config_set_memory_budget(NULL, 0), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_add_dir(cfg, "/tmp", "/data", false), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_add_dir(cfg, "/tmp", NULL, true), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_add_dir(cfg, "/nonexistent/dir", "/x", false), WASMPOOL_INVALID_ARGUMENT);
  CHECK(strstr(wasmpool_last_error(), "/nonexistent/dir") != NULL);
  CHECK_RESULT(wasmpool_config_add_dir(cfg, "", "/x", false), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_add_dir(cfg, NULL, "/x", false), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_add_dir(NULL, "/tmp", "/x", false), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_add_config_var(cfg, "greeting", "hi"), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_add_config_var(cfg, "greeting", ""), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_add_config_var(cfg, "", "x"), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_add_config_var(cfg, "a=b", "x"), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_add_config_var(cfg, "k", NULL), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_cache_dir(cfg, "/tmp/x"), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_cache_dir(cfg, ""), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_cache_dir(cfg, NULL), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_cache_max_size(cfg, 64u << 20), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_cache_max_size(cfg, 0), WASMPOOL_OK); /* no limit */
  CHECK_RESULT(wasmpool_config_set_cache_max_size(NULL, 0), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_no_cache(cfg, true), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_add_env(cfg, "A", "1"), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_add_env(cfg, "", "1"), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_add_env(cfg, "A", NULL), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_add_allow_outbound(cfg, "example.com:443"), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_add_allow_outbound(cfg, "host:0"), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_completion_mode(cfg, WASMPOOL_COMPLETION_POLL), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_completion_mode(cfg, 7), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_reuse_mode(cfg, WASMPOOL_REUSE_NEVER), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_reuse_mode(cfg, WASMPOOL_REUSE_ALWAYS), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_reuse_mode(cfg, WASMPOOL_REUSE_AUTO), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_reuse_mode(cfg, 3), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_engine_threads(cfg, 0), WASMPOOL_INVALID_ARGUMENT);
  /* NULL handles */
  CHECK_RESULT(wasmpool_config_set_max_instance_reuse_count(NULL, 1), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_request_timeout_ms(NULL, 1), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_completion_mode(NULL, 0), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_reuse_mode(NULL, 0), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_reuse_mode(NULL, 9), WASMPOOL_NULL_ARGUMENT);
  wasmpool_config_free(cfg);
  wasmpool_config_free(NULL);
}

static void write_text(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  if (!f) return;
  fputs(text, f);
  fclose(f);
}

/* The server's TOML config file, read into a config. */
static void test_config_file(void) {
  char dir[] = "/tmp/wasmpool-capi-cfg-XXXXXX", path[256], want[300];
  CHECK(mkdtemp(dir) != NULL);
  snprintf(path, sizeof(path), "%s/wasmpool.toml", dir);
  snprintf(want, sizeof(want), "%s/app.wasm", dir);
  write_text(path,
             "component = \"app.wasm\"\n"
             "listen = [\"127.0.0.1:8080\"]\n" /* the server's only: kept, no effect */
             "max-instance-reuse-count = 7\n"
             "request-timeout = \"2s\"\n"
             "memory-budget = \"64MiB\"\n"
             "env = [\"A=1\"]\n"
             "[config-vars]\ngreeting = \"hi\"\n"
             "[otel]\nservice-name = \"svc\"\n");
  wasmpool_config *cfg = wasmpool_config_new();
  CHECK(wasmpool_config_component(cfg) == NULL);
  CHECK_RESULT(wasmpool_config_load_file(cfg, path), WASMPOOL_OK);
  const char *component = wasmpool_config_component(cfg);
  CHECK(component != NULL && strcmp(component, want) == 0);
  /* a setter after the file overrides it */
  CHECK_RESULT(wasmpool_config_set_max_instance_reuse_count(cfg, 3), WASMPOOL_OK);

  /* errors: the file, the line and the key; the config is unchanged */
  char missing[300];
  snprintf(missing, sizeof(missing), "%s/missing.toml", dir);
  CHECK_RESULT(wasmpool_config_load_file(cfg, missing), WASMPOOL_IO);
  CHECK(strstr(wasmpool_last_error(), "missing.toml") != NULL);
/* the file `text` is refused as invalid, and the message names `needle` */
#define REFUSED(text, needle)                                                     \
  do {                                                                           \
    write_text(path, text);                                                      \
    CHECK_RESULT(wasmpool_config_load_file(cfg, path), WASMPOOL_INVALID_ARGUMENT); \
    CHECK(strstr(wasmpool_last_error(), needle) != NULL);                        \
  } while (0)
  REFUSED("max-instance-reuse-count = 2\nrequest-timeout = \n", "line 2");
  REFUSED("# a comment\nmax-instance-reuse-count = 0\n", "max-instance-reuse-count");
  CHECK(strstr(wasmpool_last_error(), "line 2") != NULL);
  CHECK(strstr(wasmpool_last_error(), "wasmpool.toml") != NULL);
  REFUSED("no-such-key = 1\n", "no-such-key");
  REFUSED("memory-budget = \"1000PiB\"\n", "memory-budget");
  REFUSED("[otel]\ntraces-sampler = \"sometimes\"\n", "sampler");
#undef REFUSED
  CHECK(wasmpool_config_component(cfg) != NULL &&
        strcmp(wasmpool_config_component(cfg), want) == 0);
  /* a file without a component: none */
  write_text(path, "max-queued-requests = 0\n");
  CHECK_RESULT(wasmpool_config_load_file(cfg, path), WASMPOOL_OK);
  CHECK(wasmpool_config_component(cfg) == NULL);
  CHECK_RESULT(wasmpool_config_load_file(NULL, path), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_load_file(cfg, NULL), WASMPOOL_NULL_ARGUMENT);
  CHECK(wasmpool_config_component(NULL) == NULL);

  /* the budget shared by 4 processes: a quarter each, and it serves */
  CHECK_RESULT(wasmpool_config_set_memory_budget_share(cfg, 0), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_memory_budget_share(NULL, 2), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_memory_budget(cfg, 64u << 20), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_memory_budget_share(cfg, 4), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_cache_dir(cfg, cache_dir), WASMPOOL_OK);
  /* small pools, as small_config's (valgrind) */
  CHECK_RESULT(wasmpool_config_set_max_concurrent_requests(cfg, 16), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_memory_size(cfg, 16u << 20), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_memory_keep_resident(cfg, 256u << 10), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_engine_threads(cfg, 2), WASMPOOL_OK);
  wasmpool_handler *h = new_handler(cfg, p2_path);
  if (h) {
    wasmpool_response *resp = NULL;
    CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/"), &resp), WASMPOOL_OK);
    CHECK(wasmpool_response_status(resp) == 200);
    wasmpool_response_free(resp);
    CHECK_RESULT(wasmpool_handler_free(h), WASMPOOL_OK);
  }
  wasmpool_config_free(cfg);
  unlink(path);
  rmdir(dir);
}

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char log_seen[4096];
static int log_guest_info;

static void on_log(void *userdata, wasmpool_log_level level, bool guest, const uint8_t *msg,
                   size_t len) {
  (void)userdata;
  pthread_mutex_lock(&log_lock);
  if (guest && level == WASMPOOL_LOG_INFO && memmem(msg, len, "guest log line from p2", 22))
    log_guest_info++;
  size_t used = strlen(log_seen);
  if (used + len + 2 < sizeof(log_seen)) {
    memcpy(log_seen + used, msg, len);
    log_seen[used + len] = '\n';
    log_seen[used + len + 1] = '\0';
  }
  pthread_mutex_unlock(&log_lock);
}

/* What the library logs, and the guest's output, reach the host. */
static void test_logger(wasmpool_handler *h) {
  CHECK_RESULT(wasmpool_set_logger(on_log, NULL, 9), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_set_logger(on_log, NULL, WASMPOOL_LOG_INFO), WASMPOOL_OK);
  wasmpool_response *resp = NULL;
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/log"), &resp), WASMPOOL_OK);
  CHECK(wasmpool_response_status(resp) == 200);
  wasmpool_response_free(resp);
  pthread_mutex_lock(&log_lock);
  CHECK(log_guest_info == 1);
  CHECK(strstr(log_seen, "stream=stdout") != NULL);
  pthread_mutex_unlock(&log_lock);
  /* off: the next line goes nowhere */
  CHECK_RESULT(wasmpool_set_logger(NULL, NULL, WASMPOOL_LOG_INFO), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/log"), &resp), WASMPOOL_OK);
  wasmpool_response_free(resp);
  pthread_mutex_lock(&log_lock);
  CHECK(log_guest_info == 1);
  pthread_mutex_unlock(&log_lock);
}

/* Which instance answered, and whether it had answered before. */
static void test_served(wasmpool_handler *h) {
  wasmpool_response *a = NULL, *b = NULL;
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/counter"), &a), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/counter"), &b), WASMPOOL_OK);
  CHECK(wasmpool_response_instance_id(a) > 0);
  /* one request at a time: the second goes to the idle instance */
  CHECK(wasmpool_response_instance_id(b) == wasmpool_response_instance_id(a));
  CHECK(wasmpool_response_reused(b));
  wasmpool_response_free(a);
  wasmpool_response_free(b);
  CHECK(wasmpool_response_instance_id(NULL) == 0);
  CHECK(!wasmpool_response_reused(NULL));
}

static void test_requests(void) {
  CHECK(wasmpool_request_new(NULL, "/") == NULL);
  CHECK(wasmpool_request_new("GET", NULL) == NULL);
  CHECK(wasmpool_request_new("GE T", "/") == NULL);
  CHECK(strstr(wasmpool_last_error(), "method") != NULL);
  CHECK(wasmpool_request_new("GET", "not a uri") == NULL);
  wasmpool_request *req = wasmpool_request_new("GET", "http://example.com/x?y=1");
  CHECK(req != NULL);
  CHECK_RESULT(wasmpool_request_add_header(req, "x-a", (const uint8_t *)"b", 1), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_request_add_header(req, "bad name", (const uint8_t *)"b", 1), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_request_add_header(req, "x-a", (const uint8_t *)"a\nb", 3), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_request_add_header(req, "x-empty", NULL, 0), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_request_add_header(req, "x-a", NULL, 3), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_request_add_header(NULL, "x-a", (const uint8_t *)"b", 1), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_request_add_header(NULL, "bad name", (const uint8_t *)"b", 1), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_request_set_body(req, (const uint8_t *)"abc", 3), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_request_set_body(req, NULL, 0), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_request_set_body(req, NULL, 3), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_request_set_body(NULL, NULL, 0), WASMPOOL_NULL_ARGUMENT);
  wasmpool_request_free(req);
  wasmpool_request_free(NULL);
  /* response accessors on NULL */
  size_t len = 99;
  CHECK(wasmpool_response_status(NULL) == 0);
  CHECK(wasmpool_response_header_count(NULL) == 0);
  CHECK(wasmpool_response_body(NULL, &len) == NULL && len == 0);
  wasmpool_response_free(NULL);
}

static void test_load_errors(void) {
  wasmpool_config *cfg = small_config();
  wasmpool_handler *h = NULL;
  CHECK_RESULT(wasmpool_handler_new(cfg, "/nonexistent/x.wasm", &h), WASMPOOL_IO);
  CHECK(h == NULL);
  CHECK_RESULT(wasmpool_handler_new_from_bytes(cfg, (const uint8_t *)"junk", 4, &h), WASMPOOL_COMPONENT_ERROR);
  CHECK(strstr(wasmpool_last_error(), "not a WebAssembly component") != NULL);
  CHECK_RESULT(wasmpool_handler_new_from_bytes(cfg, NULL, 0, &h), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_handler_new(NULL, p2_path, &h), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_handler_new(cfg, NULL, &h), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_handler_new(cfg, p2_path, NULL), WASMPOOL_NULL_ARGUMENT);
  CHECK(h == NULL);
  CHECK_RESULT(wasmpool_handler_free(NULL), WASMPOOL_OK);
  CHECK(wasmpool_handler_completion_fd(NULL) == -1);
  CHECK(wasmpool_handler_poll(NULL, 10) == 0);
  wasmpool_stats st;
  CHECK_RESULT(wasmpool_handler_stats(NULL, &st), WASMPOOL_NULL_ARGUMENT);
  wasmpool_config_free(cfg);
}

/* A completion counter that a callback signals. */
typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int done;
  int ok;
  int by_result[16];
  int bad_body;
  pthread_t thread;
  wasmpool_handler *handler;
  wasmpool_result misuse_free, misuse_call;
} waiter;

static void waiter_init(waiter *w) {
  memset(w, 0, sizeof *w);
  pthread_mutex_init(&w->lock, NULL);
  pthread_cond_init(&w->cond, NULL);
}

static void waiter_wait(waiter *w, int n) {
  pthread_mutex_lock(&w->lock);
  while (w->done < n) pthread_cond_wait(&w->cond, &w->lock);
  pthread_mutex_unlock(&w->lock);
}

static void waiter_destroy(waiter *w) {
  pthread_mutex_destroy(&w->lock);
  pthread_cond_destroy(&w->cond);
}

static void on_done(void *userdata, wasmpool_result result, wasmpool_response *resp) {
  waiter *w = userdata;
  if (result == WASMPOOL_OK) {
    if (resp == NULL || wasmpool_response_status(resp) != 200) w->bad_body++;
  } else if (resp != NULL) {
    w->bad_body++;
  }
  wasmpool_response_free(resp);
  pthread_mutex_lock(&w->lock);
  w->done++;
  if (result == WASMPOOL_OK) w->ok++;
  if ((unsigned)result < 16) w->by_result[result]++;
  w->thread = pthread_self();
  pthread_cond_broadcast(&w->cond);
  pthread_mutex_unlock(&w->lock);
}

static void on_done_misuse(void *userdata, wasmpool_result result, wasmpool_response *resp) {
  waiter *w = userdata;
  (void)result;
  w->misuse_free = wasmpool_handler_free(w->handler);
  wasmpool_request *req = wasmpool_request_new("GET", "/");
  wasmpool_response *out = NULL;
  w->misuse_call = wasmpool_handler_call(w->handler, req, &out);
  on_done(userdata, result, resp);
}

static wasmpool_result push(wasmpool_handler *h, const char *method, const char *uri, waiter *w) {
  wasmpool_request *req = wasmpool_request_new(method, uri);
  CHECK(req != NULL);
  return wasmpool_handler_push(h, req, on_done, w);
}

static void test_call_and_echo(wasmpool_handler *h) {
  wasmpool_request *req = wasmpool_request_new("POST", "/echo?q=1");
  CHECK_RESULT(wasmpool_request_add_header(req, "x-test", (const uint8_t *)"value", 5), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_request_set_body(req, (const uint8_t *)"hello body", 10), WASMPOOL_OK);
  wasmpool_response *resp = NULL;
  CHECK_RESULT(wasmpool_handler_call(h, req, &resp), WASMPOOL_OK);
  CHECK(resp != NULL);
  if (!resp) return;
  CHECK(wasmpool_response_status(resp) == 200);
  size_t len = 0;
  const uint8_t *body = wasmpool_response_body(resp, &len);
  CHECK(len > 0 && memmem(body, len, "POST /echo?q=1\n", 15) == body);
  CHECK(memmem(body, len, "x-test: value\n", 14) != NULL);
  CHECK(len >= 10 && memcmp(body + len - 10, "hello body", 10) == 0);
  size_t n = wasmpool_response_header_count(resp);
  for (size_t i = 0; i < n; i++) {
    const uint8_t *name, *value;
    size_t nl, vl;
    CHECK_RESULT(wasmpool_response_header(resp, i, &name, &nl, &value, &vl), WASMPOOL_OK);
    CHECK(nl > 0);
  }
  const uint8_t *name, *value;
  size_t nl, vl;
  CHECK_RESULT(wasmpool_response_header(resp, n, &name, &nl, &value, &vl), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_response_header(resp, 0, NULL, &nl, &value, &vl), WASMPOOL_NULL_ARGUMENT);
  CHECK(wasmpool_response_body(resp, NULL) == NULL);
  wasmpool_response_free(resp);
  /* call: NULL arguments still take the request */
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/"), NULL), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_handler_call(NULL, wasmpool_request_new("GET", "/"), &resp), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_handler_call(h, NULL, &resp), WASMPOOL_NULL_ARGUMENT);
  /* a trap and a guest that never answers, through call */
  resp = NULL;
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/trap"), &resp), WASMPOOL_TRAP);
  CHECK(resp == NULL);
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/silent"), &resp), WASMPOOL_GUEST_ERROR);
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/"), &resp), WASMPOOL_OK);
  CHECK(body_is(resp, "hello from p2\n"));
  wasmpool_response_free(resp);
}

static void test_push(wasmpool_handler *h) {
  waiter w;
  waiter_init(&w);
  CHECK_RESULT(push(h, "GET", "/", &w), WASMPOOL_OK);
  CHECK_RESULT(push(h, "GET", "/trap", &w), WASMPOOL_OK);
  waiter_wait(&w, 2);
  CHECK(w.ok == 1 && w.by_result[WASMPOOL_TRAP] == 1 && w.bad_body == 0);
  CHECK(!pthread_equal(w.thread, pthread_self())); /* engine thread */
  /* NULL callback or handler: error, request taken, callback never runs */
  CHECK_RESULT(wasmpool_handler_push(h, wasmpool_request_new("GET", "/"), NULL, &w), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_handler_push(NULL, wasmpool_request_new("GET", "/"), on_done, &w), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_handler_push(h, NULL, on_done, &w), WASMPOOL_NULL_ARGUMENT);
  usleep(100000);
  CHECK(w.done == 2);
  /* misuse from inside a callback is refused, not a deadlock */
  w.handler = h;
  CHECK_RESULT(wasmpool_handler_push(h, wasmpool_request_new("GET", "/"), on_done_misuse, &w), WASMPOOL_OK);
  waiter_wait(&w, 3);
  CHECK(w.misuse_free == WASMPOOL_MISUSE && w.misuse_call == WASMPOOL_MISUSE);
  waiter_destroy(&w);
}

typedef struct {
  wasmpool_handler *h;
  waiter *w;
  int n;
  int push_failures;
} pusher_args;

static void *pusher(void *arg) {
  pusher_args *a = arg;
  for (int i = 0; i < a->n; i++)
    if (push(a->h, "GET", (i % 2) ? "/counter" : "/", a->w) != WASMPOOL_OK) a->push_failures++;
  return NULL;
}

static void test_concurrent_push(wasmpool_handler *h) {
  enum { THREADS = 8 };
  int per = quick ? 5 : 50;
  waiter w;
  waiter_init(&w);
  pthread_t t[THREADS];
  pusher_args a[THREADS];
  for (int i = 0; i < THREADS; i++) {
    a[i] = (pusher_args){h, &w, per, 0};
    pthread_create(&t[i], NULL, pusher, &a[i]);
  }
  for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
  for (int i = 0; i < THREADS; i++) CHECK(a[i].push_failures == 0);
  waiter_wait(&w, THREADS * per);
  usleep(50000);
  CHECK(w.done == THREADS * per); /* exactly once each */
  CHECK(w.ok == THREADS * per && w.bad_body == 0);
  if (w.ok != THREADS * per)
    for (int i = 0; i < 16; i++)
      if (w.by_result[i]) fprintf(stderr, "  %d x %s\n", w.by_result[i], wasmpool_result_str((unsigned)i));
  wasmpool_stats st;
  CHECK_RESULT(wasmpool_handler_stats(h, &st), WASMPOOL_OK);
  CHECK(st.requests_handled >= (uint64_t)(THREADS * per));
  CHECK(st.instances_created >= 1);
  CHECK(st.in_flight == 0 && st.queued == 0);
  CHECK_RESULT(wasmpool_handler_stats(h, NULL), WASMPOOL_NULL_ARGUMENT);
  waiter_destroy(&w);
}

static void test_timeout_and_overload(void) {
  wasmpool_config *cfg = small_config();
  /* Long enough that /busy still holds the slot when the second push is
   * handled, even under valgrind. */
  CHECK_RESULT(wasmpool_config_set_request_timeout_ms(cfg, 2000), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_concurrent_requests(cfg, 1), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_queued_requests(cfg, 0), WASMPOOL_OK);
  wasmpool_handler *h = new_handler(cfg, p3_path);
  wasmpool_config_free(cfg); /* the handler keeps its own copy */
  waiter w;
  waiter_init(&w);
  CHECK_RESULT(push(h, "GET", "/busy", &w), WASMPOOL_OK);
  /* Wait until /busy holds the only slot: an instance runs it (in_flight
   * counts pushed requests, admitted or not; valgrind reorders threads). */
  wasmpool_stats st;
  for (int i = 0; i < 1000; i++) {
    CHECK_RESULT(wasmpool_handler_stats(h, &st), WASMPOOL_OK);
    if (st.instances_live == 1) break;
    usleep(10000);
  }
  CHECK(st.instances_live == 1);
  CHECK_RESULT(push(h, "GET", "/", &w), WASMPOOL_OK); /* no slot, no queue */
  waiter_wait(&w, 2);
  CHECK(w.by_result[WASMPOOL_TIMEOUT] == 1 && w.by_result[WASMPOOL_OVERLOADED] == 1);
  if (w.by_result[WASMPOOL_TIMEOUT] != 1 || w.by_result[WASMPOOL_OVERLOADED] != 1)
    for (int i = 0; i < 16; i++)
      if (w.by_result[i]) fprintf(stderr, "  %d x %s\n", w.by_result[i], wasmpool_result_str((unsigned)i));
  wasmpool_response *resp = NULL;
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/"), &resp), WASMPOOL_OK);
  CHECK(body_is(resp, "hello from p3\n"));
  wasmpool_response_free(resp);
  CHECK_RESULT(wasmpool_handler_free(h), WASMPOOL_OK);
  waiter_destroy(&w);
}

static void test_memory_budget(void) {
  wasmpool_config *cfg = small_config();
  /* Room for a few instances (stack and start-up memory), not for one
   * that grows by 8 MiB; a grow over the budget waits no more than this. */
  CHECK_RESULT(wasmpool_config_set_memory_budget(cfg, 6u << 20), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_queue_wait_ms(cfg, 100), WASMPOOL_OK);
  wasmpool_handler *h = new_handler(cfg, p2_path);
  wasmpool_config_free(cfg);
  wasmpool_response *resp = NULL;
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/grow/128"), &resp), WASMPOOL_TRAP);
  CHECK(resp == NULL);
  CHECK_RESULT(wasmpool_handler_call(h, wasmpool_request_new("GET", "/grow/8"), &resp), WASMPOOL_OK);
  wasmpool_response_free(resp);
  CHECK_RESULT(wasmpool_handler_free(h), WASMPOOL_OK);
}

static void test_poll_mode(void) {
  wasmpool_config *cfg = small_config();
  CHECK_RESULT(wasmpool_config_set_completion_mode(cfg, WASMPOOL_COMPLETION_POLL), WASMPOOL_OK);
  wasmpool_handler *h = new_handler(cfg, p3_path);
  wasmpool_config_free(cfg);
  int fd = wasmpool_handler_completion_fd(h);
  CHECK(fd >= 0);
  CHECK(wasmpool_handler_poll(h, 10) == 0);
  waiter w;
  waiter_init(&w);
  int n = quick ? 4 : 20;
  for (int i = 0; i < n; i++) CHECK_RESULT(push(h, "GET", "/sleep/20", &w), WASMPOOL_OK);
  int ran = 0;
  while (ran < n) {
    struct pollfd p = {fd, POLLIN, 0};
    int r = poll(&p, 1, 10000);
    CHECK(r == 1);
    if (r != 1) break;
    size_t k = wasmpool_handler_poll(h, 3);
    CHECK(k >= 1 && k <= 3);
    ran += (int)k;
    CHECK(pthread_equal(w.thread, pthread_self())); /* on this thread */
  }
  CHECK(w.done == n && w.ok == n);
  /* nothing left: the fd is not readable */
  struct pollfd p = {fd, POLLIN, 0};
  CHECK(poll(&p, 1, 50) == 0);
  CHECK_RESULT(wasmpool_handler_free(h), WASMPOOL_OK);
  waiter_destroy(&w);
}

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* Runs callbacks as the completion fd says until `n` ran (or `ms`). */
static int poll_until(wasmpool_handler *h, waiter *w, int n, int ms) {
  struct pollfd p = {wasmpool_handler_completion_fd(h), POLLIN, 0};
  for (int waited = 0; w->done < n && waited < ms; waited += 10)
    if (poll(&p, 1, 10) > 0) wasmpool_handler_poll(h, 64);
  return w->done;
}

/* Inline pushes: a short request runs to its end inside the push (the
 * completion fd is readable when the push returns; the callback still waits
 * for wasmpool_handler_poll, on this thread); one that waits, or a guest
 * that spins, goes on on the engine threads and the push returns. */
static void test_inline_mode(void) {
  wasmpool_config *cfg = small_config();
  CHECK_RESULT(wasmpool_config_set_inline(NULL, true), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_inline(cfg, true), WASMPOOL_OK);
  /* callbacks on engine threads do not go with inline pushes */
  wasmpool_handler *h = NULL;
  CHECK_RESULT(wasmpool_handler_new(cfg, p2_path, &h), WASMPOOL_INVALID_ARGUMENT);
  CHECK(h == NULL);
  CHECK(strstr(wasmpool_last_error(), "inline") != NULL);
  CHECK_RESULT(wasmpool_config_set_completion_mode(cfg, WASMPOOL_COMPLETION_POLL), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_request_timeout_ms(cfg, 1000), WASMPOOL_OK);
  h = new_handler(cfg, p2_path);
  wasmpool_config_free(cfg);
  if (!h) return;
  int fd = wasmpool_handler_completion_fd(h);
  struct pollfd p = {fd, POLLIN, 0};
  waiter w;
  waiter_init(&w);
  enum { N = 20 };
  int answered_in_push = 0;
  for (int i = 0; i < N; i++) {
    CHECK_RESULT(push(h, "GET", "/", &w), WASMPOOL_OK);
    CHECK(w.done == i); /* not inside the push */
    if (poll(&p, 1, 0) == 1) answered_in_push++;
    CHECK(poll_until(h, &w, i + 1, 10000) == i + 1);
    CHECK(pthread_equal(w.thread, pthread_self()));
    CHECK(poll(&p, 1, 0) == 0); /* reset once the queue ran empty */
  }
  CHECK(w.ok == N && w.bad_body == 0);
  /* An epoch tick (a preempted thread) may send one to the engine
   * threads now and then; valgrind makes every request slower than one. */
  if (!quick) CHECK(answered_in_push >= N / 2);
  printf("inline: %d of %d answered inside the push\n", answered_in_push, N);
  /* a request that waits (for a timer) goes on on the engine threads */
  CHECK_RESULT(push(h, "GET", "/sleep/100", &w), WASMPOOL_OK);
  CHECK(w.done == N && poll(&p, 1, 0) == 0);
  CHECK(poll_until(h, &w, N + 1, 10000) == N + 1 && w.ok == N + 1);
  /* a guest that spins holds this thread about one epoch tick, then runs
   * on (and times out) on an engine thread */
  double t0 = now_ms();
  CHECK_RESULT(push(h, "GET", "/busy", &w), WASMPOOL_OK);
  double took = now_ms() - t0;
  CHECK(took < (quick ? 5000 : 500));
  printf("inline: a spinning guest held the push %.1f ms\n", took);
  CHECK(w.done == N + 1);
  CHECK(poll_until(h, &w, N + 2, 20000) == N + 2 && w.by_result[WASMPOOL_TIMEOUT] == 1);
  /* a trap inside the push is the callback's result, not the push's */
  CHECK_RESULT(push(h, "GET", "/trap", &w), WASMPOOL_OK);
  CHECK(poll_until(h, &w, N + 3, 10000) == N + 3 && w.by_result[WASMPOOL_TRAP] == 1);
  /* freed with a request in flight: its callback runs in the free */
  CHECK_RESULT(push(h, "GET", "/sleep/200", &w), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_handler_free(h), WASMPOOL_OK);
  CHECK(w.done == N + 4 && w.ok == N + 2);
  waiter_destroy(&w);
}

static void test_free_with_requests_in_flight(int poll_mode) {
  wasmpool_config *cfg = small_config();
  if (poll_mode) CHECK_RESULT(wasmpool_config_set_completion_mode(cfg, WASMPOOL_COMPLETION_POLL), WASMPOOL_OK);
  wasmpool_handler *h = new_handler(cfg, p3_path);
  wasmpool_config_free(cfg);
  waiter w;
  waiter_init(&w);
  for (int i = 0; i < 5; i++) CHECK_RESULT(push(h, "GET", "/sleep/300", &w), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_handler_free(h), WASMPOOL_OK);
  /* every callback ran before free returned, each with a response */
  CHECK(w.done == 5 && w.ok == 5);
  waiter_destroy(&w);
}

/* Trace context and export (mode "trace"; OTLP_ENDPOINT names the test's
 * receiver, which checks the spans after this exits). */
static void test_trace(const char *endpoint) {
  wasmpool_config *cfg = small_config();
  CHECK_RESULT(wasmpool_config_set_otel(cfg, "endpont", "http://x"), WASMPOOL_INVALID_ARGUMENT);
  CHECK(strstr(wasmpool_last_error(), "endpont") != NULL);
  CHECK_RESULT(wasmpool_config_set_otel(cfg, "traces-sampler", "sometimes"), WASMPOOL_INVALID_ARGUMENT);
  CHECK(strstr(wasmpool_last_error(), "otel.traces-sampler") != NULL);
  CHECK_RESULT(wasmpool_config_set_otel(cfg, "endpoint", "not a url"), WASMPOOL_INVALID_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_otel(NULL, "endpoint", endpoint), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_otel(cfg, NULL, endpoint), WASMPOOL_NULL_ARGUMENT);
  CHECK_RESULT(wasmpool_config_set_otel(cfg, "endpoint", endpoint), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_otel(cfg, "service-name", "c-host"), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_otel(cfg, "resource-attributes", "host.name=test"), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_otel(cfg, "resource-attributes", NULL), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_trace_context(cfg, true), WASMPOOL_OK);
  wasmpool_handler *h = new_handler(cfg, p2_path);
  wasmpool_config_free(cfg);
  if (!h) return;
  static const char tp[] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  wasmpool_request *req = wasmpool_request_new("GET", "/echo");
  CHECK_RESULT(wasmpool_request_add_header(req, "traceparent", (const uint8_t *)tp, strlen(tp)), WASMPOOL_OK);
  wasmpool_response *resp = NULL;
  CHECK_RESULT(wasmpool_handler_call(h, req, &resp), WASMPOOL_OK);
  if (resp) {
    size_t len = 0;
    const uint8_t *body = wasmpool_response_body(resp, &len);
    /* The guest sees the same trace with the handler's server span. */
    const char *seen = memmem(body, len, "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-", 49);
    CHECK(seen != NULL);
    CHECK(memmem(body, len, tp, strlen(tp)) == NULL);
    if (seen) printf("server span %.16s\n", seen + 49);
    wasmpool_response_free(resp);
  }
  /* A trap: the span's status says so. */
  req = wasmpool_request_new("GET", "/trap");
  static const char tp2[] = "00-22222222222222222222222222222222-00f067aa0ba902b7-01";
  CHECK_RESULT(wasmpool_request_add_header(req, "traceparent", (const uint8_t *)tp2, strlen(tp2)), WASMPOOL_OK);
  resp = NULL;
  CHECK_RESULT(wasmpool_handler_call(h, req, &resp), WASMPOOL_TRAP);
  /* Freeing sends the queued spans. */
  CHECK_RESULT(wasmpool_handler_free(h), WASMPOOL_OK);
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s P2.wasm P3.wasm CACHE_DIR [quick]\n", argv[0]);
    return 2;
  }
  p2_path = argv[1];
  p3_path = argv[2];
  cache_dir = argv[3];
  quick = argc > 4 && strcmp(argv[4], "quick") == 0;
  if (argc > 4 && strcmp(argv[4], "trace") == 0) {
    test_trace(getenv("OTLP_ENDPOINT"));
    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
  }

  test_basics();
  test_config();
  test_config_file();
  test_requests();
  test_load_errors();

  wasmpool_config *cfg = small_config();
  CHECK_RESULT(wasmpool_config_set_max_instance_reuse_count(cfg, 64), WASMPOOL_OK);
  /* Hundreds of pushes at once: let them all wait for one of 16 slots. */
  CHECK_RESULT(wasmpool_config_set_max_queued_requests(cfg, 1000), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_config_set_max_queue_wait_ms(cfg, 60000), WASMPOOL_OK);
  wasmpool_handler *h = new_handler(cfg, p2_path);
  size_t len = 0;
  char *bytes = read_file(p3_path, &len);
  CHECK(bytes != NULL);
  wasmpool_handler *h3 = NULL;
  CHECK_RESULT(wasmpool_handler_new_from_bytes(cfg, (const uint8_t *)bytes, len, &h3), WASMPOOL_OK);
  free(bytes);
  wasmpool_config_free(cfg);
  if (h && h3) {
    test_call_and_echo(h);
    test_served(h);
    test_logger(h);
    test_push(h);
    test_concurrent_push(h);
    test_concurrent_push(h3);
  }
  CHECK_RESULT(wasmpool_handler_free(h), WASMPOOL_OK);
  CHECK_RESULT(wasmpool_handler_free(h3), WASMPOOL_OK);

  test_timeout_and_overload();
  test_memory_budget();
  test_poll_mode();
  test_inline_mode();
  test_free_with_requests_in_flight(0);
  test_free_with_requests_in_flight(1);

  printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
