// 2D convolutions for XLA:CPU through oneDNN, as XLA FFI handlers (fcn/onednn.py builds and
// registers them). float32 or bfloat16 (one type for a call's activations and kernel), NHWC
// activations, HWIO kernels, any strides and non-negative padding, no dilation or groups: what
// fcn's U-Net needs. Batch norm's scale, shift and statistics, and the bias, are float32.
//
//   fcn_onednn_conv_fwd(x[B,H,W,C], w[KH,KW,C,K])      -> y[B,OH,OW,K]
//   fcn_onednn_conv_bwd_data(g[B,OH,OW,K], w)          -> dx[B,H,W,C]
//   fcn_onednn_conv_bwd_weights(x, g)                  -> dw[KH,KW,C,K]
//   fcn_onednn_conv_bias_relu(x, w, b[K])              -> max(conv(x, w) + b, 0)  (inference)
//   attributes: strides (sh, sw), padding (lo_h, hi_h, lo_w, hi_w)
//
// and batch normalization in training (batch statistics) followed by a ReLU:
//
//   fcn_onednn_bn_relu_fwd(x[B,H,W,C], scale[C], shift[C]) -> y, mean[C], var[C], workspace (the ReLU's mask)
//   fcn_onednn_bn_relu_bwd(x, dy, scale, mean, var, workspace) -> dx, dscale[C], dshift[C]
//   attribute: epsilon; FcnOnednnBnWorkspaceBytes(b, h, w, c, epsilon, bf16) gives the workspace's size.
//
// FcnOnednnImpls(bf16, buf, n) names the instruction set and the implementations oneDNN picks for
// one data type, and says whether they are fast (a probe for fcn.onednn.supports).
//
// Activations stay NHWC (no reorder); kernels are reordered to and from the layout the
// primitive picks (small). Calls run one at a time (RunMutex). Nothing is allocated per call:
// primitives and their kernel reorders are built once per shape, and one stream, scratchpad and
// kernel buffer serve every call (`Reused`).

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2, kFwdBiasRelu = 3 };

struct Geometry {
  int64_t b, h, w, c, kh, kw, k, oh, ow, sh, sw, pt, pb, pl, pr;
  memory::data_type dt = memory::data_type::f32;  // activations and kernel
  std::array<int64_t, 17> key(Kind kind) const {
    return {kind, b, h, w, c, kh, kw, k, oh, ow, sh, sw, pt, pb, pl, pr, static_cast<int64_t>(dt)};
  }
};

// The oneDNN data type of an XLA one fcn's handlers take (float32 or bfloat16), else undef.
memory::data_type DataTypeOf(ffi::DataType t) {
  if (t == ffi::DataType::F32) return memory::data_type::f32;
  if (t == ffi::DataType::BF16) return memory::data_type::bf16;
  return memory::data_type::undef;
}

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A primitive with the descriptors its caller needs: the user's kernel layout (HWIO) and the
// primitive's own, the size of its scratchpad, and the reorder of the kernel between the two
// layouts (into the primitive's, or out of it for kBwdWeights), built once with the primitive.
struct Entry {
  dnnl::primitive prim;
  memory::desc user_w, prim_w;
  size_t scratch = 0;
  dnnl::reorder reorder;  // empty when the layouts agree
};

Entry WithReorder(Kind kind, dnnl::primitive prim, const memory::desc& user_w, const memory::desc& prim_w,
                  size_t scratch) {
  Entry e{std::move(prim), user_w, prim_w, scratch, {}};
  if (prim_w != user_w) {
    auto& eng = Engine();
    bool out = kind == kBwdWeights;
    e.reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, out ? prim_w : user_w, eng, out ? user_w : prim_w));
  }
  return e;
}

