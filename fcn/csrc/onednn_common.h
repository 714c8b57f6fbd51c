// What fcn's oneDNN handlers share across their sources (onednn_conv.cc: the convolutions and
// the probe; onednn_bn.cc: batch norm + ReLU): one engine, one run mutex, and one stream and
// scratchpad serving every call. Inline functions in a named namespace, so that the sources of
// the one library share each function's single static, not one copy per source.
//
// Calls run one at a time (RunMutex): each already uses every core (OpenMP), and XLA starts
// independent operations side by side, which would oversubscribe the cores. Nothing is allocated
// per call: primitives are built once per shape, and one stream, scratchpad and kernel buffer
// serve every call (`Reused`).

#ifndef FCN_CSRC_ONEDNN_COMMON_H_
#define FCN_CSRC_ONEDNN_COMMON_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace fcn_onednn {

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using Out = ffi::Result<ffi::AnyBuffer>;

// The oneDNN data type of an XLA one fcn's handlers take (float32 or bfloat16), else undef.
inline memory::data_type DataTypeOf(ffi::DataType t) {
  if (t == ffi::DataType::F32) return memory::data_type::f32;
  if (t == ffi::DataType::BF16) return memory::data_type::bf16;
  return memory::data_type::undef;
}

inline memory::data_type Dt(int bf16) { return bf16 ? memory::data_type::bf16 : memory::data_type::f32; }

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

inline std::mutex& RunMutex() {
  static std::mutex mu;
  return mu;
}

// A buffer that grows to the largest size asked of it and is kept (uninitialised: a std::vector
// would zero it first).
class Buffer {
 public:
  void* Get(size_t bytes) {
    if (bytes > size_) {
      data_.reset(new char[bytes]);
      size_ = bytes;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<char[]> data_;
  size_t size_ = 0;
};

// What every call uses besides its operands, made once: only ever used under RunMutex. Made
// per call, the scratchpad (over 1 KiB, past glibc's per-thread cache, so taken from the one
// arena `fcn.host_memory.retain_freed_memory` leaves, under its lock) alone took about 0.15 ms a call.
struct Reused {
  dnnl::stream stream{Engine()};
  Buffer scratch, kernel;
};

inline Reused& Shared() {
  static Reused reused;
  return reused;
}

// The user-mode scratchpad of `bytes` (from Shared()) in `args`.
inline void AddScratchpad(size_t bytes, std::unordered_map<int, memory>& args) {
  if (bytes > 0) {
    memory::desc md({static_cast<memory::dim>(bytes)}, memory::data_type::u8, tag::a);
    args.insert({DNNL_ARG_SCRATCHPAD, memory(md, Engine(), Shared().scratch.Get(bytes))});
  }
}

// Batch norm + ReLU's forward and backward primitives for x [b, h, w, c] of type `dt`, for the
// probe (onednn_bn.cc).
std::pair<dnnl::primitive, dnnl::primitive> BnPrimitives(int64_t b, int64_t h, int64_t w, int64_t c, float epsilon,
                                                         memory::data_type dt);

}  // namespace fcn_onednn

#endif  // FCN_CSRC_ONEDNN_COMMON_H_
