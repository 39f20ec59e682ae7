// An MLX primitive that runs our weight-only quantized matmul (quant_gemm.h) on the CPU,
// and the elementwise ones (SiLU gate, softmax, RMSNorm: act_kernels.h).
//
// MLX's own CPU quantized_matmul is a scalar loop; this primitive puts our kernel in the
// graph instead, so it works inside mx.compile like any MLX op. Python module:
// ffai_worker.native._quant (built by setup.py with NB_DOMAIN=mlx so that mx.array
// objects pass both ways; see setup.py). The decode-step primitives are in
// decode_ops.cpp, bound on this module by register_decode_ops.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "mlx/version.h"

#include "ops_common.h"
#include "quant_gemm.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

using namespace ffai;

// How often the kernel returned -1 and the scalar loop below ran instead.
std::atomic<long> g_fallbacks{0};

// Tests set this to run the scalar loop without a kernel that declines anything.
std::atomic<bool> g_force_fallback{false};

float half_bits_to_float(uint16_t h) {
  mx::float16_t v;
  std::memcpy(&v, &h, sizeof h);
  return static_cast<float>(v);
}

// Where row n's item i sits in a (rows, count) array, or in the packed (rows/16, count,
// 16) layout (quant_gemm.h).
size_t item_index(bool packed, int n, size_t i, size_t count) {
  if (!packed) return static_cast<size_t>(n) * count + i;
  return (static_cast<size_t>(n / 16) * count + i) * 16 + n % 16;
}

// The contract's reference semantics, for arguments the kernel declines (returns -1).
void scalar_quant_matmul(const float* x, const uint32_t* w, const void* scales,
                         const void* biases, float* out, int M, int N, int K, int bits,
                         int group_size, bool f16, bool packed) {
  const int per_word = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const size_t words = static_cast<size_t>(K) * bits / 32;
  const size_t groups = K / group_size;
  auto param = [&](const void* p, size_t i) {
    return f16 ? half_bits_to_float(static_cast<const uint16_t*>(p)[i])
               : static_cast<const float*>(p)[i];
  };
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) {
        const size_t pi = item_index(packed, n, k / group_size, groups);
        const uint32_t word = w[item_index(packed, n, k / per_word, words)];
        const uint32_t q = (word >> (bits * (k % per_word))) & mask;
        acc += x[static_cast<size_t>(m) * K + k] *
            (param(scales, pi) * static_cast<float>(q) + param(biases, pi));
      }
      out[static_cast<size_t>(m) * N + n] = acc;
    }
  }
}

class QuantMatmul : public SameParams<QuantMatmul, CpuInferencePrimitive> {
 public:
  // packed_n > 0: the weights are in the packed layout and the output has packed_n columns.
  // K: the weights' input width; with gate columns the input is the fused gate/up product.
  QuantMatmul(mx::Stream stream, int bits, int group_size, bool scales_f16, int packed_n, int K,
              GateColumns gate)
      : SameParams(stream),
        bits_(bits),
        group_size_(group_size),
        scales_f16_(scales_f16),
        packed_n_(packed_n),
        K_(K),
        gate_(gate) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "FfaiQuantMatmul"; }

  auto params() const { return std::tie(bits_, group_size_, scales_f16_, packed_n_, K_, gate_); }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = packed_n_ > 0 ? packed_n_ : inputs[1].shape(0);
    return {shape};
  }

 private:
  int bits_;
  int group_size_;
  bool scales_f16_;
  int packed_n_;
  int K_;
  GateColumns gate_;
};

void QuantMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = start(inputs, out);
  const int K = K_, cols = inputs[0].shape(-1);
  const int M = cols > 0 ? static_cast<int>(inputs[0].size() / cols) : 0;
  const int N = packed_n_ > 0 ? packed_n_ : inputs[1].shape(0);
  // Weak copies: the eval loop keeps the buffers alive until this task has run
  // (mlx/backend/cpu/eval.cpp), as MLX's own CPU ops rely on.
  const bool has_bias = inputs.size() > 4;
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                    w = mx::array::unsafe_weak_copy(inputs[1]),
                    s = mx::array::unsafe_weak_copy(inputs[2]),
                    b = mx::array::unsafe_weak_copy(inputs[3]),
                    bias = mx::array::unsafe_weak_copy(inputs[has_bias ? 4 : 3]),
                    o = mx::array::unsafe_weak_copy(out), M, N, K, cols, bits = bits_,
                    gs = group_size_, f16 = scales_f16_, packed = packed_n_ > 0,
                    has_bias, gate = gate_]() mutable {
    if (M == 0 || N == 0) {
      return;
    }
    std::vector<char> cx, cw, cs, cb;  // packed copies of non-contiguous inputs
    std::vector<float> gated;
    auto* xp =
        gated_rows(static_cast<const float*>(row_major_ptr(x, cx)), M, cols, gate, K, gated);
    auto* wp = static_cast<const uint32_t*>(row_major_ptr(w, cw));
    const void* sp = row_major_ptr(s, cs);
    const void* bp = row_major_ptr(b, cb);
    float* op = o.data<float>();
    auto kernel = packed ? ffai_quant_matmul_packed : ffai_quant_matmul;
    if (g_force_fallback.load(std::memory_order_relaxed) ||
        kernel(xp, wp, sp, bp, op, M, N, K, bits, gs, f16 ? 1 : 0) != 0) {
      g_fallbacks.fetch_add(1, std::memory_order_relaxed);
      scalar_quant_matmul(xp, wp, sp, bp, op, M, N, K, bits, gs, f16, packed);
    }
    if (has_bias) {  // the same float add as `y + bias` after the product
      std::vector<char> cbias;
      auto* add = static_cast<const float*>(row_major_ptr(bias, cbias));
      for (int m = 0; m < M; ++m) {
        for (int n = 0; n < N; ++n) op[static_cast<size_t>(m) * N + n] += add[n];
      }
    }
  });
}

// silu(g) * u elementwise (act_kernels.h); inputs of one shape, float32.
class SiluMul : public SameParams<SiluMul, CpuInferencePrimitive> {
 public:
  using SameParams::SameParams;
  const char* name() const override { return "FfaiSiluMul"; }
  auto params() const { return std::tuple<>(); }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = start(inputs, out);
    encoder.dispatch([g = mx::array::unsafe_weak_copy(inputs[0]),
                      u = mx::array::unsafe_weak_copy(inputs[1]),
                      o = mx::array::unsafe_weak_copy(out)]() mutable {
      std::vector<char> cg, cu;
      ffai_silu_mul(static_cast<const float*>(row_major_ptr(g, cg)),
                    static_cast<const float*>(row_major_ptr(u, cu)), o.data<float>(), o.size());
    });
  }
};

// Softmax over the last axis (act_kernels.h), optionally with the causal mask of a
// (..., L, T) score block: query i sees keys 0..T-L+i.
class RowSoftmax : public SameParams<RowSoftmax, CpuInferencePrimitive> {
 public:
  RowSoftmax(mx::Stream stream, bool causal) : SameParams(stream), causal_(causal) {}
  const char* name() const override { return "FfaiRowSoftmax"; }
  auto params() const { return std::tie(causal_); }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = start(inputs, out);
    const auto& x = inputs[0];
    const int cols = x.shape(-1);
    const int rows = cols > 0 ? static_cast<int>(x.size() / cols) : 0;
    const int length = causal_ ? x.shape(-2) : 0;
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), o = mx::array::unsafe_weak_copy(out),
                      rows, cols, length]() mutable {
      if (rows == 0) return;
      std::vector<char> cx;
      ffai_softmax_rows(static_cast<const float*>(row_major_ptr(x, cx)), o.data<float>(), rows,
                        cols, length, length > 0 ? cols - length : 0);
    });
  }

 private:
  bool causal_;
};

// RMSNorm over the last axis with a weight of that width (act_kernels.h).
class RmsNorm : public SameParams<RmsNorm, CpuInferencePrimitive> {
 public:
  RmsNorm(mx::Stream stream, float eps) : SameParams(stream), eps_(eps) {}
  const char* name() const override { return "FfaiRmsNorm"; }
  auto params() const { return std::tie(eps_); }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = start(inputs, out);
    const int cols = inputs[0].shape(-1);
    const int rows = cols > 0 ? static_cast<int>(inputs[0].size() / cols) : 0;
    encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                      w = mx::array::unsafe_weak_copy(inputs[1]),
                      o = mx::array::unsafe_weak_copy(out), rows, cols, eps = eps_]() mutable {
      if (rows == 0) return;
      std::vector<char> cx, cw;
      ffai_rms_norm(static_cast<const float*>(row_major_ptr(x, cx)),
                    static_cast<const float*>(row_major_ptr(w, cw)), o.data<float>(), rows, cols,
                    eps);
    });
  }

 private:
  float eps_;
};