Entry Build(Kind kind, const Geometry& g) {
  auto& eng = Engine();
  memory::dims src{g.b, g.c, g.h, g.w}, wei{g.k, g.c, g.kh, g.kw}, dst{g.b, g.k, g.oh, g.ow};
  memory::dims strides{g.sh, g.sw}, pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
  auto f32 = memory::data_type::f32;
  memory::desc src_md(src, g.dt, tag::nhwc), dst_md(dst, g.dt, tag::nhwc), any_w(wei, g.dt, tag::any);
  memory::desc user_w(wei, g.dt, tag::hwio);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto alg = dnnl::algorithm::convolution_direct;
  if (kind == kFwdBiasRelu) {  // the bias added and the ReLU applied as the output is written
    dnnl::post_ops ops;
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(ops);
    memory::desc bias_md({g.k}, f32, tag::a);
    dnnl::convolution_forward::primitive_desc pd(eng, dnnl::prop_kind::forward_inference, alg, src_md, any_w, bias_md,
                                                 dst_md, strides, pad_l, pad_r, attr);
    return WithReorder(kind, dnnl::convolution_forward(pd), user_w, pd.weights_desc(), pd.scratchpad_desc().get_size());
  }
  dnnl::convolution_forward::primitive_desc fwd(eng, dnnl::prop_kind::forward_training, alg, src_md, any_w, dst_md,
                                                strides, pad_l, pad_r, attr);
  if (kind == kFwd)
    return WithReorder(kind, dnnl::convolution_forward(fwd), user_w, fwd.weights_desc(), fwd.scratchpad_desc().get_size());
  if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(eng, alg, src_md, any_w, dst_md, strides, pad_l, pad_r, fwd,
                                                       attr);
    return WithReorder(kind, dnnl::convolution_backward_data(pd), user_w, pd.weights_desc(),
                       pd.scratchpad_desc().get_size());
  }
  dnnl::convolution_backward_weights::primitive_desc pd(eng, alg, src_md, any_w, dst_md, strides, pad_l, pad_r, fwd,
                                                        attr);
  return WithReorder(kind, dnnl::convolution_backward_weights(pd), user_w, pd.diff_weights_desc(),
                     pd.scratchpad_desc().get_size());
}

const Entry& Get(Kind kind, const Geometry& g) {
  static std::mutex mu;
  static std::map<std::array<int64_t, 17>, std::unique_ptr<Entry>> cache;
  auto key = g.key(kind);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return *it->second;
  }
  auto entry = std::make_unique<Entry>(Build(kind, g));  // outside the lock: can take milliseconds
  std::lock_guard<std::mutex> lock(mu);
  auto [it, inserted] = cache.emplace(key, std::move(entry));
  return *it->second;
}

ffi::Error MakeGeometry(const ffi::AnyBuffer& xb, const ffi::AnyBuffer& wb, const ffi::AnyBuffer& yb,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, Geometry& g) {
  auto x = xb.dimensions(), w = wb.dimensions(), y = yb.dimensions();
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || strides.size() != 2 || padding.size() != 4)
    return ffi::Error::InvalidArgument("fcn onednn conv: expected rank-4 operands, 2 strides and 4 pads");
  auto dt = DataTypeOf(xb.element_type());
  if (dt == memory::data_type::undef || DataTypeOf(wb.element_type()) != dt || DataTypeOf(yb.element_type()) != dt)
    return ffi::Error::InvalidArgument("fcn onednn conv: operands must all be float32 or all bfloat16");
  g = Geometry{x[0],       x[1],       x[2],       x[3],       w[0],       w[1],       w[3],       y[1],
               y[2],       strides[0], strides[1], padding[0], padding[1], padding[2], padding[3], dt};
  bool ok = w[2] == g.c && y[0] == g.b && y[3] == g.k && g.sh > 0 && g.sw > 0 && g.pt >= 0 && g.pb >= 0 &&
            g.pl >= 0 && g.pr >= 0 && g.oh == (g.h + g.pt + g.pb - g.kh) / g.sh + 1 &&
            g.ow == (g.w + g.pl + g.pr - g.kw) / g.sw + 1;
  if (!ok) return ffi::Error::InvalidArgument("fcn onednn conv: inconsistent shapes, strides or padding");
  return ffi::Error::Success();
}

