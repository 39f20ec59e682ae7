// The decode-step primitives of ffai_worker.native._quant: the attention's key/value
// writes and heads (attn_kernels.h), the residual add with RMSNorm, the SwiGLU gate on a
// fused product's columns, and a float Linear as one node. Bound by quant_ops.cpp's module
// through register_decode_ops.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <dlfcn.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "ops_common.h"
#include "quant_gemm.h"

namespace ffai {
namespace {

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
// With gate columns, x is a fused gate/up product and the input its SwiGLU gate (GateColumns).
class Linear : public SameParams<Linear, CpuInferencePrimitive> {
 public:
  Linear(mx::Stream stream, GateColumns gate) : SameParams(stream), gate_(gate) {}
  const char* name() const override { return "FfaiLinear"; }
  auto params() const { return std::tie(gate_); }
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
                      bias = weak(inputs[has_bias ? 2 : 1]), o = weak(out), has_bias,
                      gate = gate_]() mutable {
      const int K = w.shape(1), N = w.shape(0), cols = x.shape(-1);
      const int M = cols > 0 ? static_cast<int>(x.size() / cols) : 0;
      if (M == 0 || N == 0) return;
      std::vector<char> cx, cw, cb;
      std::vector<float> gated;
      auto* xp =
          gated_rows(static_cast<const float*>(row_major_ptr(x, cx)), M, cols, gate, K, gated);
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

 private:
  GateColumns gate_;
};

// silu(x[..., g:g+width]) * x[..., u:u+width] for each row of x: the SwiGLU gate read
// straight from a fused gate/up projection, with no slice nodes (decode-sized: one
// kernel call per row).
class SiluMulColumns : public SameParams<SiluMulColumns, CpuInferencePrimitive> {
 public:
  SiluMulColumns(mx::Stream stream, int gate, int up, int width)
      : SameParams(stream), gate_(gate), up_(up), width_(width) {}
  const char* name() const override { return "FfaiSiluMulColumns"; }
  auto params() const { return std::tie(gate_, up_, width_); }
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
      silu_mul_rows(xp, rows, cols, GateColumns{g, u}, w, o.data<float>());
    });
  }

 private:
  int gate_, up_, width_;
};