[[noreturn]] void bad(const std::string& msg) {
  throw std::invalid_argument("quant_matmul: " + msg);  // ValueError in Python
}

void check_packed(const mx::array& w, const mx::array& scales, const mx::array& biases, int K,
                  int bits, int group_size, int n) {
  const int blocks = (n + 15) / 16;
  const std::string want_w = "(" + std::to_string(blocks) + ", " + std::to_string(K * bits / 32) +
      ", 16)";
  if (w.dtype() != mx::uint32 || w.ndim() != 3 || w.shape(0) != blocks ||
      w.shape(1) != K * bits / 32 || w.shape(2) != 16) {
    bad("packed w must be uint32 " + want_w + " for n = " + std::to_string(n) + ", got " +
        shape_str(w));
  }
  if (scales.dtype() != mx::float32 && scales.dtype() != mx::float16) {
    bad("scales must be float32 or float16");
  }
  if (biases.dtype() != scales.dtype()) bad("biases must have the dtype of scales");
  for (const auto* p : {&scales, &biases}) {
    if (p->ndim() != 3 || p->shape(0) != blocks || p->shape(1) != K / group_size ||
        p->shape(2) != 16) {
      bad("packed scales and biases must have shape (" + std::to_string(blocks) + ", " +
          std::to_string(K / group_size) + ", 16), got " + shape_str(*p));
    }
  }
}

// packed_n > 0: w, scales and biases are in the packed layout for packed_n rows.
// Returns K, the product's input width: x's last axis, or with gate columns the weights'.
int check_args(const mx::array& x, const mx::array& w, const mx::array& scales,
               const mx::array& biases, int bits, int group_size, int packed_n, GateColumns gate) {
  if (bits != 4 && bits != 8) bad("bits must be 4 or 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    bad("group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  }
  if (x.dtype() != mx::float32) bad("x must be float32");
  if (x.ndim() < 1) bad("x must have at least one dimension (..., K)");
  if (w.ndim() < 2) bad("w must have the rows and words axes, got " + shape_str(w));
  const int K = gate.on() ? w.shape(1) * 32 / bits : x.shape(-1);
  check_gate("quant_matmul", gate, x.shape(-1), K);
  if (K <= 0 || K % group_size != 0) {
    bad("K = x.shape[-1] = " + std::to_string(K) + " must be a positive multiple of group_size " +
        std::to_string(group_size));
  }
  if (packed_n < 0) bad("packed_n must be >= 0, got " + std::to_string(packed_n));
  if (packed_n > 0) {
    check_packed(w, scales, biases, K, bits, group_size, packed_n);
    return K;
  }
  if (w.dtype() != mx::uint32 || w.ndim() != 2) bad("w must be a 2-D uint32 array (N, K*bits/32)");
  const int N = w.shape(0);
  if (w.shape(1) != K * bits / 32) {
    bad("w has shape " + shape_str(w) + " but K = " + std::to_string(K) + " and bits = " +
        std::to_string(bits) + " need " + std::to_string(K * bits / 32) + " words per row");
  }
  if (scales.dtype() != mx::float32 && scales.dtype() != mx::float16) {
    bad("scales must be float32 or float16");
  }
  if (biases.dtype() != scales.dtype()) bad("biases must have the dtype of scales");
  for (const auto* p : {&scales, &biases}) {
    if (p->ndim() != 2 || p->shape(0) != N || p->shape(1) != K / group_size) {
      bad("scales and biases must have shape (" + std::to_string(N) + ", " +
          std::to_string(K / group_size) + "), got " + shape_str(*p));
    }
  }
  return K;
}

mx::array quant_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                       const mx::array& biases, int bits, int group_size, int packed_n,
                       const std::optional<mx::array>& bias, int gate, int up,
                       mx::StreamOrDevice s) {
  const GateColumns columns{gate, up};
  const int K = check_args(x, w, scales, biases, bits, group_size, packed_n, columns);
  auto stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::DeviceType::cpu) {
    bad("runs on the CPU only; pass stream=mx.cpu");
  }
  auto shape = x.shape();
  shape.back() = packed_n > 0 ? packed_n : w.shape(0);
  std::vector<mx::array> inputs{x, w, scales, biases};
  if (bias) {
    if (bias->dtype() != mx::float32 || bias->ndim() != 1 || bias->shape(0) != shape.back()) {
      bad("bias must be float32 (" + std::to_string(shape.back()) + ",), got " +
          shape_str(*bias));
    }
    inputs.push_back(*bias);
  }
  return mx::array(std::move(shape), mx::float32,
                   std::make_shared<QuantMatmul>(stream, bits, group_size,
                                                 scales.dtype() == mx::float16, packed_n, K,
                                                 columns),
                   std::move(inputs));
}

