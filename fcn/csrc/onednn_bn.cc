// Batch normalization in training (batch statistics) followed by a ReLU, for XLA:CPU through
// oneDNN, as XLA FFI handlers (fcn/onednn.py builds and registers them). NHWC activations in
// float32 or bfloat16; scale, shift and statistics in float32.
//
//   fcn_onednn_bn_relu_fwd(x[B,H,W,C], scale[C], shift[C]) -> y, mean[C], var[C], workspace (the ReLU's mask)
//   fcn_onednn_bn_relu_bwd(x, dy, scale, mean, var, workspace) -> dx, dscale[C], dshift[C]
//   attribute: epsilon; FcnOnednnBnWorkspaceBytes(b, h, w, c, epsilon, bf16) gives the workspace's size.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "onednn_common.h"

namespace fcn_onednn {
namespace {

// Batch normalization + ReLU, training: the forward and backward primitives of one shape.
struct BnEntry {
  dnnl::batch_normalization_forward fwd;
  dnnl::batch_normalization_backward bwd;
  memory::desc data, stat, workspace;
  size_t fwd_scratch = 0, bwd_scratch = 0;
};

const BnEntry& GetBn(int64_t b, int64_t h, int64_t w, int64_t c, float epsilon, memory::data_type dt) {
  static std::mutex mu;
  static std::map<std::array<int64_t, 6>, std::unique_ptr<BnEntry>> cache;
  uint32_t eps_bits;
  std::memcpy(&eps_bits, &epsilon, sizeof eps_bits);
  std::array<int64_t, 6> key{b, h, w, c, eps_bits, static_cast<int64_t>(dt)};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return *it->second;
  }
  auto& eng = Engine();
  auto f32 = memory::data_type::f32;
  memory::desc data({b, c, h, w}, dt, tag::nhwc), stat({c}, f32, tag::a);
  auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift |
               dnnl::normalization_flags::fuse_norm_relu;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::batch_normalization_forward::primitive_desc fwd(eng, dnnl::prop_kind::forward_training, data, data, epsilon,
                                                        flags, attr);
  dnnl::batch_normalization_backward::primitive_desc bwd(eng, dnnl::prop_kind::backward, data, data, data, epsilon,
                                                         flags, fwd, attr);
  auto entry = std::make_unique<BnEntry>(BnEntry{dnnl::batch_normalization_forward(fwd),
                                                 dnnl::batch_normalization_backward(bwd), data, stat,
                                                 fwd.workspace_desc(), fwd.scratchpad_desc().get_size(),
                                                 bwd.scratchpad_desc().get_size()});
  std::lock_guard<std::mutex> lock(mu);
  auto [it, inserted] = cache.emplace(key, std::move(entry));
  return *it->second;
}

ffi::Error BnCheck(ffi::Span<const int64_t> x, std::initializer_list<ffi::Span<const int64_t>> per_channel,
                   size_t workspace_bytes, const BnEntry& e) {
  for (auto dims : per_channel)
    if (dims.size() != 1 || dims[0] != x[3])
      return ffi::Error::InvalidArgument("fcn onednn batch norm: scale, shift and statistics need one value per channel");
  if (workspace_bytes != e.workspace.get_size())
    return ffi::Error::InvalidArgument("fcn onednn batch norm: the workspace has the wrong size");
  return ffi::Error::Success();
}

// Runs the forward (`backward` false) or backward primitive for x's dimensions `d`, once the
// per-channel operands and the workspace are checked; `args_of(entry, engine)` gives its arguments.
template <typename ArgsOf>
ffi::Error RunBn(std::initializer_list<const ffi::AnyBuffer*> data, float epsilon,
                 std::initializer_list<ffi::Span<const int64_t>> per_channel, size_t workspace_bytes,
                 bool backward, ArgsOf args_of) {
  auto d = (*data.begin())->dimensions();
  auto dt = DataTypeOf((*data.begin())->element_type());
  if (d.size() != 4) return ffi::Error::InvalidArgument("fcn onednn batch norm: expected a rank-4 input");
  for (auto* a : data)
    if (dt == memory::data_type::undef || DataTypeOf(a->element_type()) != dt || a->dimensions().size() != 4 ||
        !std::equal(d.begin(), d.end(), a->dimensions().begin()))
      return ffi::Error::InvalidArgument(
          "fcn onednn batch norm: activations and their gradients must have one shape, all float32 or all bfloat16");
  std::lock_guard<std::mutex> lock(RunMutex());
  try {
    const BnEntry& e = GetBn(d[0], d[1], d[2], d[3], epsilon, dt);
    if (auto err = BnCheck(d, per_channel, workspace_bytes, e); err.failure()) return err;
    auto& eng = Engine();
    std::unordered_map<int, memory> args = args_of(e, eng);
    AddScratchpad(backward ? e.bwd_scratch : e.fwd_scratch, args);
    dnnl::stream& stream = Shared().stream;
    if (backward) {
      e.bwd.execute(stream, args);
    } else {
      e.fwd.execute(stream, args);
    }
    stream.wait();
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("fcn onednn batch norm: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error BnReluFwd(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift, Out y,
                     ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                     ffi::ResultBuffer<ffi::U8> workspace, float epsilon) {
  auto per_channel = {scale.dimensions(), shift.dimensions(), mean->dimensions(), var->dimensions()};
  return RunBn({&x, &*y}, epsilon, per_channel, workspace->size_bytes(), false,
               [&](const BnEntry& e, dnnl::engine& eng) {
                 return std::unordered_map<int, memory>{
                     {DNNL_ARG_SRC, memory(e.data, eng, x.untyped_data())},
                     {DNNL_ARG_DST, memory(e.data, eng, y->untyped_data())},
                     {DNNL_ARG_SCALE, memory(e.stat, eng, scale.untyped_data())},
                     {DNNL_ARG_SHIFT, memory(e.stat, eng, shift.untyped_data())},
                     {DNNL_ARG_MEAN, memory(e.stat, eng, mean->untyped_data())},
                     {DNNL_ARG_VARIANCE, memory(e.stat, eng, var->untyped_data())},
                     {DNNL_ARG_WORKSPACE, memory(e.workspace, eng, workspace->untyped_data())}};
               });
}

ffi::Error BnReluBwd(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                     ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::U8> workspace, Out dx,
                     ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dshift, float epsilon) {
  auto per_channel = {scale.dimensions(), mean.dimensions(), var.dimensions(), dscale->dimensions(),
                      dshift->dimensions()};
  return RunBn({&x, &dy, &*dx}, epsilon, per_channel, workspace.size_bytes(), true,
               [&](const BnEntry& e, dnnl::engine& eng) {
                 return std::unordered_map<int, memory>{
                     {DNNL_ARG_SRC, memory(e.data, eng, x.untyped_data())},
                     {DNNL_ARG_DIFF_DST, memory(e.data, eng, dy.untyped_data())},
                     {DNNL_ARG_SCALE, memory(e.stat, eng, scale.untyped_data())},
                     {DNNL_ARG_MEAN, memory(e.stat, eng, mean.untyped_data())},
                     {DNNL_ARG_VARIANCE, memory(e.stat, eng, var.untyped_data())},
                     {DNNL_ARG_WORKSPACE, memory(e.workspace, eng, workspace.untyped_data())},
                     {DNNL_ARG_DIFF_SRC, memory(e.data, eng, dx->untyped_data())},
                     {DNNL_ARG_DIFF_SCALE, memory(e.stat, eng, dscale->untyped_data())},
                     {DNNL_ARG_DIFF_SHIFT, memory(e.stat, eng, dshift->untyped_data())}};
               });
}

}  // namespace

std::pair<dnnl::primitive, dnnl::primitive> BnPrimitives(int64_t b, int64_t h, int64_t w, int64_t c, float epsilon,
                                                         memory::data_type dt) {
  const BnEntry& e = GetBn(b, h, w, c, epsilon, dt);
  return {e.fwd, e.bwd};
}

// The size in bytes of the workspace fcn_onednn_bn_relu_fwd returns for x [b, h, w, c] (bfloat16 when
// `bf16`); -1 on failure.
extern "C" int64_t FcnOnednnBnWorkspaceBytes(int64_t b, int64_t h, int64_t w, int64_t c, float epsilon, int bf16) {
  try {
    return static_cast<int64_t>(GetBn(b, h, w, c, epsilon, Dt(bf16)).workspace.get_size());
  } catch (const std::exception&) {
    return -1;
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnOnednnBnReluFwd, BnReluFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnOnednnBnReluBwd, BnReluBwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

}  // namespace fcn_onednn
