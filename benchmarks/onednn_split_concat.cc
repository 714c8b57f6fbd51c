// The decoder's first convolution without its concatenation, on the CPU: is conv(concat(up, skip))
// slower than conv(up) + conv(skip) with oneDNN's sum post-op accumulating into one output?
// Not a test: a check behind docs/benchmarks.md, the twenty-fourth session. Build and run with the
// oneDNN of the pip packages fcn uses (onednn-cpu-gomp, onednn-devel-cpu-gomp):
//
//   P=$PWD/.venv; g++ -O2 -fopenmp -std=c++17 -I $P/include benchmarks/onednn_split_concat.cc -L $P/lib -ldnnl \
//       -Wl,-rpath,$P/lib -o /tmp/split && for a in "4 256 256 32" "8 176 240 16"; do OMP_NUM_THREADS=2 /tmp/split $a; done
//
// Arguments: batch, height, width, channels of each input (the output has as many). Forward
// inference with ReLU; the concatenation is a plain copy loop. Medians of 37 interleaved rounds.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>
#include <algorithm>
#include "oneapi/dnnl/dnnl.hpp"
using namespace dnnl;
using tag = memory::format_tag;
static double now_ms() { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
int main(int argc, char** argv) {
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  int64_t B = atoi(argv[1]), H = atoi(argv[2]), W = atoi(argv[3]), C = atoi(argv[4]);  // each input C channels, output C
  int64_t K = C;
  auto f32 = memory::data_type::f32;
  int64_t P = B * H * W;
  std::vector<float> up(P * C, 0.5f), skip(P * C, 0.25f), cat(P * 2 * C), out(P * K), ws(K * 2 * C * 9, 0.01f), bs(K, 0.1f);
  auto make = [&](int64_t cin, bool sum) {
    memory::desc src_md({B, cin, H, W}, f32, tag::nhwc), w_md({K, cin, 3, 3}, f32, tag::any), b_md({K}, f32, tag::a),
        d_md({B, K, H, W}, f32, tag::nhwc);
    post_ops ops;
    if (sum) ops.append_sum(1.f);
    ops.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
    primitive_attr attr;
    attr.set_post_ops(ops);
    auto pd = convolution_forward::primitive_desc(eng, prop_kind::forward_inference, algorithm::convolution_direct, src_md,
                                                  w_md, b_md, d_md, {1, 1}, {1, 1}, {1, 1}, attr);
    return pd;
  };
  auto pd64 = make(2 * C, false);
  memory::desc src_md1({B, C, H, W}, f32, tag::nhwc), b_md({K}, f32, tag::a), d_md({B, K, H, W}, f32, tag::nhwc);
  auto pdA = convolution_forward::primitive_desc(eng, prop_kind::forward_inference, algorithm::convolution_direct, src_md1,
                                                 memory::desc({K, C, 3, 3}, f32, tag::any), d_md, {1, 1}, {1, 1}, {1, 1});
  auto pdB = make(C, true);
  printf("one: %s  split: %s + %s\n", pd64.impl_info_str(), pdA.impl_info_str(), pdB.impl_info_str());
  memory w64(pd64.weights_desc(), eng), wA(pdA.weights_desc(), eng), wB(pdB.weights_desc(), eng);
  memory catm(pd64.src_desc(), eng, cat.data()), upm(src_md1, eng, up.data()), skm(src_md1, eng, skip.data()),
      bm(b_md, eng, bs.data()), om(d_md, eng, out.data());
  convolution_forward c64(pd64), cA(pdA), cB(pdB);
  std::vector<double> t1, t2, tc;
  for (int r = 0; r < 40; ++r) {
    double t = now_ms();
    float* cp = cat.data();
    #pragma omp parallel for
    for (int64_t p = 0; p < P; ++p) {
      memcpy(cp + p * 2 * C, up.data() + p * C, C * 4);
      memcpy(cp + p * 2 * C + C, skip.data() + p * C, C * 4);
    }
    double tcat = now_ms();
    c64.execute(s, {{DNNL_ARG_SRC, catm}, {DNNL_ARG_WEIGHTS, w64}, {DNNL_ARG_BIAS, bm}, {DNNL_ARG_DST, om}});
    s.wait();
    double t_one = now_ms();
    cA.execute(s, {{DNNL_ARG_SRC, upm}, {DNNL_ARG_WEIGHTS, wA}, {DNNL_ARG_DST, om}});
    cB.execute(s, {{DNNL_ARG_SRC, skm}, {DNNL_ARG_WEIGHTS, wB}, {DNNL_ARG_BIAS, bm}, {DNNL_ARG_DST, om}});
    s.wait();
    double t_split = now_ms();
    if (r >= 3) { tc.push_back(tcat - t); t1.push_back(t_one - t); t2.push_back(t_split - t_one); }
  }
  auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
  printf("B%ld %ldx%ld C%ld: concat %.2f ms, concat+conv %.2f ms, split conv+conv(sum) %.2f ms, ratio %.3f\n", B, H, W, C,
         med(tc), med(t1), med(t2), med(t1) / med(t2));
}
