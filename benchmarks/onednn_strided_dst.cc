// Can a oneDNN convolution write into a channel slice of a wider NHWC buffer (the way
// torch.compile's Inductor writes a conv's output straight into a concatenation's buffer)?
// Not a test: a check behind docs/benchmarks.md, the twenty-third session. Build and run with the
// oneDNN of the pip packages fcn uses (onednn-cpu-gomp, onednn-devel-cpu-gomp):
//
//   P=.venv; g++ -O2 -std=c++17 -I $P/include benchmarks/onednn_strided_dst.cc -L $P/lib -ldnnl \
//       -Wl,-rpath,$P/lib -o /tmp/strided && OMP_NUM_THREADS=2 /tmp/strided
//
// It times a 3x3 convolution (4 x 256 x 256, 32 -> 32 channels, bias and ReLU: the default U-Net's
// decoder at full resolution) whose output is a dense NHWC array, then the channels 32..63 of a
// 64-channel one (channel stride 1, pixel stride 64): which implementation oneDNN picks for each.
#include <chrono>
#include <cstdio>
#include <vector>
#include "oneapi/dnnl/dnnl.hpp"
using namespace dnnl;
using tag = memory::format_tag;
int main() {
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  int64_t B = 4, H = 256, W = 256, C = 32, K = 32;
  auto f32 = memory::data_type::f32;
  memory::dims src{B, C, H, W}, wei{K, C, 3, 3}, dst{B, K, H, W};
  memory::desc src_md(src, f32, tag::nhwc), w_md(wei, f32, tag::any), bias_md({K}, f32, tag::a);
  memory::desc dense(dst, f32, tag::nhwc);
  // dst inside a [B,H,W,2K] buffer: channel stride 1, w stride 2K, h stride W*2K, b stride H*W*2K
  memory::desc strided(dst, f32, memory::dims{H * W * 2 * K, 1, W * 2 * K, 2 * K});
  std::vector<float> xs(B * H * W * C, 0.5f), big(B * H * W * 2 * K, 0.f), ws(K * C * 9, 0.01f), bs(K, 0.1f);
  for (int variant = 0; variant < 2; ++variant) {
    auto& dmd = variant ? strided : dense;
    post_ops ops;
    ops.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
    primitive_attr attr;
    attr.set_post_ops(ops);
    convolution_forward::primitive_desc pd(eng, prop_kind::forward_inference, algorithm::convolution_direct, src_md,
                                           w_md, bias_md, dmd, {1, 1}, {1, 1}, {1, 1}, attr);
    printf("%s impl %s\n", variant ? "strided" : "dense", pd.impl_info_str());
    memory wm(pd.weights_desc(), eng), xm(src_md, eng, xs.data()), bm(bias_md, eng, bs.data());
    memory dm(dmd, eng, variant ? big.data() + K : big.data());
    convolution_forward conv(pd);
    double best = 1e9;
    for (int i = 0; i < 12; ++i) {
      auto t = std::chrono::steady_clock::now();
      conv.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_BIAS, bm}, {DNNL_ARG_DST, dm}});
      s.wait();
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
      if ((i > 1 || ms > 1000) && ms < best) best = ms;
      if (ms > 1000) break;  // the reference implementation: one run tells
    }
    printf("  best %.2f ms\n", best);
  }
}
