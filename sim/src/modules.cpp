// The host-compiled kernel modules: target/sim/kernels/<family>.so, one per cuda/*.cu, built by sim/Makefile.
// A module's TLS block is the shared memory of the block running on that OS thread (specdec_sim/device.h).
#include <dlfcn.h>
#include <link.h>
#include <string.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "runtime.h"

namespace specdec_sim {
namespace {

struct TlsQuery {
  uintptr_t base;
  size_t size;
};

int FindTls(struct dl_phdr_info* info, size_t, void* data) {
  TlsQuery* query = static_cast<TlsQuery*>(data);
  if (info->dlpi_addr != query->base) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type == PT_TLS) query->size = info->dlpi_phdr[i].p_memsz;
  }
  return 1;
}

}  // namespace

KernelModule* LoadKernelModule(const std::string& family, std::string* error) {
  static std::mutex mutex;
  static std::map<std::string, std::unique_ptr<KernelModule>>* modules =
      new std::map<std::string, std::unique_ptr<KernelModule>>;  // never unloaded
  std::lock_guard<std::mutex> lock(mutex);
  auto found = modules->find(family);
  if (found != modules->end()) return found->second.get();
  auto module = std::make_unique<KernelModule>();
  module->family = family;
  module->path = GetSettings().kernels_dir + "/" + family + ".so";
  module->handle = dlopen(module->path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (module->handle == nullptr) {
    *error = "cannot load the simulator's build of " + family + ": " + dlerror() +
             " (build it with `make -C sim`, or set SPECDEC_SIM_KERNELS)";
    return nullptr;
  }
  struct link_map* map = nullptr;
  if (dlinfo(module->handle, RTLD_DI_LINKMAP, &map) != 0 || map == nullptr) {
    *error = "dlinfo failed on " + module->path;
    return nullptr;
  }
  TlsQuery query{map->l_addr, 0};
  dl_iterate_phdr(FindTls, &query);
  if (query.size < kDynamicSharedCapacity) {
    *error = module->path + " has no dynamic shared memory array (was it built by sim/Makefile?)";
    return nullptr;
  }
  module->tls_size = query.size;
  InstallSanitizerHook();  // the module brought in UBSan's runtime, which has its own death callback
  KernelModule* raw = module.get();
  (*modules)[family] = std::move(module);
  return raw;
}

}  // namespace specdec_sim
