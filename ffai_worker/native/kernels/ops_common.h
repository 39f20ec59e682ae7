// What the MLX primitives of ffai_worker.native._quant share (quant_ops.cpp, decode_ops.cpp):
// copying inputs to row-major order, and the base class of CPU-only inference primitives.
#pragma once

#include <nanobind/nanobind.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

#include "quant_gemm.h"  // ffai_silu_mul

namespace ffai {

namespace nb = nanobind;
namespace mx = mlx::core;

// Copies `a` (any strides, offset, broadcast) into `dst` in row-major order.
inline void gather_row_major(const mx::array& a, char* dst) {
  const size_t item = a.itemsize();
  const char* src = a.data<char>();
  const int nd = static_cast<int>(a.ndim());
  if (nd == 0 || a.size() == 0) {
    std::memcpy(dst, src, a.size() * item);
    return;
  }
  const auto& shape = a.shape();
  const auto& strides = a.strides();
  const int64_t inner = shape[nd - 1];
  const int64_t inner_stride = strides[nd - 1];
  const size_t rows = a.size() / static_cast<size_t>(inner);
  std::vector<int64_t> idx(nd, 0);
  int64_t off = 0;  // element offset of the current row's first element
  for (size_t r = 0; r < rows; ++r) {
    if (inner_stride == 1) {
      std::memcpy(dst, src + off * item, inner * item);
    } else {
      for (int64_t i = 0; i < inner; ++i) {
        std::memcpy(dst + i * item, src + (off + i * inner_stride) * item, item);
      }
    }
    dst += inner * item;
    for (int d = nd - 2; d >= 0; --d) {  // odometer over the outer dims
      if (++idx[d] < shape[d]) {
        off += strides[d];
        break;
      }
      off -= strides[d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
}

// A pointer to row-contiguous data: the array itself, or a packed copy held by `copy`.
inline const void* row_major_ptr(const mx::array& a, std::vector<char>& copy) {
  if (a.flags().row_contiguous) {
    return a.data<void>();
  }
  copy.resize(a.size() * a.itemsize());
  gather_row_major(a, copy.data());
  return copy.data();
}

// A product's input given as the gate/up columns of a fused projection (gate < 0: off):
// its rows are silu(x[r, gate:gate + width]) * x[r, up:up + width], computed here (the
// SiLU gate as its own node does it, act_kernels.h) so the gate is not a graph node.
struct GateColumns {
  int gate = -1, up = -1;
  bool on() const { return gate >= 0; }
  bool operator==(const GateColumns&) const = default;
};

// silu(x[r, gate:gate + width]) * x[r, up:up + width] for each row r of x (rows, cols),
// into out (rows, width).
inline void silu_mul_rows(const float* x, size_t rows, size_t cols, GateColumns g, size_t width,
                          float* out) {
  for (size_t r = 0; r < rows; ++r) {
    ffai_silu_mul(x + r * cols + g.gate, x + r * cols + g.up, out + r * width, width);
  }
}

// The product's input rows: `x`'s own (cols == width) or the gated ones, held by `gated`.
inline const float* gated_rows(const float* x, size_t rows, size_t cols, GateColumns g,
                               size_t width, std::vector<float>& gated) {
  if (!g.on()) return x;
  gated.resize(rows * width);
  silu_mul_rows(x, rows, cols, g, width, gated.data());
  return gated.data();
}

// is_equivalent as every primitive here defines it: the same class with equal `params()`
// (mx.compile merges equivalent nodes). A primitive derives from SameParams<itself> (over
// CpuInferencePrimitive, or another base) and returns std::tie of its fields, or {}.
template <class Derived, class Base>
class SameParams : public Base {
 public:
  using Base::Base;
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Derived*>(&other);
    return o != nullptr && o->params() == static_cast<const Derived*>(this)->params();
  }
};

// Checks gate columns against the input's last axis; throws ValueError naming `op`.
inline void check_gate(const char* op, GateColumns g, int cols, int width) {
  if (!g.on()) return;
  if (g.up < 0 || g.gate + width > cols || g.up + width > cols) {
    throw std::invalid_argument(std::string(op) + ": gate " + std::to_string(g.gate) + " and up " +
                                std::to_string(g.up) + " of width " + std::to_string(width) +
                                " must lie within the input's " + std::to_string(cols) +
                                " columns");
  }
}

// What every primitive here shares: CPU only, inference only; the output has the shape
// of the first input unless a primitive says otherwise.
class CpuInferencePrimitive : public mx::UnaryPrimitive {
 public:
  explicit CpuInferencePrimitive(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string("[ffai ") + name() +
                             "] has no GPU implementation; run it on a CPU stream (stream=mx.cpu).");
  }

  std::vector<mx::array> jvp(const std::vector<mx::array>&, const std::vector<mx::array>&,
                             const std::vector<int>&) override {
    throw std::runtime_error(std::string("[ffai ") + name() + "] is inference-only: no jvp.");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>&,
                             const std::vector<int>&, const std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("[ffai ") + name() + "] is inference-only: no vjp.");
  }

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>&,
                                                            const std::vector<int>&) override {
    throw std::runtime_error(std::string("[ffai ") + name() + "] has no vmap.");
  }

 protected:
  // Allocates `out` and registers every input and the output with this stream's encoder.
  mx::cpu::CommandEncoder& start(const std::vector<mx::array>& inputs, mx::array& out) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& in : inputs) {
      encoder.set_input_array(in);
    }
    encoder.set_output_array(out);
    return encoder;
  }
};

inline std::string shape_str(const mx::array& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i) {
    s += (i ? ", " : "") + std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

inline mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op) {
  auto stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::DeviceType::cpu) {
    throw std::invalid_argument(std::string(op) + ": runs on the CPU only; pass stream=mx.cpu");
  }
  return stream;
}

// Binds decode_ops.cpp's primitives on quant_ops.cpp's module.
void register_decode_ops(nb::module_& m);

}  // namespace ffai
