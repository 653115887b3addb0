// The header compiles as C++17 and the API is usable from C++.
#include "wasmpool.h"

#include <cstdio>
#include <cstring>
#include <memory>

int main() {
  std::unique_ptr<wasmpool_config, decltype(&wasmpool_config_free)> cfg(wasmpool_config_new(), wasmpool_config_free);
  if (!cfg) return 1;
  wasmpool_result r = wasmpool_config_set_max_instance_reuse_count(cfg.get(), 0);
  if (r != WASMPOOL_INVALID_ARGUMENT) return 1;
  if (std::strcmp(wasmpool_version(), WASMPOOL_VERSION_STRING) != 0) return 1;
  std::printf("C++: %s, %s\n", wasmpool_version(), wasmpool_result_str(r));
  return 0;
}
