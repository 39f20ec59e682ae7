// An MLX primitive that runs our weight-only quantized matmul (quant_gemm.h) on the CPU.
//
// MLX's own CPU quantized_matmul is a scalar loop; this primitive puts our kernel in the
// graph instead, so it works inside mx.compile like any MLX op. Python module:
// ffai_worker.native._quant (built by setup.py with NB_DOMAIN=mlx so that mx.array
// objects pass both ways; see setup.py).

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <dlfcn.h>
#include <optional>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "mlx/version.h"

#include "quant_gemm.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

// How often the kernel returned -1 and the scalar loop below ran instead.
std::atomic<long> g_fallbacks{0};
// Tests set this to run the scalar loop without a kernel that declines anything.
std::atomic<bool> g_force_fallback{false};

// Copies `a` (any strides, offset, broadcast) into `dst` in row-major order.
void gather_row_major(const mx::array& a, char* dst) {
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
const void* row_major_ptr(const mx::array& a, std::vector<char>& copy) {
  if (a.flags().row_contiguous) {
    return a.data<void>();
  }
  copy.resize(a.size() * a.itemsize());
  gather_row_major(a, copy.data());
  return copy.data();
}

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

class QuantMatmul : public CpuInferencePrimitive {
 public:
  // packed_n > 0: the weights are in the packed layout and the output has packed_n columns.
  QuantMatmul(mx::Stream stream, int bits, int group_size, bool scales_f16, int packed_n)
      : CpuInferencePrimitive(stream),
        bits_(bits),
        group_size_(group_size),
        scales_f16_(scales_f16),
        packed_n_(packed_n) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "FfaiQuantMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const QuantMatmul*>(&other);
    return o != nullptr && o->bits_ == bits_ && o->group_size_ == group_size_ &&
        o->scales_f16_ == scales_f16_ && o->packed_n_ == packed_n_;
  }

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
};

void QuantMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = start(inputs, out);
  const int K = inputs[0].shape(-1);
  const int M = K > 0 ? static_cast<int>(inputs[0].size() / K) : 0;
  const int N = packed_n_ > 0 ? packed_n_ : inputs[1].shape(0);
  // Weak copies: the eval loop keeps the buffers alive until this task has run
  // (mlx/backend/cpu/eval.cpp), as MLX's own CPU ops rely on.
  const bool has_bias = inputs.size() > 4;
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                    w = mx::array::unsafe_weak_copy(inputs[1]),
                    s = mx::array::unsafe_weak_copy(inputs[2]),
                    b = mx::array::unsafe_weak_copy(inputs[3]),
                    bias = mx::array::unsafe_weak_copy(inputs[has_bias ? 4 : 3]),
                    o = mx::array::unsafe_weak_copy(out), M, N, K, bits = bits_,
                    gs = group_size_, f16 = scales_f16_, packed = packed_n_ > 0,
                    has_bias]() mutable {
    if (M == 0 || N == 0) {
      return;
    }
    std::vector<char> cx, cw, cs, cb;  // packed copies of non-contiguous inputs
    auto* xp = static_cast<const float*>(row_major_ptr(x, cx));
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

// The process's cblas_sgemm, as MLX's own matmul reaches it: the BLAS shim with the
// small-M kernel where ffai_worker.native.blas loaded it globally; null without one.
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                         int, float, float*, int);
SgemmFn process_sgemm() {
  static const SgemmFn fn = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
  return fn;
}