// x + y and RMSNorm of that sum (act_kernels.h): a residual add and the norm after it as
// one node with two outputs (the sum goes on as the residual stream).
class AddRmsNorm : public SameParams<AddRmsNorm, mx::Primitive> {
 public:
  AddRmsNorm(mx::Stream stream, float eps) : SameParams(stream), eps_(eps) {}
  const char* name() const override { return "FfaiAddRmsNorm"; }
  auto params() const { return std::tie(eps_); }
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
class KvWrite : public SameParams<KvWrite, CpuInferencePrimitive> {
 public:
  KvWrite(mx::Stream stream, RopeParams rope, int column)
      : SameParams(stream), rope_(rope), column_(column) {}
  const char* name() const override { return "FfaiKvWrite"; }
  auto params() const { return std::tie(rope_, column_); }
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
class DecodeAttention : public SameParams<DecodeAttention, CpuInferencePrimitive> {
 public:
  struct Params {
    RopeParams rope;
    float scale, softcap;
    int window, heads, column;  // column: where the query heads start in each row of q
    bool operator==(const Params&) const = default;
  };
  DecodeAttention(mx::Stream stream, Params p) : SameParams(stream), p_(p) {}
  const char* name() const override { return "FfaiDecodeAttention"; }
  auto params() const { return std::tie(p_); }
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

mx::array silu_mul_columns(const mx::array& x, int gate, int up, int width,
                           mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 1) {
    throw std::invalid_argument("silu_mul_columns: x must be float32 (..., features)");
  }
  if (width <= 0 || gate < 0) {
    throw std::invalid_argument("silu_mul_columns: width and gate must be positive, got " +
                                std::to_string(width) + " and " + std::to_string(gate));
  }
  check_gate("silu_mul_columns", GateColumns{gate, up}, x.shape(-1), width);
  auto shape = x.shape();
  shape.back() = width;
  auto prim = std::make_shared<SiluMulColumns>(cpu_stream(s, "silu_mul_columns"), gate, up, width);
  return mx::array(std::move(shape), mx::float32, prim, {x});
}

mx::array linear(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
                 int gate, int up, mx::StreamOrDevice s) {
  if (process_sgemm() == nullptr) throw std::runtime_error("linear: no cblas_sgemm is loaded");
  const GateColumns columns{gate, up};
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 || x.ndim() < 1 || w.ndim() != 2 ||
      (!columns.on() && w.shape(1) != x.shape(-1))) {
    throw std::invalid_argument("linear: x (..., K) and w (N, K) must be float32, got " +
                                shape_str(x) + " and " + shape_str(w));
  }
  check_gate("linear", columns, x.shape(-1), w.shape(1));
  std::vector<mx::array> inputs{x, w};
  if (bias) {
    if (bias->dtype() != mx::float32 || bias->ndim() != 1 || bias->shape(0) != w.shape(0)) {
      throw std::invalid_argument("linear: bias must be float32 (N,), got " + shape_str(*bias));
    }
    inputs.push_back(*bias);
  }
  auto shape = x.shape();
  shape.back() = w.shape(0);
  auto prim = std::make_shared<Linear>(cpu_stream(s, "linear"), columns);
  return mx::array(std::move(shape), mx::float32, prim, std::move(inputs));
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

// Rows `ids` of a quantized embedding in the packed layout (quant_gemm.h), dequantized to
// float32 as mx.dequantize does it (scale * q + bias): ids.shape + (K,). One node where
// the row lookup in the packed arrays and the dequantization were about 25. An id out of
// [0, rows) gives a row of zeros (the tokenizer never makes one; no read out of bounds).
class PackedEmbedding : public SameParams<PackedEmbedding, CpuInferencePrimitive> {
 public:
  struct Params {
    int bits, group_size, rows, K;
    bool f16;
    bool operator==(const Params&) const = default;
  };
  PackedEmbedding(mx::Stream stream, Params p) : SameParams(stream), p_(p) {}
  const char* name() const override { return "FfaiPackedEmbedding"; }
  auto params() const { return std::tie(p_); }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.push_back(p_.K);
    return {shape};
  }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = start(inputs, out);
    auto weak = [](const mx::array& a) { return mx::array::unsafe_weak_copy(a); };
    encoder.dispatch([ids = weak(inputs[0]), w = weak(inputs[1]), sc = weak(inputs[2]),
                      bi = weak(inputs[3]), o = weak(out), p = p_]() mutable {
      std::vector<char> cids;
      auto* id = static_cast<const int32_t*>(row_major_ptr(ids, cids));
      for (size_t r = 0; r < ids.size(); ++r) {
        lookup(p, id[r], w.data<uint32_t>(), sc.data<void>(), bi.data<void>(),
               o.data<float>() + r * p.K);
      }
    });
  }

 private:
  static float param(const void* a, size_t i, bool f16) {
    if (!f16) return static_cast<const float*>(a)[i];
    return static_cast<float>(static_cast<const mx::float16_t*>(a)[i]);
  }
  static void lookup(const Params& p, int32_t n, const uint32_t* w, const void* sc,
                     const void* bi, float* out) {
    if (n < 0 || n >= p.rows) {
      std::memset(out, 0, sizeof(float) * p.K);
      return;
    }
    const int per_word = 32 / p.bits, words = p.K / per_word, groups = p.K / p.group_size;
    const uint32_t mask = (1u << p.bits) - 1u;
    const size_t block = n / 16, lane = n % 16;
    for (int g = 0; g < groups; ++g) {
      const size_t at = (block * groups + g) * 16 + lane;
      const float scale = param(sc, at, p.f16), bias = param(bi, at, p.f16);
      for (int k = g * p.group_size; k < (g + 1) * p.group_size; k += per_word) {
        uint32_t word = w[(block * words + k / per_word) * 16 + lane];
        for (int j = 0; j < per_word; ++j, word >>= p.bits) {
          out[k + j] = scale * static_cast<float>(word & mask) + bias;
        }
      }
    }
  }
  Params p_;
};

