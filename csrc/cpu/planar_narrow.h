// Dense convolution with few output channels, vectorized over output pixels instead of output channels.
//
// The channels-last kernels put output channels in the vector lanes; at MSDNet's 6-channel layers that leaves
// 10 of 16 AVX-512 lanes (2 of 8 AVX2 ones) idle and costs a broadcast load per MAC row. Here each thread copies
// the input rows an output row reads into a planar, zero-padded buffer (one row of pixels per input channel, and
// for stride s one sub-row per column phase, so a tap's pixels are contiguous), and 16 output pixels of one
// channel share a vector: per (input channel, tap), one or two pixel vectors are loaded and each of the <= 8
// output channels adds weight x vector. The result is written back to the channels-last output through a small
// transposing epilogue (bias, activation).
#pragma once

#include <cstdint>

#include "../conv_shape.h"

namespace dynconv::cpu {

// Output channels per group this path takes (one accumulator set per channel).
constexpr int64_t kPlanarMaxCo = 8;

// True when forward_planar_narrow covers the shape on this CPU: float, AVX-512, one group, <= kPlanarMaxCo output
// channels, dilation 1, an input pixel stride xsW small enough for 32-bit gather indices.
bool planar_narrow_supported(const ConvShape& s, int64_t xsW);

// out(n, ho, wo, c) = sum over channels and taps, for every output pixel; x(n, h, w, c) = x[n*xsN + h*xsH +
// w*xsW + c] and out(n, ho, wo, c) = out[n*osN + ho*osH + wo*osW + c]. wk: the weights packed by
// pack_weight_panels(s, weight, Co) (one Co-wide panel), bias Co values or nullptr, act 0 none / 1 ReLU / 2 ReLU6
// (after the bias), prefetch: software prefetch of the next row's input rows and output lines (the fused path's
// switch). Only where planar_narrow_supported(s, xsW).
void forward_planar_narrow(const ConvShape& s, const float* x, int64_t xsN, int64_t xsH, int64_t xsW,
                           const float* wk, const float* bias, float* out, int64_t osN, int64_t osH, int64_t osW,
                           int act, bool prefetch);

}  // namespace dynconv::cpu
