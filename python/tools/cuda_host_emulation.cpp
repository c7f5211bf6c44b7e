// Host emulation of the CUDA kernels (csrc/cuda/masked_conv2d_kernels.cuh, conv2d_into_kernels.cuh,
// resize_into_kernels.cuh) for machines without a GPU: each
// block runs as 256 std::threads with a std::barrier for
// __syncthreads and static locals for __shared__ (one block at a time), warp votes and shuffles through
// the block barrier, atomics under a mutex. It checks index math, tiling and barrier placement; not the
// GPU memory model, warp scheduling or performance. Driven by cuda_host_emulation.py.
#include <torch/extension.h>
#include <barrier>
#include <mutex>
#include <thread>
#include <vector>
#include <climits>

struct Dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local Dim3 threadIdx, blockIdx, blockDim, gridDim;
static std::barrier<>* g_bar = nullptr;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
inline void __syncthreads() { g_bar->arrive_and_wait(); }
static unsigned g_ballot[1024];
static unsigned long long g_shfl[1024];
inline unsigned __ballot_sync(unsigned, bool pred) {
  g_ballot[threadIdx.x] = pred; __syncthreads();
  unsigned w = threadIdx.x / 32 * 32, b = 0;
  for (unsigned i = 0; i < 32; ++i) if (g_ballot[w + i]) b |= 1u << i;
  __syncthreads(); return b;
}
inline unsigned long long __shfl_sync(unsigned, unsigned long long v, int src) {
  g_shfl[threadIdx.x] = v; __syncthreads();
  unsigned long long r = g_shfl[threadIdx.x / 32 * 32 + src]; __syncthreads(); return r;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
static std::mutex g_atomic;
template <class T> T atomicAdd(T* p, T v) { std::lock_guard<std::mutex> l(g_atomic); T o = *p; *p = o + v; return o; }

#include "../../csrc/cuda/masked_conv2d_kernels.cuh"
#include "../../csrc/cuda/conv2d_into_kernels.cuh"
#include "../../csrc/cuda/resize_into_kernels.cuh"
#include "../../csrc/conv_shape.h"

using namespace dynconv::cuda;
template <class F> void launch(Dim3 grid, unsigned threads, F f) {
  for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> bar(threads); g_bar = &bar;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t) ts.emplace_back([&, t] {
      threadIdx = {t, 0, 0}; blockIdx = {bx, by, bz}; blockDim = {threads, 1, 1}; gridDim = grid; f(); });
    for (auto& th : ts) th.join();
  }
}
Geo geo(const dynconv::ConvShape& s) {
  Geo g; g.C=s.C; g.H=s.H; g.W=s.W; g.Co=s.Co; g.Cg=s.Cg; g.Cog=s.Cog; g.KH=s.KH; g.KW=s.KW; g.SH=s.SH; g.SW=s.SW;
  g.PH=s.PH; g.PW=s.PW; g.DH=s.DH; g.DW=s.DW; g.Ho=s.Ho; g.Wo=s.Wo; g.K=s.k_per_group(); g.Hm=s.Hm; g.Wm=s.Wm;
  g.block=s.block; g.N=s.N; g.P=s.out_pixels(); return g;
}
Strides4 st(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }
unsigned cdiv(int64_t a, int64_t b) { return unsigned((a + b - 1) / b); }

// Returns (out, rows, count); residual optional, inplace writes into residual.
std::vector<at::Tensor> forward(at::Tensor input, at::Tensor weight, c10::optional<at::Tensor> bias, at::Tensor mask,
                                std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                int64_t groups, int64_t block, c10::optional<at::Tensor> residual, int64_t act,
                                bool inplace, bool zero_inactive, bool use_count) {
  auto s = dynconv::make_conv_shape(input, weight, bias, mask, stride, padding, dilation, groups, block);
  Geo g = geo(s);
  auto mask_c = mask.contiguous();
  auto rows = at::empty({s.out_pixels()}, at::kLong);
  auto count = at::zeros({1}, at::kLong);
  launch({cdiv(g.P, kThreads)}, kThreads, [&] {
    compact_rows_kernel(mask_c.data_ptr<bool>(), g, rows.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>())); });
  const bool has_res = residual.has_value();
  auto fmt = input.suggest_memory_format();
  at::Tensor out = inplace ? *residual : at::empty({s.N, s.Co, s.Ho, s.Wo}, input.options().memory_format(fmt));
  Strides4 os = st(out), rs = has_res ? st(*residual) : Strides4{0,0,0,0};
  auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  int64_t cap = use_count ? s.out_pixels() : count.item<int64_t>();
  const int64_t* cp = use_count ? count.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? residual->data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    if (!inplace && (has_res || zero_inactive))
      launch({7}, kThreads, [&] { fill_inactive_kernel<scalar_t>(mask_c.data_ptr<bool>(), g, op, os, fmt == at::MemoryFormat::ChannelsLast, rp, rs); });
    if (cap == 0) return;
    if (s.Cg == 1) {
      auto w = weight.contiguous();
      launch({cdiv(cap * s.Co, kThreads)}, kThreads, [&] {
        forward_depthwise_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bp, rows.data_ptr<int64_t>(), cp, cap, g, op, os, rp, rs, act); });
    } else {
      auto w = weight.contiguous().view({s.G, s.Cog, s.Cg, s.KH, s.KW}).permute({0, 3, 4, 2, 1}).contiguous();
      launch({cdiv(cap, kBM), unsigned(s.G * cdiv(s.Cog, kBN))}, kThreads, [&] {
        forward_gemm_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bp, rows.data_ptr<int64_t>(), cp, cap, g, op, os, rp, rs, act); });
    }
  });
  return {out, rows, count};
}