// x (..., K) @ w(N, K)^T (+ bias (N,)), float32, through the process's cblas_sgemm: a
// float Linear as one graph node (MLX's nn.Linear is a weight transpose, a flatten, the
// matmul and an unflatten, plus a broadcast with a bias).
class Linear : public CpuInferencePrimitive {
 public:
  using CpuInferencePrimitive::CpuInferencePrimitive;
  const char* name() const override { return "FfaiLinear"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const Linear*>(&other) != nullptr;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = start(inputs, out);
    const bool has_bias = inputs.size() > 2;
    auto weak = [](const mx::array& a) { return mx::array::unsafe_weak_copy(a); };
    encoder.dispatch([x = weak(inputs[0]), w = weak(inputs[1]),
                      bias = weak(inputs[has_bias ? 2 : 1]), o = weak(out), has_bias]() mutable {
      const int K = x.shape(-1), N = w.shape(0);
      const int M = K > 0 ? static_cast<int>(x.size() / K) : 0;
      if (M == 0 || N == 0) return;
      std::vector<char> cx, cw, cb;
      auto* xp = static_cast<const float*>(row_major_ptr(x, cx));
      auto* wp = static_cast<const float*>(row_major_ptr(w, cw));
      float* op = o.data<float>();
      process_sgemm()(101, 111, 112, M, N, K, 1.0f, xp, K, wp, K, 0.0f, op, N);  // row-major, A B^T
      if (has_bias) {  // as the small-M kernel's beta = 1 rounds it: the product, then + bias
        auto* bp = static_cast<const float*>(row_major_ptr(bias, cb));
        for (int m = 0; m < M; ++m) {
          for (int n = 0; n < N; ++n) op[static_cast<size_t>(m) * N + n] += bp[n];
        }
      }
    });
  }
};

// silu(g) * u elementwise (act_kernels.h); inputs of one shape, float32.
class SiluMul : public CpuInferencePrimitive {
 public:
  using CpuInferencePrimitive::CpuInferencePrimitive;
  const char* name() const override { return "FfaiSiluMul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const SiluMul*>(&other) != nullptr;
  }
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

// silu(x[..., g:g+width]) * x[..., u:u+width] for each row of x: the SwiGLU gate read
// straight from a fused gate/up projection, with no slice nodes (decode-sized: one
// kernel call per row).
class SiluMulColumns : public CpuInferencePrimitive {
 public:
  SiluMulColumns(mx::Stream stream, int gate, int up, int width)
      : CpuInferencePrimitive(stream), gate_(gate), up_(up), width_(width) {}
  const char* name() const override { return "FfaiSiluMulColumns"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const SiluMulColumns*>(&other);
    return o != nullptr && o->gate_ == gate_ && o->up_ == up_ && o->width_ == width_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = width_;
    return {shape};
  }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = start(inputs, out);
    encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                      o = mx::array::unsafe_weak_copy(out), g = gate_, u = up_,
                      w = width_]() mutable {
      std::vector<char> cx;
      auto* xp = static_cast<const float*>(row_major_ptr(x, cx));
      const size_t cols = x.shape(-1), rows = cols ? x.size() / cols : 0;
      for (size_t r = 0; r < rows; ++r) {
        ffai_silu_mul(xp + r * cols + g, xp + r * cols + u, o.data<float>() + r * w, w);
      }
    });
  }

 private:
  int gate_, up_, width_;
};