// Runs the primitive for `kind`; `w` is the kernel in HWIO (an input, or the output for kBwdWeights).
// One call at a time: each already uses every core (OpenMP), and XLA starts independent
// operations side by side, which would oversubscribe the cores.
std::mutex& RunMutex() {
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

Reused& Shared() {
  static Reused reused;
  return reused;
}

// The user-mode scratchpad of `bytes` (from Shared()) in `args`.
void AddScratchpad(size_t bytes, std::unordered_map<int, memory>& args) {
  if (bytes > 0) {
    memory::desc md({static_cast<memory::dim>(bytes)}, memory::data_type::u8, tag::a);
    args.insert({DNNL_ARG_SCRATCHPAD, memory(md, Engine(), Shared().scratch.Get(bytes))});
  }
}

ffi::Error Run(Kind kind, const Geometry& g, void* src, void* w, void* dst, void* bias = nullptr) {
  std::lock_guard<std::mutex> lock(RunMutex());
  try {
    const Entry& e = Get(kind, g);
    auto& eng = Engine();
    dnnl::stream& stream = Shared().stream;
    memory user_w(e.user_w, eng, w);
    memory prim_w = user_w;
    if (e.prim_w != e.user_w) {
      prim_w = memory(e.prim_w, eng, Shared().kernel.Get(e.prim_w.get_size()));
      if (kind != kBwdWeights) e.reorder.execute(stream, user_w, prim_w);
    }
    memory::dims src_dims{g.b, g.c, g.h, g.w}, dst_dims{g.b, g.k, g.oh, g.ow};
    auto f32 = memory::data_type::f32;
    memory src_m({src_dims, g.dt, tag::nhwc}, eng, src), dst_m({dst_dims, g.dt, tag::nhwc}, eng, dst);
    std::unordered_map<int, memory> args;
    AddScratchpad(e.scratch, args);
    if (kind == kFwd || kind == kFwdBiasRelu) {
      args.insert({{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, prim_w}, {DNNL_ARG_DST, dst_m}});
      if (kind == kFwdBiasRelu) args.insert({DNNL_ARG_BIAS, memory({{g.k}, f32, tag::a}, eng, bias)});
    } else if (kind == kBwdData) {
      args.insert({{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, prim_w}, {DNNL_ARG_DIFF_DST, dst_m}});
    } else {
      args.insert({{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, prim_w}, {DNNL_ARG_DIFF_DST, dst_m}});
    }
    e.prim.execute(stream, args);
    if (kind == kBwdWeights && e.prim_w != e.user_w) e.reorder.execute(stream, prim_w, user_w);
    stream.wait();
  } catch (const std::exception& err) {  // dnnl::error among them
    return ffi::Error::Internal(std::string("fcn onednn conv: ") + err.what());
  }
  return ffi::Error::Success();
}

using Out = ffi::Result<ffi::AnyBuffer>;

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer w, Out y, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto err = MakeGeometry(x, w, *y, strides, padding, g); err.failure()) return err;
  return Run(kFwd, g, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error BwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, Out dx, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto err = MakeGeometry(*dx, w, dy, strides, padding, g); err.failure()) return err;
  return Run(kBwdData, g, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error BwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, Out dw, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto err = MakeGeometry(x, *dw, dy, strides, padding, g); err.failure()) return err;
  return Run(kBwdWeights, g, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

ffi::Error FwdBiasRelu(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b, Out y,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  Geometry g;
  if (auto err = MakeGeometry(x, w, *y, strides, padding, g); err.failure()) return err;
  if (b.dimensions().size() != 1 || b.dimensions()[0] != g.k)
    return ffi::Error::InvalidArgument("fcn onednn conv: the bias must have one value per output channel");
  return Run(kFwdBiasRelu, g, x.untyped_data(), w.untyped_data(), y->untyped_data(), b.untyped_data());
}

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

memory::data_type Dt(int bf16) { return bf16 ? memory::data_type::bf16 : memory::data_type::f32; }

// The size in bytes of the workspace fcn_onednn_bn_relu_fwd returns for x [b, h, w, c] (bfloat16 when
// `bf16`); -1 on failure.
extern "C" int64_t FcnOnednnBnWorkspaceBytes(int64_t b, int64_t h, int64_t w, int64_t c, float epsilon, int bf16) {
  try {
    return static_cast<int64_t>(GetBn(b, h, w, c, epsilon, Dt(bf16)).workspace.get_size());
  } catch (const std::exception&) {
    return -1;
  }
}

// The instruction set oneDNN uses, then the implementations it picks for a 3x3 convolution
// (forward, input and weight gradient) and for batch norm + ReLU (forward, backward) on
// 8 x 32 x 32 x 32 in float32 or, with `bf16`, bfloat16, written to buf (n bytes, NUL-terminated)
// as "isa:NAME fwd:NAME bwd_data:NAME ...". Returns 1 when none of them is oneDNN's reference code
// (a plain loop, far slower than XLA's own) and, for bfloat16, the CPU has bfloat16 instructions
// (AVX-512 BF16 or AMX: without them oneDNN converts as it goes, and camvid_cpu's training step ran
// 3x slower than in float32); 0 otherwise; -1 when a primitive cannot be made.
extern "C" int FcnOnednnImpls(int bf16, char* buf, int64_t n) {
  try {
    Geometry g{8, 32, 32, 32, 3, 3, 32, 32, 32, 1, 1, 1, 1, 1, 1, Dt(bf16)};
    using isa = dnnl::cpu_isa;
    static const std::map<isa, std::pair<const char*, bool>> kIsas{  // name, has bfloat16 instructions
        {isa::sse41, {"sse41", false}},
        {isa::avx, {"avx", false}},
        {isa::avx2, {"avx2", false}},
        {isa::avx2_vnni, {"avx2_vnni", false}},
        {isa::avx2_vnni_2, {"avx2_vnni_2", false}},
        {isa::avx512_core, {"avx512_core", false}},
        {isa::avx512_core_vnni, {"avx512_core_vnni", false}},
        {isa::avx512_core_bf16, {"avx512_core_bf16", true}},
        {isa::avx512_core_fp16, {"avx512_core_fp16", true}},
        {isa::avx512_core_amx, {"avx512_core_amx", true}},
        {isa::avx512_core_amx_fp16, {"avx512_core_amx_fp16", true}}};
    auto found = kIsas.find(dnnl::get_effective_cpu_isa());
    bool known = found != kIsas.end();
    std::string names = std::string("isa:") + (known ? found->second.first : "other");
    bool fast = !bf16 || (known && found->second.second);
    auto add = [&](const char* what, const dnnl::primitive& p) {
      const char* info = nullptr;
      dnnl_primitive_desc_query(p.get_primitive_desc(), dnnl_query_impl_info_str, 0, &info);
      std::string impl = info ? info : "?";
      names += std::string(" ") + what + ":" + impl;
      fast = fast && impl.rfind("ref", 0) != 0;
    };
    add("fwd", Get(kFwd, g).prim);
    add("bwd_data", Get(kBwdData, g).prim);
    add("bwd_weights", Get(kBwdWeights, g).prim);
    const BnEntry& bn = GetBn(8, 32, 32, 32, 1e-5f, Dt(bf16));
    add("bn_fwd", bn.fwd);
    add("bn_bwd", bn.bwd);
    if (n > 0) std::snprintf(buf, static_cast<size_t>(n), "%s", names.c_str());
    return fast ? 1 : 0;
  } catch (const std::exception& err) {
    if (n > 0) std::snprintf(buf, static_cast<size_t>(n), "%s", err.what());
    return -1;
  }
}

// The first three take two operands (float32, or bfloat16) and return one, with the same attributes.
static auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnOnednnConvFwd, Fwd, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnOnednnConvBwdData, BwdData, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnOnednnConvBwdWeights, BwdWeights, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnOnednnConvBiasRelu, FwdBiasRelu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding"));
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