std::vector<at::Tensor> backward(at::Tensor go_in, at::Tensor input, at::Tensor weight, at::Tensor mask,
                                 std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                 int64_t groups, int64_t block) {
  auto s = dynconv::make_conv_shape(input, weight, c10::nullopt, mask, stride, padding, dilation, groups, block);
  Geo g = geo(s);
  auto mask_c = mask.contiguous();
  auto rows = at::empty({s.out_pixels()}, at::kLong);
  auto count = at::zeros({1}, at::kLong);
  launch({cdiv(g.P, kThreads)}, kThreads, [&] {
    compact_rows_kernel(mask_c.data_ptr<bool>(), g, rows.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>())); });
  int64_t cap = s.out_pixels();
  const int64_t* cp = count.data_ptr<int64_t>();
  auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  auto go = go_in.contiguous(at::MemoryFormat::ChannelsLast);
  Strides4 gs = st(go);
  auto acc_type = at::toOpMathType(input.scalar_type());
  auto gi = at::zeros({s.N, s.H, s.W, s.C}, input.options().dtype(acc_type));
  auto gw = at::zeros({s.G, s.KH, s.KW, s.Cg, s.Cog}, input.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto wt = weight.contiguous().view({s.G, s.Cog, s.Cg, s.KH, s.KW}).permute({0, 1, 3, 4, 2}).contiguous();
    launch({cdiv(cap, kBM), unsigned(s.G * cdiv(s.k_per_group(), kBN))}, kThreads, [&] {
      grad_input_kernel<scalar_t>(go.data_ptr<scalar_t>(), gs, wt.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), cp, cap, g, gi.data_ptr<acc_t>()); });
    launch({cdiv(s.k_per_group(), kBM), unsigned(s.G * cdiv(s.Cog, kBN)), cdiv(cap, kWgradRowsPerBlock)}, kThreads, [&] {
      grad_weight_kernel<scalar_t>(x.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), gs, rows.data_ptr<int64_t>(), cp, cap, g, gw.data_ptr<acc_t>()); });
  });
  return {gi.permute({0, 3, 1, 2}).to(input.scalar_type()), gw.permute({0, 4, 3, 1, 2}).reshape({s.Co, s.Cg, s.KH, s.KW}).to(input.scalar_type())};
}

// conv2d_into_: as csrc/cuda/conv2d_into_cuda.cu's host code (input read in place when its channel stride is 1).
void conv2d_into(at::Tensor input, at::Tensor weight, c10::optional<at::Tensor> bias, at::Tensor out, int64_t offset,
                 std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                 int64_t groups, int64_t act) {
  auto s = dynconv::make_conv_shape_unmasked(input, weight, bias, stride, padding, dilation, groups, "conv2d_into");
  Geo g = geo(s);
  const bool in_place = input.stride(1) == 1 || input.size(1) <= 1;
  auto x = in_place ? input : input.contiguous(at::MemoryFormat::ChannelsLast);
  InStrides xs{x.stride(0), x.stride(2), x.stride(3)};
  auto slice = out.narrow(1, offset, s.Co);
  Strides4 os = st(slice);
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emu_into", [&] {
    scalar_t* op = slice.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    if (s.Cg == 1) {
      auto w = weight.contiguous();
      launch({cdiv(g.P * s.Co, kThreads)}, kThreads, [&] {
        dense_forward_depthwise_kernel<scalar_t>(x.data_ptr<scalar_t>(), xs, w.data_ptr<scalar_t>(), bp, g, op, os, act); });
    } else {
      auto w = weight.contiguous().view({s.G, s.Cog, s.Cg, s.KH, s.KW}).permute({0, 3, 4, 2, 1}).contiguous();
      launch({cdiv(g.P, kBM), unsigned(s.G * cdiv(s.Cog, kBN))}, kThreads, [&] {
        dense_forward_gemm_kernel<scalar_t>(x.data_ptr<scalar_t>(), xs, w.data_ptr<scalar_t>(), bp, g, op, os, act); });
    }
  });
}

// resize_into_: as csrc/cuda/resize_into_cuda.cu's host code, on `blocks` blocks of 64 threads (few, so that the
// grid-stride loop is exercised).
void resize_into(at::Tensor input, at::Tensor out, int64_t offset, int64_t blocks) {
  const int64_t C = input.size(1);
  auto slice = out.narrow(1, offset, C);
  ResizeGeo g;
  g.N = input.size(0); g.C = C; g.H = input.size(2); g.W = input.size(3); g.Ho = out.size(2); g.Wo = out.size(3);
  g.xn = input.stride(0); g.xc = input.stride(1); g.xh = input.stride(2); g.xw = input.stride(3);
  g.yn = slice.stride(0); g.yc = slice.stride(1); g.yh = slice.stride(2); g.yw = slice.stride(3);
  g.channels_inner = C > 1 && g.yc < g.yw;
  g.same = g.H == g.Ho && g.W == g.Wo;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emu_resize", [&] {
    launch({unsigned(blocks)}, 64, [&] { resize_into_kernel<scalar_t>(input.data_ptr<scalar_t>(), slice.data_ptr<scalar_t>(), g); });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("conv2d_into", &conv2d_into);
  m.def("resize_into", &resize_into);
}