// Softmax over the last axis (act_kernels.h), optionally with the causal mask of a
// (..., L, T) score block: query i sees keys 0..T-L+i.
class RowSoftmax : public CpuInferencePrimitive {
 public:
  RowSoftmax(mx::Stream stream, bool causal) : CpuInferencePrimitive(stream), causal_(causal) {}
  const char* name() const override { return "FfaiRowSoftmax"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RowSoftmax*>(&other);
    return o != nullptr && o->causal_ == causal_;
  }
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

// x + y and RMSNorm of that sum (act_kernels.h): a residual add and the norm after it as
// one node with two outputs (the sum goes on as the residual stream).
class AddRmsNorm : public mx::Primitive {
 public:
  AddRmsNorm(mx::Stream stream, float eps) : mx::Primitive(stream), eps_(eps) {}
  const char* name() const override { return "FfaiAddRmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const AddRmsNorm*>(&other);
    return o != nullptr && o->eps_ == eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[0].shape()};
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[ffai FfaiAddRmsNorm] has no GPU implementation.");
  }
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& o : outputs) {
      o.set_data(mx::allocator::malloc(o.nbytes()));
      encoder.set_output_array(o);
    }
    for (const auto& in : inputs) encoder.set_input_array(in);
    const int cols = inputs[0].shape(-1);
    const int rows = cols > 0 ? static_cast<int>(inputs[0].size() / cols) : 0;
    auto weak = [](const mx::array& a) { return mx::array::unsafe_weak_copy(a); };
    encoder.dispatch([x = weak(inputs[0]), y = weak(inputs[1]), w = weak(inputs[2]),
                      sum = weak(outputs[0]), normed = weak(outputs[1]), rows, cols,
                      eps = eps_]() mutable {
      if (rows == 0) return;
      std::vector<char> cx, cy, cw;
      auto* xp = static_cast<const float*>(row_major_ptr(x, cx));
      auto* yp = static_cast<const float*>(row_major_ptr(y, cy));
      float* sp = sum.data<float>();
      for (size_t i = 0, n = static_cast<size_t>(rows) * cols; i < n; ++i) sp[i] = xp[i] + yp[i];
      ffai_rms_norm(sp, static_cast<const float*>(row_major_ptr(w, cw)), normed.data<float>(),
                    rows, cols, eps);
    });
  }

 private:
  float eps_;
};

// RMSNorm over the last axis with a weight of that width (act_kernels.h).
class RmsNorm : public CpuInferencePrimitive {
 public:
  RmsNorm(mx::Stream stream, float eps) : CpuInferencePrimitive(stream), eps_(eps) {}
  const char* name() const override { return "FfaiRmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RmsNorm*>(&other);
    return o != nullptr && o->eps_ == eps_;
  }
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

// RoPE parameters as the decode primitives keep them (attn_kernels.h's ffai_rope).
struct RopeParams {
  int rope_dims = 0;  // 0 with no inverse frequencies: no rotation (values)
  float rope_scale = 1.0f, rope_mscale = 1.0f;
  bool operator==(const RopeParams&) const = default;
  ffai_rope with(const float* inv_freq) const {
    return {rope_dims > 0 ? inv_freq : nullptr, rope_dims, rope_scale, rope_mscale};
  }
};

// Row stride of a (B, 1, width) array whose rows are each contiguous, else -1.
long row_stride(const mx::array& a) {
  if (a.ndim() != 3 || a.strides(-1) != 1 || a.shape(1) != 1) return -1;
  return static_cast<long>(a.strides(0));
}

// Row-contiguous float rows of a (B, 1, width) array: its own, or a packed copy in `copy`.
const float* rows_of(const mx::array& a, std::vector<char>& copy, long& stride) {
  stride = row_stride(a);
  if (stride >= 0) return a.data<float>();
  stride = a.shape(-1);
  return static_cast<const float*>(row_major_ptr(a, copy));
}

// Writes one new key (rotated) or value per row into a slot cache (B, n_kv, T, D): inputs
// cache, new rows (B, 1, n_kv * D), positions (B,) int32[, inv_freq]. The output is the
// cache, in the input's own memory when nothing else holds it (the decode step donates
// its cache buffers), else in a copy.
class KvWrite : public CpuInferencePrimitive {
 public:
  KvWrite(mx::Stream stream, RopeParams rope, int column)
      : CpuInferencePrimitive(stream), rope_(rope), column_(column) {}
  const char* name() const override { return "FfaiKvWrite"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const KvWrite*>(&other);
    return o != nullptr && o->rope_ == rope_ && o->column_ == column_;
  }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& cache = inputs[0];
    const bool copy = !(cache.is_donatable() && cache.flags().row_contiguous);
    if (copy) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    } else {
      out.copy_shared_buffer(cache);
    }
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& in : inputs) encoder.set_input_array(in);
    encoder.set_output_array(out);
    auto weak = [](const mx::array& a) { return mx::array::unsafe_weak_copy(a); };
    encoder.dispatch([c = weak(cache), x = weak(inputs[1]), pos = weak(inputs[2]),
                      freqs = weak(inputs.size() > 3 ? inputs[3] : inputs[2]),
                      o = weak(out), copy, rope = rope_, column = column_]() mutable {
      if (copy) gather_row_major(c, o.data<char>());
      std::vector<char> cx, cp, cf;
      long stride = 0;
      const float* rows = rows_of(x, cx, stride) + column;
      auto* p = static_cast<const int32_t*>(row_major_ptr(pos, cp));
      const ffai_rope r = rope.with(static_cast<const float*>(row_major_ptr(freqs, cf)));
      if (ffai_kv_write(o.data<float>(), rows, stride, p, o.shape(0), o.shape(1), o.shape(2),
                        o.shape(3), &r) != 0) {
        throw std::runtime_error("kv_write: a position is outside the cache");
      }
    });
  }

 private:
  RopeParams rope_;
  int column_;  // where the new rows start in each row of x
};

