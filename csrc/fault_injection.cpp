#include "fault_injection.h"

#include <atomic>
#include <map>
#include <mutex>

namespace ds_fastckpt {
namespace faults {

namespace {

struct Fault {
  int err;
  int skip;
};

std::atomic<bool> g_armed{false};
std::mutex g_mutex;
std::map<std::string, Fault> g_faults;

}  // namespace

void arm(const std::string& point, int err, int skip) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_faults[point] = Fault{err, skip};
  g_armed.store(true);
}

void disarm_all() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_faults.clear();
  g_armed.store(false);
}

int hit(const char* point) {
  if (!g_armed.load(std::memory_order_relaxed)) return 0;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_faults.find(point);
  if (it == g_faults.end()) return 0;
  if (it->second.skip > 0) {
    --it->second.skip;
    return 0;
  }
  const int err = it->second.err;
  g_faults.erase(it);
  g_armed.store(!g_faults.empty());
  return err;
}

}  // namespace faults
}  // namespace ds_fastckpt
