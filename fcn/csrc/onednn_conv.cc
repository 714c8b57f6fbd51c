// 2D convolutions for XLA:CPU through oneDNN, as XLA FFI handlers (fcn/onednn.py builds and
// registers them with onednn_bn.cc's batch norm, as one library). float32 or bfloat16 (one type for
// a call's activations and kernel), NHWC activations, HWIO kernels, any strides and non-negative
// padding, no dilation or groups: what fcn's U-Net needs. The bias is float32.
//
//   fcn_onednn_conv_fwd(x[B,H,W,C], w[KH,KW,C,K])      -> y[B,OH,OW,K]
//   fcn_onednn_conv_bwd_data(g[B,OH,OW,K], w)          -> dx[B,H,W,C]
//   fcn_onednn_conv_bwd_weights(x, g)                  -> dw[KH,KW,C,K]
//   fcn_onednn_conv_bias_relu(x, w, b[K])              -> max(conv(x, w) + b, 0)  (inference)
//   attributes: strides (sh, sw), padding (lo_h, hi_h, lo_w, hi_w)
//
// FcnOnednnImpls(bf16, buf, n) names the instruction set and the implementations oneDNN picks for
// one data type, convolutions and batch norm, and says whether they are fast (a probe for
// fcn.onednn.supports).
//
// Activations stay NHWC (no reorder); kernels are reordered to and from the layout the
// primitive picks (small), into the shared kernel buffer (onednn_common.h).

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

#include "onednn_common.h"

namespace fcn_onednn {
namespace {

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2, kFwdBiasRelu = 3 };

struct Geometry {
  int64_t b, h, w, c, kh, kw, k, oh, ow, sh, sw, pt, pb, pl, pr;
  memory::data_type dt = memory::data_type::f32;  // activations and kernel
  std::array<int64_t, 17> key(Kind kind) const {
    return {kind, b, h, w, c, kh, kw, k, oh, ow, sh, sw, pt, pb, pl, pr, static_cast<int64_t>(dt)};
  }
};

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

// Whether kernel tap i of one spatial dimension (n pixels, stride s, padding lo before, o outputs)
// meets only padding (its weight gradient is zero), as at a 1-pixel-wide level under a 3x3 conv.
bool OnPaddingOnly(int64_t i, int64_t n, int64_t s, int64_t lo, int64_t o) {
  int64_t first = std::max<int64_t>(0, (lo - i + s - 1) / s);  // the first output at or past pixel 0
  return first >= o || first * s - lo + i > n - 1;
}

// Zeroes the taps of the HWIO weight gradient `w` that meet only padding. oneDNN 3's bfloat16 weight
// gradient on AMX (brgconv_bwd_w) leaves garbage there (stale values of earlier calls, or 1e27).
void ZeroTapsOnPaddingOnly(const Geometry& g, void* w) {
  size_t tap = static_cast<size_t>(g.c * g.k) * (g.dt == memory::data_type::bf16 ? 2 : 4);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      if (OnPaddingOnly(i, g.h, g.sh, g.pt, g.oh) || OnPaddingOnly(j, g.w, g.sw, g.pl, g.ow))
        std::memset(static_cast<char*>(w) + (i * g.kw + j) * tap, 0, tap);
}

// Runs the primitive for `kind`; `w` is the kernel in HWIO (an input, or the output for kBwdWeights).
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
    if (kind == kBwdWeights) ZeroTapsOnPaddingOnly(g, w);
  } catch (const std::exception& err) {  // dnnl::error among them
    return ffi::Error::Internal(std::string("fcn onednn conv: ") + err.what());
  }
  return ffi::Error::Success();
}

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

}  // namespace

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
    auto [bn_fwd, bn_bwd] = BnPrimitives(8, 32, 32, 32, 1e-5f, Dt(bf16));
    add("bn_fwd", bn_fwd);
    add("bn_bwd", bn_bwd);
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

}  // namespace fcn_onednn