// Each query head of a decode step over its row's cached positions: inputs q (B, 1, H * D),
// the key and value caches (B, n_kv, T, D), positions (B,) int32[, inv_freq]; output
// (B, 1, H * D).
class DecodeAttention : public CpuInferencePrimitive {
 public:
  struct Params {
    RopeParams rope;
    float scale, softcap;
    int window, heads, column;  // column: where the query heads start in each row of q
    bool operator==(const Params&) const = default;
  };
  DecodeAttention(mx::Stream stream, Params p) : CpuInferencePrimitive(stream), p_(p) {}
  const char* name() const override { return "FfaiDecodeAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const DecodeAttention*>(&other);
    return o != nullptr && o->p_ == p_;
  }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = start(inputs, out);
    auto weak = [](const mx::array& a) { return mx::array::unsafe_weak_copy(a); };
    encoder.dispatch([q = weak(inputs[0]), kc = weak(inputs[1]), vc = weak(inputs[2]),
                      pos = weak(inputs[3]),
                      freqs = weak(inputs.size() > 4 ? inputs[4] : inputs[3]),
                      o = weak(out), p = p_]() mutable {
      std::vector<char> cq, ck, cv, cp, cf;
      long stride = 0;
      const float* rows = rows_of(q, cq, stride) + p.column;
      auto* k = static_cast<const float*>(row_major_ptr(kc, ck));
      auto* v = static_cast<const float*>(row_major_ptr(vc, cv));
      auto* positions = static_cast<const int32_t*>(row_major_ptr(pos, cp));
      const ffai_rope r = p.rope.with(static_cast<const float*>(row_major_ptr(freqs, cf)));
      if (ffai_decode_attention(rows, stride, k, v, positions, o.data<float>(), kc.shape(0),
                                p.heads, kc.shape(1), kc.shape(2), kc.shape(3), &r, p.scale,
                                p.window, p.softcap) != 0) {
        throw std::runtime_error("decode_attention: a position is outside the cache");
      }
    });
  }

 private:
  Params p_;
};

[[noreturn]] void bad(const std::string& msg) {
  throw std::invalid_argument("quant_matmul: " + msg);  // ValueError in Python
}

std::string shape_str(const mx::array& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i) {
    s += (i ? ", " : "") + std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
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
void check_args(const mx::array& x, const mx::array& w, const mx::array& scales,
                const mx::array& biases, int bits, int group_size, int packed_n) {
  if (bits != 4 && bits != 8) bad("bits must be 4 or 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    bad("group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  }
  if (x.dtype() != mx::float32) bad("x must be float32");
  if (x.ndim() < 1) bad("x must have at least one dimension (..., K)");
  const int K = x.shape(-1);
  if (K <= 0 || K % group_size != 0) {
    bad("K = x.shape[-1] = " + std::to_string(K) + " must be a positive multiple of group_size " +
        std::to_string(group_size));
  }
  if (packed_n < 0) bad("packed_n must be >= 0, got " + std::to_string(packed_n));
  if (packed_n > 0) {
    check_packed(w, scales, biases, K, bits, group_size, packed_n);
    return;
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
}

mx::array quant_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                       const mx::array& biases, int bits, int group_size, int packed_n,
                       const std::optional<mx::array>& bias, mx::StreamOrDevice s) {
  check_args(x, w, scales, biases, bits, group_size, packed_n);
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
                                                 scales.dtype() == mx::float16, packed_n),
                   std::move(inputs));
}

mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op) {
  auto stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::DeviceType::cpu) {
    throw std::invalid_argument(std::string(op) + ": runs on the CPU only; pass stream=mx.cpu");
  }
  return stream;
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

mx::array silu_mul_columns(const mx::array& x, int gate, int up, int width,
                           mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 1) {
    throw std::invalid_argument("silu_mul_columns: x must be float32 (..., features)");
  }
  const int cols = x.shape(-1);
  if (width <= 0 || gate < 0 || up < 0 || gate + width > cols || up + width > cols) {
    throw std::invalid_argument("silu_mul_columns: columns [" + std::to_string(gate) + ", +" +
                                std::to_string(width) + ") and [" + std::to_string(up) + ", +" +
                                std::to_string(width) + ") must lie in rows of " +
                                std::to_string(cols));
  }
  auto shape = x.shape();
  shape.back() = width;
  auto prim = std::make_shared<SiluMulColumns>(cpu_stream(s, "silu_mul_columns"), gate, up, width);
  return mx::array(std::move(shape), mx::float32, prim, {x});
}

mx::array linear(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
                 mx::StreamOrDevice s) {
  if (process_sgemm() == nullptr) throw std::runtime_error("linear: no cblas_sgemm is loaded");
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 || x.ndim() < 1 || w.ndim() != 2 ||
      w.shape(1) != x.shape(-1)) {
    throw std::invalid_argument("linear: x (..., K) and w (N, K) must be float32, got " +
                                shape_str(x) + " and " + shape_str(w));
  }
  std::vector<mx::array> inputs{x, w};
  if (bias) {
    if (bias->dtype() != mx::float32 || bias->ndim() != 1 || bias->shape(0) != w.shape(0)) {
      throw std::invalid_argument("linear: bias must be float32 (N,), got " + shape_str(*bias));
    }
    inputs.push_back(*bias);
  }
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(std::move(shape), mx::float32, std::make_shared<Linear>(cpu_stream(s, "linear")),
                   std::move(inputs));
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

std::vector<mx::array> add_rms_norm(const mx::array& x, const mx::array& y, const mx::array& w,
                                    float eps, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || y.dtype() != mx::float32 || w.dtype() != mx::float32) {
    throw std::invalid_argument("add_rms_norm: x, y and w must be float32");
  }
  if (x.shape() != y.shape() || x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("add_rms_norm: x and y must have one shape and w its last "
                                "width, got " + shape_str(x) + ", " + shape_str(y) + " and " +
                                shape_str(w));
  }
  auto prim = std::make_shared<AddRmsNorm>(cpu_stream(s, "add_rms_norm"), eps);
  return mx::array::make_arrays({x.shape(), x.shape()}, {mx::float32, mx::float32}, prim,
                                {x, y, w});
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

[[noreturn]] void bad_decode(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string(op) + ": " + msg);
}