mx::array embed_rows(const mx::array& ids, const mx::array& w, const mx::array& scales,
                     const mx::array& biases, int bits, int group_size, int rows,
                     mx::StreamOrDevice s) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("embed_rows: " + why + ", got ids " + shape_str(ids) + ", w " +
                                shape_str(w) + ", scales " + shape_str(scales));
  };
  if (ids.dtype() != mx::int32) fail("ids must be int32");
  if (bits != 4 && bits != 8) fail("bits must be 4 or 8");
  if (group_size < 1 || group_size % (32 / bits) != 0) fail("bad group_size");
  const int blocks = (rows + 15) / 16;
  if (w.dtype() != mx::uint32 || w.ndim() != 3 || w.shape(0) != blocks || w.shape(2) != 16) {
    fail("w must be packed uint32 (rows/16, words, 16)");
  }
  const int K = w.shape(1) * (32 / bits);
  const bool f16 = scales.dtype() == mx::float16;
  for (const auto* a : {&scales, &biases}) {
    if ((a->dtype() != mx::float32 && !f16) || a->dtype() != scales.dtype() || a->ndim() != 3 ||
        a->shape(0) != blocks || a->shape(1) * group_size != K || a->shape(2) != 16) {
      fail("scales and biases must be packed float32 or float16 (rows/16, K/group_size, 16)");
    }
  }
  auto shape = ids.shape();
  shape.push_back(K);
  PackedEmbedding::Params p{bits, group_size, rows, K, f16};
  return mx::array(std::move(shape), mx::float32,
                   std::make_shared<PackedEmbedding>(cpu_stream(s, "embed_rows"), p),
                   {ids, w, scales, biases});
}

// The index of each row's largest value over the last axis, int32 (act_kernels.h: MLX's
// argmax semantics, SIMD lanes, rows over the pool): greedy decoding's token pick.
class ArgmaxLast : public SameParams<ArgmaxLast, CpuInferencePrimitive> {
 public:
  using SameParams::SameParams;
  const char* name() const override { return "FfaiArgmax"; }
  auto params() const { return std::tuple<>(); }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.pop_back();
    return {shape};
  }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = start(inputs, out);
    encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                      o = mx::array::unsafe_weak_copy(out)]() mutable {
      const int cols = x.shape(-1);
      const int rows = static_cast<int>(x.size() / cols);
      if (rows == 0) return;
      std::vector<char> cx;
      ffai_argmax_rows(static_cast<const float*>(row_major_ptr(x, cx)), o.data<int32_t>(), rows,
                       cols);
    });
  }
};

mx::array argmax(const mx::array& x, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 1 || x.shape(-1) < 1) {
    throw std::invalid_argument("argmax: x must be float32 with a non-empty last axis, got " +
                                shape_str(x));
  }
  auto shape = x.shape();
  shape.pop_back();
  return mx::array(std::move(shape), mx::int32,
                   std::make_shared<ArgmaxLast>(cpu_stream(s, "argmax")), {x});
}

}  // namespace

void register_decode_ops(nb::module_& m) {
  m.def("embed_rows", &embed_rows, nb::arg("ids"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("bits"), nb::arg("group_size"), nb::arg("rows"),
        nb::arg("stream") = nb::none(),
        "Rows `ids` (int32, any shape) of a packed quantized embedding of `rows` rows, "
        "dequantized to float32 (scale * q + bias): ids.shape + (K,).");
  m.def("argmax", &argmax, nb::arg("x"), nb::arg("stream") = nb::none(),
        "The index of each row's largest value over the last axis, int32 (CPU), as "
        "mx.argmax(x, axis=-1) picks it (the first NaN, else the first largest).");
  m.def("silu_mul_columns", &silu_mul_columns, nb::arg("x"), nb::arg("gate"), nb::arg("up"),
        nb::arg("width"), nb::arg("stream") = nb::none(),
        "silu(x[..., gate:gate+width]) * x[..., up:up+width], float32 (CPU): a fused gate/up "
        "projection's SwiGLU without slices.");
  m.def("linear", &linear, nb::arg("x"), nb::arg("w"), nb::arg("bias") = nb::none(),
        nb::arg("gate") = -1, nb::arg("up") = -1, nb::arg("stream") = nb::none(),
        "x @ w.T (+ bias), float32 (CPU), through the process's cblas_sgemm, as one node. "
        "gate, up >= 0: x is a fused gate/up product and the input is "
        "silu(x[..., gate:gate+K]) * x[..., up:up+K].");
  m.def("has_sgemm", []() { return process_sgemm() != nullptr; },
        "Whether a cblas_sgemm is loaded in the process (for `linear`).");
  m.def("add_rms_norm", &add_rms_norm, nb::arg("x"), nb::arg("y"), nb::arg("w"),
        nb::arg("eps"), nb::arg("stream") = nb::none(),
        "(x + y, rms_norm(x + y, w, eps)), float32 (CPU): a residual add and the norm after "
        "it in one node.");
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
}

}  // namespace ffai
