/* The README's C quick start: load a component, push one request, print
 * the response. usage: quickstart COMPONENT.wasm */
#include <stdio.h>
#include <wasmpool.h>

static void on_response(void *userdata, wasmpool_result result, wasmpool_response *resp) {
  (void)userdata;
  /* runs exactly once, on an engine thread; resp is NULL unless result is WASMPOOL_OK */
  if (result == WASMPOOL_OK) {
    size_t len;
    const uint8_t *body = wasmpool_response_body(resp, &len);
    printf("%u %.*s", wasmpool_response_status(resp), (int)len, (const char *)body);
  } else {
    fprintf(stderr, "%s: %s\n", wasmpool_result_str(result), wasmpool_last_error());
  }
  wasmpool_response_free(resp);
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  wasmpool_config *cfg = wasmpool_config_new();
  wasmpool_config_set_max_instance_reuse_count(cfg, 64); /* same knobs as the CLI */
  wasmpool_handler *h;
  if (wasmpool_handler_new(cfg, argv[1], &h) != WASMPOOL_OK) {
    fprintf(stderr, "%s\n", wasmpool_last_error());
    return 1;
  }
  wasmpool_config_free(cfg);
  wasmpool_request *req = wasmpool_request_new("GET", "/");
  wasmpool_handler_push(h, req, on_response, NULL); /* takes ownership of req */
  wasmpool_handler_free(h);                         /* waits for the callback */
  return 0;
}