// Checks what kv_write and decode_attention share; returns the RoPE parameters.
RopeParams check_decode(const char* op, const mx::array& cache, const mx::array& rows, int column,
                        int width, const mx::array& positions,
                        const std::optional<mx::array>& inv_freq, float rope_scale,
                        float rope_mscale) {
  if (cache.dtype() != mx::float32 || rows.dtype() != mx::float32) {
    bad_decode(op, "the cache and the new rows must be float32");
  }
  if (cache.ndim() != 4) bad_decode(op, "the cache must be (B, n_kv, T, D), got " + shape_str(cache));
  const int B = cache.shape(0), D = cache.shape(3);
  if (rows.ndim() != 3 || rows.shape(0) != B || rows.shape(1) != 1) {
    bad_decode(op, "new rows must be (B, 1, features) with B = " + std::to_string(B) + ", got " +
                       shape_str(rows));
  }
  if (column < 0 || width <= 0 || width % D || column + width > rows.shape(2)) {
    bad_decode(op, std::to_string(width) + " features from column " + std::to_string(column) +
                       " (whole heads of D = " + std::to_string(D) + ") do not fit rows of " +
                       std::to_string(rows.shape(2)));
  }
  if (positions.dtype() != mx::int32 || positions.ndim() != 1 || positions.shape(0) != B) {
    bad_decode(op, "positions must be (B,) int32 with B = " + std::to_string(B));
  }
  RopeParams rope{0, rope_scale, rope_mscale};
  if (inv_freq) {
    if (inv_freq->dtype() != mx::float32 || inv_freq->ndim() != 1 || 2 * inv_freq->shape(0) > D) {
      bad_decode(op, "inv_freq must be float32 (rope_dims / 2,) with rope_dims <= D");
    }
    rope.rope_dims = 2 * static_cast<int>(inv_freq->shape(0));
  }
  return rope;
}

std::vector<mx::array> decode_inputs(std::vector<mx::array> inputs,
                                     const std::optional<mx::array>& inv_freq) {
  if (inv_freq) inputs.push_back(*inv_freq);
  return inputs;
}

mx::array kv_write(const mx::array& cache, const mx::array& x, const mx::array& positions,
                   const std::optional<mx::array>& inv_freq, float rope_scale, float rope_mscale,
                   int column, mx::StreamOrDevice s) {
  const int width = cache.ndim() == 4 ? cache.shape(1) * cache.shape(3) : 0;
  auto rope = check_decode("kv_write", cache, x, column, width, positions, inv_freq, rope_scale,
                           rope_mscale);
  auto prim = std::make_shared<KvWrite>(cpu_stream(s, "kv_write"), rope, column);
  return mx::array(cache.shape(), mx::float32, prim,
                   decode_inputs({cache, x, positions}, inv_freq));
}

mx::array decode_attention(const mx::array& q, const mx::array& k_cache,
                           const mx::array& v_cache, const mx::array& positions,
                           const std::optional<mx::array>& inv_freq, float scale,
                           float rope_scale, float rope_mscale, int window, float softcap,
                           int column, int heads, mx::StreamOrDevice s) {
  const int D = k_cache.ndim() == 4 ? k_cache.shape(3) : 1;
  if (heads <= 0 && q.ndim() == 3) heads = (q.shape(2) - column) / std::max(D, 1);
  auto rope = check_decode("decode_attention", k_cache, q, column, heads * D, positions,
                           inv_freq, rope_scale, rope_mscale);
  if (v_cache.shape() != k_cache.shape() || v_cache.dtype() != mx::float32) {
    bad_decode("decode_attention", "the caches must have one shape and be float32");
  }
  if (heads % k_cache.shape(1)) {
    bad_decode("decode_attention", "the query heads must be a multiple of the key heads");
  }
  if (window < 0 || softcap < 0) bad_decode("decode_attention", "window and softcap must be >= 0");
  DecodeAttention::Params p{rope, scale, softcap, window, heads, column};
  auto prim = std::make_shared<DecodeAttention>(cpu_stream(s, "decode_attention"), p);
  return mx::array({q.shape(0), 1, heads * D}, mx::float32, prim,
                   decode_inputs({q, k_cache, v_cache, positions}, inv_freq));
}

}  // namespace