mx::array silu_mul(const mx::array& g, const mx::array& u, mx::StreamOrDevice s) {
  if (g.dtype() != mx::float32 || u.dtype() != mx::float32) {
    throw std::invalid_argument("silu_mul: g and u must be float32");
  }
  if (g.shape() != u.shape()) {
    throw std::invalid_argument("silu_mul: g and u must have one shape, got " + shape_str(g) +
                                " and " + shape_str(u));
  }
  return mx::array(g.shape(), mx::float32,
                   std::make_shared<SiluMul>(cpu_stream(s, "silu_mul")), {g, u});
}

mx::array softmax(const mx::array& x, bool causal, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("softmax: x must be float32");
  if (x.ndim() < (causal ? 2 : 1)) {
    throw std::invalid_argument("softmax: x needs a last axis (and a query axis if causal)");
  }
  if (causal && x.shape(-2) > x.shape(-1)) {
    throw std::invalid_argument("softmax: causal needs L <= T, got " + shape_str(x));
  }
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<RowSoftmax>(cpu_stream(s, "softmax"), causal), {x});
}

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32) {
    throw std::invalid_argument("rms_norm: x and w must be float32");
  }
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("rms_norm: w must be 1-D of x's last width, got " +
                                shape_str(x) + " and " + shape_str(w));
  }
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<RmsNorm>(cpu_stream(s, "rms_norm"), eps), {x, w});
}

}  // namespace

NB_MODULE(_quant, m) {
  m.doc() = "ffai's weight-only quantized matmul as an MLX primitive (CPU).";
  nb::module_::import_("mlx.core");  // registers mx.array / mx.Stream with this domain

  m.def("quant_matmul", &quant_matmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("bits"), nb::arg("group_size"), nb::arg("packed_n") = 0,
        nb::arg("bias") = nb::none(), nb::arg("gate") = -1, nb::arg("up") = -1,
        nb::arg("stream") = nb::none(),
        "out[..., N] = x[..., K] @ dequantize(w, scales, biases)^T (MLX affine format), float32, "
        "plus `bias` (N,) if given. packed_n > 0: w, scales, biases in the packed layout "
        "(quant.pack) of packed_n rows. gate, up >= 0: x is a fused gate/up product and the "
        "input is silu(x[..., gate:gate+K]) * x[..., up:up+K].");
  m.def("silu_mul", &silu_mul, nb::arg("g"), nb::arg("u"), nb::arg("stream") = nb::none(),
        "silu(g) * u, float32, with MLX's exp polynomial in SIMD lanes (CPU).");
  m.def("softmax", &softmax, nb::arg("x"), nb::arg("causal") = false,
        nb::arg("stream") = nb::none(),
        "Softmax over the last axis, float32 (CPU). causal: x is (..., L, T) scores and query "
        "i sees keys 0..T-L+i (the others get 0).");
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("w"), nb::arg("eps"),
        nb::arg("stream") = nb::none(),
        "x * rsqrt(mean(x^2, axis=-1) + eps) * w, float32 (CPU).");
  ffai::register_decode_ops(m);
  m.def("isa", []() { return std::string(ffai_quant_isa()); },
        "Instruction set the kernel dispatched to on this CPU.");
  m.def("threads", []() { return ffai_quant_threads(); }, "Threads the kernel uses.");
  m.def("configure", [](int threads, const std::string& isa) {
    return ffai_quant_configure(threads, isa.c_str());
  }, nb::arg("threads"), nb::arg("isa") = "",
        "Thread count (< 1: keep) and instruction set ('': the best this CPU has); "
        "returns the thread count, or -1 for an ISA this CPU or build lacks.");
  m.def("fallbacks", []() { return g_fallbacks.load(); },
        "How many calls the kernel declined (the scalar loop ran instead).");
  m.def("_force_fallback", [](bool on) { g_force_fallback.store(on); },
        "Testing only: bypass the kernel and run the primitive's scalar loop.");
  m.def("built_for_mlx", []() {
    return std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
        std::to_string(MLX_VERSION_PATCH);
  }, "The mlx version whose headers this module was compiled against.");
}