NB_MODULE(_quant, m) {
  m.doc() = "ffai's weight-only quantized matmul as an MLX primitive (CPU).";
  nb::module_::import_("mlx.core");  // registers mx.array / mx.Stream with this domain

  m.def("quant_matmul", &quant_matmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("bits"), nb::arg("group_size"), nb::arg("packed_n") = 0,
        nb::arg("bias") = nb::none(), nb::arg("stream") = nb::none(),
        "out[..., N] = x[..., K] @ dequantize(w, scales, biases)^T (MLX affine format), float32, "
        "plus `bias` (N,) if given. packed_n > 0: w, scales, biases in the packed layout "
        "(quant.pack) of packed_n rows.");
  m.def("silu_mul", &silu_mul, nb::arg("g"), nb::arg("u"), nb::arg("stream") = nb::none(),
        "silu(g) * u, float32, with MLX's exp polynomial in SIMD lanes (CPU).");
  m.def("silu_mul_columns", &silu_mul_columns, nb::arg("x"), nb::arg("gate"), nb::arg("up"),
        nb::arg("width"), nb::arg("stream") = nb::none(),
        "silu(x[..., gate:gate+width]) * x[..., up:up+width], float32 (CPU): a fused gate/up "
        "projection's SwiGLU without slices.");
  m.def("linear", &linear, nb::arg("x"), nb::arg("w"), nb::arg("bias") = nb::none(),
        nb::arg("stream") = nb::none(),
        "x @ w.T (+ bias), float32 (CPU), through the process's cblas_sgemm, as one node.");
  m.def("has_sgemm", []() { return process_sgemm() != nullptr; },
        "Whether a cblas_sgemm is loaded in the process (for `linear`).");
  m.def("softmax", &softmax, nb::arg("x"), nb::arg("causal") = false,
        nb::arg("stream") = nb::none(),
        "Softmax over the last axis, float32 (CPU). causal: x is (..., L, T) scores and query "
        "i sees keys 0..T-L+i (the others get 0).");
  m.def("add_rms_norm", &add_rms_norm, nb::arg("x"), nb::arg("y"), nb::arg("w"),
        nb::arg("eps"), nb::arg("stream") = nb::none(),
        "(x + y, rms_norm(x + y, w, eps)), float32 (CPU): a residual add and the norm after "
        "it in one node.");
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("w"), nb::arg("eps"),
        nb::arg("stream") = nb::none(),
        "x * rsqrt(mean(x^2, axis=-1) + eps) * w, float32 (CPU).");
  m.def("kv_write", &kv_write, nb::arg("cache"), nb::arg("x"), nb::arg("positions"),
        nb::arg("inv_freq") = nb::none(), nb::arg("rope_scale") = 1.0f,
        nb::arg("rope_mscale") = 1.0f, nb::arg("column") = 0, nb::arg("stream") = nb::none(),
        "The cache (B, n_kv, T, D) with row b's new key or value (the n_kv * D features of "
        "x[b] (B, 1, features) from `column` on) at position positions[b], rotated (RoPE, "
        "rotate_half layout) when inv_freq is given; float32 (CPU). In place when nothing "
        "else holds the cache.");
  m.def("decode_attention", &decode_attention, nb::arg("q"), nb::arg("k_cache"),
        nb::arg("v_cache"), nb::arg("positions"), nb::arg("inv_freq") = nb::none(),
        nb::arg("scale") = 1.0f, nb::arg("rope_scale") = 1.0f, nb::arg("rope_mscale") = 1.0f,
        nb::arg("window") = 0, nb::arg("softcap") = 0.0f, nb::arg("column") = 0,
        nb::arg("heads") = 0, nb::arg("stream") = nb::none(),
        "A decode step's attention, float32 (CPU): row b's `heads` query heads (the features "
        "of q[b] (B, 1, features) from `column` on; heads 0: all that follow), rotated when "
        "inv_freq is given and scaled, over positions 0..positions[b] of the (B, n_kv, T, D) "
        "caches (the last `window` only, if > 0); (B, 1, heads * D).");
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
