// simclic-tf custom ops: the history-buffer exchange and the representation
// noise, each with a CPU kernel and an XLA lowering (REGISTER_XLA_OP).
//
// Compiled from source on first use against the installed TensorFlow by
// kernels/build.py; never shipped prebuilt. The semantics are specified in
// kernels/custom_op.py (and kernels/history.py, kernels/noise.py, the
// TensorFlow-function implementation the two must agree with).
//
//   SimclicHistoryExchange(bank: resource, visits: resource, indices: int32[B],
//                          values: float32[B, d], momentum: float32[])
//       -> old_rows: float32[B, d], seen: bool[B]
//   SimclicRepresentationNoise(x: T[B, ...], scale: float32[], seed: int32[2])
//       -> y: T, y = x + scale * std_batch(x) * eps, eps ~ N(0, 1) from seed.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/kernel_def.pb.h"
#include "tensorflow/core/framework/node_def.pb.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"
#include "xla/hlo/builder/lib/comparators.h"
#include "xla/hlo/builder/lib/constants.h"
#include "xla/hlo/builder/xla_builder.h"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"
#include "xla/tsl/lib/random/philox_random.h"
#include "xla/tsl/lib/random/random_distributions.h"

namespace xla::ffi {
const XLA_FFI_Api* GetXlaFfiApi();  // libtensorflow_framework: the in-process FFI API.
}  // namespace xla::ffi

namespace simclic {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::Var;
using ::tensorflow::XlaOpKernel;
using ::tensorflow::XlaOpKernelContext;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
using bfloat16 = ::Eigen::bfloat16;
using half = ::Eigen::half;

constexpr char kHistoryOp[] = "SimclicHistoryExchange";
constexpr char kNoiseOp[] = "SimclicRepresentationNoise";

// ---------------------------------------------------------------------------
// Op definitions

REGISTER_OP("SimclicHistoryExchange")
    .Input("bank: resource")
    .Input("visits: resource")
    .Input("indices: int32")
    .Input("values: float")
    .Input("momentum: float")
    .Output("old_rows: float")
    .Output("seen: bool")
    .Attr("dtype: {float, bfloat16}")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      ShapeHandle indices, values, momentum;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &indices));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &values));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &momentum));
      DimensionHandle batch;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(indices, 0), c->Dim(values, 0), &batch));
      c->set_output(0, c->Matrix(batch, c->Dim(values, 1)));
      c->set_output(1, c->Vector(batch));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Reads rows `indices` of the history bank, then writes them in place.

old_rows[k] = bank[indices[k]] before this call (float32); seen[k] =
visits[indices[k]] > 0. Each distinct index u then receives v_u, the mean of
the values at the positions holding u (summed in position order from 0, then
divided by the count): bank[u] = seen ? fma(m, bank[u], (1 - m) * v_u) : v_u,
computed in float32 and rounded to the bank's dtype, and visits[u] += 1 once.
An index outside [0, N) is an InvalidArgument error before anything is
written; under XLA (which cannot raise at run time) such a position writes
nothing and returns a NaN row with seen = true.
)doc");

REGISTER_OP("SimclicRepresentationNoise")
    .Input("x: T")
    .Input("scale: float")
    .Input("seed: int32")
    .Output("y: T")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn([](InferenceContext* c) -> absl::Status {
      ShapeHandle x, scale, seed;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &scale));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &seed));
      DimensionHandle two;
      TF_RETURN_IF_ERROR(c->WithValue(c->Dim(seed, 0), 2, &two));
      c->set_output(0, x);
      return absl::OkStatus();
    })
    .Doc(R"doc(
y = x + scale * std_batch(x) * eps in float32, returned in x's dtype.

std_batch is the population standard deviation over axis 0. eps is
TensorFlow's stateless normal stream for `seed` (Philox-4x32-10 keyed as
StatelessRandomNormal's CPU kernel, Box-Muller): bit for bit in the CPU kernel;
the XLA lowering computes the same Philox bits and Box-Muller with XLA's own
log/sin/cos, so it agrees to float32 rounding.
)doc");

// ---------------------------------------------------------------------------
// Shared arithmetic

// fma(m, old, (1 - m) * mean): the rounding XLA:CPU produces for the TF
// implementation's `m * old + (1 - m) * mean` (it contracts the multiply-add),
// so that both implementations write bit-identical rows. On x86 the loops are
// compiled twice, with and without the FMA instruction set, and picked at run
// time (std::fmaf is exact either way; the instruction is just faster).
#if defined(__x86_64__) || defined(__i386__)
#define SIMCLIC_FMA_TARGET __attribute__((target("fma")))
bool CpuHasFma() {
  static const bool has = __builtin_cpu_supports("fma");
  return has;
}
#else
#define SIMCLIC_FMA_TARGET
bool CpuHasFma() { return false; }
#endif

SIMCLIC_FMA_TARGET void MixRowFma(float m, const float* old, const float* mean, float* out,
                                  int64_t d) {
  const float om = 1.0f - m;
  for (int64_t j = 0; j < d; ++j) out[j] = __builtin_fmaf(m, old[j], om * mean[j]);
}

void MixRowPortable(float m, const float* old, const float* mean, float* out, int64_t d) {
  const float om = 1.0f - m;
  for (int64_t j = 0; j < d; ++j) out[j] = std::fmaf(m, old[j], om * mean[j]);
}

void MixRow(float m, const float* old, const float* mean, float* out, int64_t d) {
  if (CpuHasFma()) {
    MixRowFma(m, old, mean, out, d);
  } else {
    MixRowPortable(m, old, mean, out, d);
  }
}

template <typename T>
inline float ToFloat(T v) {
  return static_cast<float>(v);
}

// Makes the variable's buffer private before writing it in place: a tensor
// read earlier (a ReadVariableOp still held by someone) keeps its value.
absl::Status MakePrivate(OpKernelContext* ctx, Var* var) {
  Tensor* t = var->tensor();
  if (t->RefCountIsOne()) return absl::OkStatus();
  Tensor copy;
  tensorflow::AllocatorAttributes attr;
  attr.set_gpu_compatible(true);
  attr.set_nic_compatible(true);
  TF_RETURN_IF_ERROR(ctx->allocate_temp(t->dtype(), t->shape(), &copy, attr));
  std::memcpy(copy.data(), t->data(), t->TotalBytes());
  *t = copy;
  return absl::OkStatus();
}

std::string OutOfRangeMessage(int64_t position, int64_t index, int64_t n) {
  return absl::StrCat(kHistoryOp, ": indices[", position, "] = ", index,
                      " is not in [0, ", n, "): the history bank has N = ", n,
                      " rows");
}

// ---------------------------------------------------------------------------
// CPU kernels

template <typename T>
class HistoryExchangeOp : public OpKernel {
 public:
  explicit HistoryExchangeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<Var> bank, visits;
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 0), &bank));
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 1), &visits));
    const Tensor& indices_t = ctx->input(2);
    const Tensor& values_t = ctx->input(3);
    const Tensor& momentum_t = ctx->input(4);
    OP_REQUIRES(ctx, indices_t.dims() == 1,
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": indices must be a vector, got shape ",
                    indices_t.shape().DebugString())));
    OP_REQUIRES(ctx, values_t.dims() == 2 && values_t.dim_size(0) == indices_t.dim_size(0),
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": values must be (B, d) with B = ",
                    indices_t.dim_size(0), ", got shape ",
                    values_t.shape().DebugString())));
    OP_REQUIRES(ctx, momentum_t.dims() == 0,
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": momentum must be a scalar")));
    OP_REQUIRES(ctx, bank.get() != visits.get(),
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": bank and visits must be different variables")));

    // Lock both variables, in increasing address order (TF's convention).
    Var* first = bank.get() < visits.get() ? bank.get() : visits.get();
    Var* second = bank.get() < visits.get() ? visits.get() : bank.get();
    tensorflow::mutex_lock lock_first(*first->mu());
    tensorflow::mutex_lock lock_second(*second->mu());

    OP_REQUIRES(ctx, bank->is_initialized && visits->is_initialized,
                absl::FailedPreconditionError(absl::StrCat(
                    kHistoryOp, ": the bank or visits variable is uninitialized")));
    Tensor* bank_t = bank->tensor();
    Tensor* visits_t = visits->tensor();
    OP_REQUIRES(ctx, bank_t->dtype() == tensorflow::DataTypeToEnum<T>::v(),
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": bank dtype ", DataTypeString(bank_t->dtype()),
                    " does not match the op's dtype attr ",
                    DataTypeString(tensorflow::DataTypeToEnum<T>::v()))));
    OP_REQUIRES(ctx, bank_t->dims() == 2,
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": bank must be (N, d), got ",
                    bank_t->shape().DebugString())));
    const int64_t n = bank_t->dim_size(0);
    const int64_t d = bank_t->dim_size(1);
    OP_REQUIRES(ctx, values_t.dim_size(1) == d,
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": values have ", values_t.dim_size(1),
                    " columns, the bank has d = ", d)));
    OP_REQUIRES(ctx, visits_t->dtype() == tensorflow::DT_INT32 && visits_t->dims() == 1 &&
                         visits_t->dim_size(0) == n,
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": visits must be int32 (N,) with N = ", n, ", got ",
                    DataTypeString(visits_t->dtype()), " ",
                    visits_t->shape().DebugString())));

    const int64_t batch = indices_t.dim_size(0);
    const int32_t* idx = indices_t.flat<int32_t>().data();
    // Out-of-range indices: an error before anything is written.
    for (int64_t k = 0; k < batch; ++k) {
      OP_REQUIRES(ctx, idx[k] >= 0 && idx[k] < n,
                  absl::InvalidArgumentError(OutOfRangeMessage(k, idx[k], n)));
    }

    Tensor* old_t = nullptr;
    Tensor* seen_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch, d}), &old_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({batch}), &seen_t));
    if (batch == 0) return;

    OP_REQUIRES_OK(ctx, MakePrivate(ctx, bank.get()));
    OP_REQUIRES_OK(ctx, MakePrivate(ctx, visits.get()));
    T* bank_data = bank_t->flat<T>().data();
    int32_t* visit_data = visits_t->flat<int32_t>().data();
    const float* values = values_t.flat<float>().data();
    const float m = momentum_t.scalar<float>()();
    float* old_rows = old_t->flat<float>().data();
    bool* seen = seen_t->flat<bool>().data();

    // Positions grouped by index; a stable sort keeps each group's positions
    // in ascending order, the summation order the specification fixes.
    std::vector<int64_t> order(batch);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [idx](int64_t a, int64_t b) { return idx[a] < idx[b]; });
    std::vector<int64_t> run_starts;  // Each run: one distinct index.
    for (int64_t s = 0; s < batch; ++s) {
      if (s == 0 || idx[order[s]] != idx[order[s - 1]]) run_starts.push_back(s);
    }
    const int64_t runs = static_cast<int64_t>(run_starts.size());
    run_starts.push_back(batch);
    // Runs touch distinct rows: they run in parallel on TF's CPU threads.
    auto work = [&](int64_t first_run, int64_t last_run) {
      std::vector<float> sum(d), old32(d), row(d);
      for (int64_t r = first_run; r < last_run; ++r) {
        const int64_t start = run_starts[r], end = run_starts[r + 1];
        const int32_t u = idx[order[start]];
        T* bank_row = bank_data + u * d;
        for (int64_t j = 0; j < d; ++j) old32[j] = ToFloat(bank_row[j]);
        const bool was_seen = visit_data[u] > 0;
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (int64_t s = start; s < end; ++s) {
          const int64_t k = order[s];
          const float* v = values + k * d;
          for (int64_t j = 0; j < d; ++j) sum[j] += v[j];
          std::memcpy(old_rows + k * d, old32.data(), d * sizeof(float));
          seen[k] = was_seen;
        }
        const float count = static_cast<float>(end - start);
        for (int64_t j = 0; j < d; ++j) sum[j] = sum[j] / count;  // The mean.
        const float* new_row = sum.data();
        if (was_seen) {
          MixRow(m, old32.data(), sum.data(), row.data(), d);
          new_row = row.data();
        }
        for (int64_t j = 0; j < d; ++j) bank_row[j] = static_cast<T>(new_row[j]);
        visit_data[u] += 1;
      }
    };
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor(runs, /*cost_per_unit=*/8 * d * (batch / std::max<int64_t>(runs, 1) + 1),
                      work);
  }
};

REGISTER_KERNEL_BUILDER(Name("SimclicHistoryExchange")
                            .Device(tensorflow::DEVICE_CPU)
                            .TypeConstraint<float>("dtype"),
                        HistoryExchangeOp<float>);
REGISTER_KERNEL_BUILDER(Name("SimclicHistoryExchange")
                            .Device(tensorflow::DEVICE_CPU)
                            .TypeConstraint<bfloat16>("dtype"),
                        HistoryExchangeOp<bfloat16>);

// The stateless key and counter TensorFlow derives from a shape-(2,) seed
// (StatelessRandomNormal's CPU kernel): one Philox call on the seeds.
tsl::random::PhiloxRandom PhiloxFromSeed(int32_t seed0, int32_t seed1) {
  const uint64_t s0 = static_cast<uint64_t>(static_cast<int64_t>(seed0));
  const uint64_t s1 = static_cast<uint64_t>(static_cast<int64_t>(seed1));
  tsl::random::PhiloxRandom::Key key;
  tsl::random::PhiloxRandom::ResultType counter;
  key[0] = 0x3ec8f720;
  key[1] = 0x02461e29;
  counter[0] = static_cast<uint32_t>(s0);
  counter[1] = static_cast<uint32_t>(s0 >> 32);
  counter[2] = static_cast<uint32_t>(s1);
  counter[3] = static_cast<uint32_t>(s1 >> 32);
  const auto mix = tsl::random::PhiloxRandom(counter, key)();
  key[0] = mix[0];
  key[1] = mix[1];
  counter[0] = counter[1] = 0;
  counter[2] = mix[2];
  counter[3] = mix[3];
  return tsl::random::PhiloxRandom(counter, key);
}

SIMCLIC_FMA_TARGET void AddNoiseFma(const float* x, const float* col_scale,
                                                const float* eps, float* out,
                                                int64_t rows, int64_t cols) {
  for (int64_t k = 0; k < rows; ++k) {
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t e = k * cols + j;
      out[e] = __builtin_fmaf(col_scale[j], eps[e], x[e]);
    }
  }
}

void AddNoisePortable(const float* x, const float* col_scale, const float* eps,
                      float* out, int64_t rows, int64_t cols) {
  for (int64_t k = 0; k < rows; ++k) {
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t e = k * cols + j;
      out[e] = std::fmaf(col_scale[j], eps[e], x[e]);
    }
  }
}

template <typename T>
class RepresentationNoiseOp : public OpKernel {
 public:
  explicit RepresentationNoiseOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    const Tensor& scale_t = ctx->input(1);
    const Tensor& seed_t = ctx->input(2);
    OP_REQUIRES(ctx, x_t.dims() >= 1,
                absl::InvalidArgumentError(absl::StrCat(kNoiseOp, ": x must have rank >= 1")));
    OP_REQUIRES(ctx, scale_t.dims() == 0,
                absl::InvalidArgumentError(absl::StrCat(kNoiseOp, ": scale must be a scalar")));
    OP_REQUIRES(ctx, seed_t.dims() == 1 && seed_t.dim_size(0) == 2,
                absl::InvalidArgumentError(absl::StrCat(
                    kNoiseOp, ": seed must have shape [2], got ",
                    seed_t.shape().DebugString())));
    Tensor* y_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_t.shape(), &y_t));
    const int64_t size = x_t.NumElements();
    if (size == 0) return;
    const int64_t rows = x_t.dim_size(0);
    const int64_t cols = size / rows;
    const T* x = x_t.flat<T>().data();
    T* y = y_t->flat<T>().data();
    const float scale = scale_t.scalar<float>()();
    const auto seed = seed_t.flat<int32_t>();

    std::vector<float> x32(size), eps(size), out(size);
    for (int64_t e = 0; e < size; ++e) x32[e] = ToFloat(x[e]);
    // Population std over axis 0: sum in row order, then divide by B.
    std::vector<float> mean(cols, 0.0f), var(cols, 0.0f), col_scale(cols);
    const float count = static_cast<float>(rows);
    for (int64_t k = 0; k < rows; ++k)
      for (int64_t j = 0; j < cols; ++j) mean[j] += x32[k * cols + j];
    for (int64_t j = 0; j < cols; ++j) mean[j] = mean[j] / count;
    for (int64_t k = 0; k < rows; ++k) {
      for (int64_t j = 0; j < cols; ++j) {
        const float dev = x32[k * cols + j] - mean[j];
        var[j] += dev * dev;
      }
    }
    for (int64_t j = 0; j < cols; ++j) col_scale[j] = scale * std::sqrt(var[j] / count);

    // eps: the stream of tf.random.stateless_normal(x.shape, seed) on CPU:
    // group g of 4 normals comes from the Philox counter skipped g times, so
    // the groups are drawn in parallel and the stream does not depend on it.
    const tsl::random::PhiloxRandom base = PhiloxFromSeed(seed(0), seed(1));
    constexpr int64_t kGroup = 4;
    const int64_t groups = (size + kGroup - 1) / kGroup;
    auto draw = [&](int64_t first, int64_t last) {
      tsl::random::PhiloxRandom gen = base;
      gen.Skip(first);
      tsl::random::NormalDistribution<tsl::random::PhiloxRandom, float> normal;
      for (int64_t g = first; g < last; ++g) {
        const auto sample = normal(&gen);
        const int64_t e = g * kGroup;
        const int64_t take = std::min<int64_t>(kGroup, size - e);
        for (int64_t i = 0; i < take; ++i) eps[e + i] = sample[i];
      }
    };
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor(groups, /*cost_per_unit=*/kGroup * 70, draw);
    // Rows in parallel: y = fma(scale * std, eps, x), rounded to x's dtype.
    auto add = [&](int64_t first, int64_t last) {
      const int64_t offset = first * cols;
      if (CpuHasFma()) {
        AddNoiseFma(x32.data() + offset, col_scale.data(), eps.data() + offset,
                    out.data() + offset, last - first, cols);
      } else {
        AddNoisePortable(x32.data() + offset, col_scale.data(), eps.data() + offset,
                         out.data() + offset, last - first, cols);
      }
      for (int64_t e = offset; e < last * cols; ++e) y[e] = static_cast<T>(out[e]);
    };
    pool->ParallelFor(rows, /*cost_per_unit=*/4 * cols, add);
  }
};

#define SIMCLIC_REGISTER_NOISE(T)                                        \
  REGISTER_KERNEL_BUILDER(Name("SimclicRepresentationNoise")             \
                              .Device(tensorflow::DEVICE_CPU)            \
                              .TypeConstraint<T>("T"),                   \
                          RepresentationNoiseOp<T>);
SIMCLIC_REGISTER_NOISE(float)
SIMCLIC_REGISTER_NOISE(bfloat16)
SIMCLIC_REGISTER_NOISE(half)
#undef SIMCLIC_REGISTER_NOISE

// ---------------------------------------------------------------------------
// XLA lowerings

absl::Status ToPrimitive(DataType dtype, xla::PrimitiveType* type) {
  switch (dtype) {
    case tensorflow::DT_FLOAT:
      *type = xla::F32;
      return absl::OkStatus();
    case tensorflow::DT_BFLOAT16:
      *type = xla::BF16;
      return absl::OkStatus();
    case tensorflow::DT_HALF:
      *type = xla::F16;
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("simclic ops: unsupported dtype ", DataTypeString(dtype)));
  }
}

// rows[indices] of a rank-1 or rank-2 operand (clamped by XLA's gather).
xla::XlaOp GatherRows(xla::XlaOp operand, xla::XlaOp indices, int64_t cols, bool matrix) {
  xla::GatherDimensionNumbers dims;
  if (matrix) dims.add_offset_dims(1);
  dims.add_collapsed_slice_dims(0);
  dims.add_start_index_map(0);
  dims.set_index_vector_dim(1);
  std::vector<int64_t> slice = matrix ? std::vector<int64_t>{1, cols} : std::vector<int64_t>{1};
  return xla::Gather(operand, indices, dims, slice);
}

// operand[indices[k]] <- combine(operand[indices[k]], updates[k]), k in order.
xla::XlaOp ScatterRows(xla::XlaOp operand, xla::XlaOp indices, xla::XlaOp updates,
                       bool matrix, const xla::XlaComputation& combiner) {
  xla::ScatterDimensionNumbers dims;
  if (matrix) dims.add_update_window_dims(1);
  dims.add_inserted_window_dims(0);
  dims.add_scatter_dims_to_operand_dims(0);
  dims.set_index_vector_dim(1);
  return xla::Scatter(operand, indices, updates, combiner, dims);
}

xla::XlaComputation AssignComputation(xla::PrimitiveType type) {
  xla::XlaBuilder b("simclic_assign");
  xla::Parameter(&b, 0, xla::ShapeUtil::MakeShape(type, {}), "old");
  xla::Parameter(&b, 1, xla::ShapeUtil::MakeShape(type, {}), "new");
  return b.Build().value();
}

xla::XlaComputation AddComputation(xla::PrimitiveType type) {
  xla::XlaBuilder b("simclic_add");
  auto x = xla::Parameter(&b, 0, xla::ShapeUtil::MakeShape(type, {}), "x");
  auto y = xla::Parameter(&b, 1, xla::ShapeUtil::MakeShape(type, {}), "y");
  xla::Add(x, y);
  return b.Build().value();
}

// Per position, the mean of `values` over the positions holding its index:
// a stable sort of the indices, each run's id = the sorted position of its
// first element (a prefix max by doubling, O(B log B)), the sums by a
// scatter-add over B segments in position order, divided by the counts.
xla::XlaOp SegmentMean(xla::XlaBuilder* b, xla::XlaOp indices, xla::XlaOp values,
                       int64_t batch, int64_t d) {
  xla::XlaOp position = xla::Iota(b, xla::S32, batch);
  xla::XlaOp sorted = xla::Sort({indices, position},
                                xla::CreateScalarLtComputation({xla::S32, xla::S32}, b),
                                /*dimension=*/0, /*is_stable=*/true);
  xla::XlaOp sorted_indices = xla::GetTupleElement(sorted, 0);
  xla::XlaOp permutation = xla::GetTupleElement(sorted, 1);
  xla::XlaOp run_start;
  if (batch > 1) {
    xla::XlaOp prev = xla::Slice(sorted_indices, {0}, {batch - 1}, {1});
    xla::XlaOp next = xla::Slice(sorted_indices, {1}, {batch}, {1});
    xla::XlaOp starts = xla::ConcatInDim(
        b, {xla::ConstantR1<bool>(b, {true}), xla::Ne(next, prev)}, 0);
    run_start = xla::Select(starts, position, xla::Broadcast(xla::ConstantR0<int32_t>(b, 0), {batch}));
    for (int64_t shift = 1; shift < batch; shift *= 2) {
      xla::PaddingConfig pad;
      auto* dim = pad.add_dimensions();
      dim->set_edge_padding_low(shift);
      dim->set_edge_padding_high(0);
      xla::XlaOp shifted = xla::Pad(xla::Slice(run_start, {0}, {batch - shift}, {1}),
                                    xla::ConstantR0<int32_t>(b, 0), pad);
      run_start = xla::Max(run_start, shifted);
    }
  } else {
    run_start = xla::Broadcast(xla::ConstantR0<int32_t>(b, 0), {batch});
  }
  // Back to positions: sort by the permutation, carrying the run ids.
  xla::XlaOp segment = xla::GetTupleElement(
      xla::Sort({permutation, run_start},
                xla::CreateScalarLtComputation({xla::S32, xla::S32}, b), 0, true),
      1);
  xla::XlaComputation add = AddComputation(xla::F32);
  xla::XlaOp sums = ScatterRows(xla::Broadcast(xla::ConstantR0<float>(b, 0.0f), {batch, d}),
                                segment, values, true, add);
  xla::XlaOp counts = ScatterRows(xla::Broadcast(xla::ConstantR0<float>(b, 0.0f), {batch}),
                                  segment, xla::Broadcast(xla::ConstantR0<float>(b, 1.0f), {batch}),
                                  false, add);
  return xla::Div(GatherRows(sums, segment, d, true),
                  xla::BroadcastInDim(GatherRows(counts, segment, 1, false), {batch, d}, {0}));
}

// The XLA:CPU custom call behind a bfloat16 bank's scatter (see Compile), an
// XLA FFI handler: out[target[k]] <- rows[k] for the targets in [0, N), on
// 16-bit elements. `out` aliases the `bank` operand (output_operand_aliasing),
// so XLA hands the handler the bank's own buffer when it can donate it.
constexpr char kScatterRows16[] = "SimclicScatterRows16";

xla::ffi::Error ScatterRows16(xla::ffi::AnyBuffer bank, xla::ffi::Buffer<xla::ffi::S32> target,
                              xla::ffi::AnyBuffer rows, xla::ffi::Result<xla::ffi::AnyBuffer> out) {
  const auto dims = bank.dimensions();
  if (dims.size() != 2 || bank.element_type() != xla::ffi::DataType::BF16 ||
      rows.element_type() != xla::ffi::DataType::BF16) {
    return xla::ffi::Error::InvalidArgument("SimclicScatterRows16: bf16 (N, d) bank expected");
  }
  const int64_t n = dims[0], d = dims[1];
  const int64_t batch = target.element_count();
  auto* dest = static_cast<uint16_t*>(out->untyped_data());
  const auto* source = static_cast<const uint16_t*>(bank.untyped_data());
  const auto* row_data = static_cast<const uint16_t*>(rows.untyped_data());
  const int32_t* where = target.typed_data();
  if (dest != source) std::memcpy(dest, source, n * d * sizeof(uint16_t));
  for (int64_t k = 0; k < batch; ++k) {
    const int64_t row = where[k];
    if (row >= 0 && row < n) std::memcpy(dest + row * d, row_data + k * d, d * sizeof(uint16_t));
  }
  return xla::ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(kScatterRows16Handler, ScatterRows16,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>());

}  // namespace
}  // namespace simclic

XLA_FFI_REGISTER_HANDLER(xla::ffi::GetXlaFfiApi(), "SimclicScatterRows16", "Host",
                         simclic::kScatterRows16Handler);

namespace simclic {
namespace {

class HistoryExchangeXlaOp : public XlaOpKernel {
 public:
  explicit HistoryExchangeXlaOp(OpKernelConstruction* ctx)
      : XlaOpKernel(ctx),
        on_cpu_(ctx->device_type().type_string() == tensorflow::DEVICE_CPU_XLA_JIT) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dtype", &dtype_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    xla::XlaBuilder* b = ctx->builder();
    xla::PrimitiveType storage;
    OP_REQUIRES_OK(ctx, ToPrimitive(dtype_, &storage));
    TensorShape bank_shape, visits_shape;
    xla::XlaOp bank, visits;
    OP_REQUIRES_OK(ctx, ctx->ReadVariableInput(0, dtype_, &bank_shape, &bank));
    OP_REQUIRES_OK(ctx, ctx->ReadVariableInput(1, tensorflow::DT_INT32, &visits_shape, &visits));
    const TensorShape indices_shape = ctx->InputShape(2);
    const TensorShape values_shape = ctx->InputShape(3);
    OP_REQUIRES(ctx, bank_shape.dims() == 2,
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": bank must be (N, d), got ", bank_shape.DebugString())));
    const int64_t n = bank_shape.dim_size(0);
    const int64_t d = bank_shape.dim_size(1);
    OP_REQUIRES(ctx, visits_shape.dims() == 1 && visits_shape.dim_size(0) == n,
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": visits must be (N,) with N = ", n, ", got ",
                    visits_shape.DebugString())));
    OP_REQUIRES(ctx, indices_shape.dims() == 1,
                absl::InvalidArgumentError(absl::StrCat(kHistoryOp, ": indices must be a vector")));
    const int64_t batch = indices_shape.dim_size(0);
    OP_REQUIRES(ctx, values_shape.dims() == 2 && values_shape.dim_size(0) == batch &&
                         values_shape.dim_size(1) == d,
                absl::InvalidArgumentError(absl::StrCat(
                    kHistoryOp, ": values must be (", batch, ", ", d, "), got ",
                    values_shape.DebugString())));
    OP_REQUIRES(ctx, ctx->InputShape(4).dims() == 0,
                absl::InvalidArgumentError(absl::StrCat(kHistoryOp, ": momentum must be a scalar")));
    if (batch == 0) {  // Nothing read, nothing written.
      ctx->SetOutput(0, xla::Broadcast(xla::ConstantR0<float>(b, 0.0f), {0, d}));
      ctx->SetOutput(1, xla::Broadcast(xla::ConstantR0<bool>(b, false), {0}));
      return;
    }
    xla::XlaOp indices = ctx->Input(2);
    xla::XlaOp values = ctx->Input(3);
    xla::XlaOp m = ctx->Input(4);

    xla::XlaOp valid = xla::And(xla::Ge(indices, xla::ConstantR0<int32_t>(b, 0)),
                                xla::Lt(indices, xla::ConstantR0<int32_t>(b, static_cast<int32_t>(n))));
    xla::XlaOp old_rows = GatherRows(bank, indices, d, true);
    xla::XlaOp old_visits = GatherRows(visits, indices, 1, false);
    xla::XlaOp old32 = xla::ConvertElementType(old_rows, xla::F32);
    xla::XlaOp seen = xla::Gt(old_visits, xla::ConstantR0<int32_t>(b, 0));
    xla::XlaOp mean = SegmentMean(b, indices, values, batch, d);
    // As the TF implementation: where(seen, m * old + (1 - m) * mean, mean).
    // The new rows depend on the gathered old ones, so XLA orders the gather
    // before the scatter and updates the buffer in place (no N x d copy).
    xla::XlaOp mixed = xla::Add(xla::Mul(m, old32),
                                xla::Mul(xla::Sub(xla::ConstantR0<float>(b, 1.0f), m), mean));
    xla::XlaOp seen2d = xla::BroadcastInDim(seen, {batch, d}, {0});
    xla::XlaOp new_rows = xla::ConvertElementType(xla::Select(seen2d, mixed, mean), storage);
    xla::XlaOp new_visits = xla::Add(old_visits, xla::ConstantR0<int32_t>(b, 1));
    // Out-of-range positions scatter to row N: XLA skips out-of-bounds updates.
    xla::XlaOp target = xla::Select(valid, indices,
                                    xla::Broadcast(xla::ConstantR0<int32_t>(b, static_cast<int32_t>(n)), {batch}));
    xla::XlaOp new_bank;
    if (storage == xla::BF16 && on_cpu_) {
      // XLA:CPU has no bfloat16 scatter: its float normalisation would
      // convert the WHOLE bank to float32 and back around one (O(N x d) per
      // step, and twice the bank in temporaries). A custom call copies the B
      // rows instead, in place (its output aliases the bank operand).
      new_bank = xla::CustomCall(
          b, kScatterRows16, {bank, target, new_rows},
          xla::ShapeUtil::MakeShape(xla::BF16, {n, d}), /*opaque=*/"",
          /*has_side_effect=*/false,
          /*output_operand_aliasing=*/{{xla::ShapeIndex{}, {0, xla::ShapeIndex{}}}},
          /*literal=*/nullptr, xla::CustomCallSchedule::SCHEDULE_NONE,
          xla::CustomCallApiVersion::API_VERSION_TYPED_FFI);
    } else {
      new_bank = ScatterRows(bank, target, new_rows, true, AssignComputation(storage));
    }
    OP_REQUIRES_OK(ctx, ctx->AssignVariable(0, dtype_, new_bank));
    OP_REQUIRES_OK(ctx, ctx->AssignVariable(
                            1, tensorflow::DT_INT32,
                            ScatterRows(visits, target, new_visits, false, AssignComputation(xla::S32))));
    xla::XlaOp valid2d = xla::BroadcastInDim(valid, {batch, d}, {0});
    xla::XlaOp nan = xla::Broadcast(xla::ConstantR0<float>(b, std::nanf("")), {batch, d});
    ctx->SetOutput(0, xla::Select(valid2d, old32, nan));
    ctx->SetOutput(1, xla::Or(seen, xla::Not(valid)));
  }

 private:
  DataType dtype_;
  bool on_cpu_;
};

REGISTER_XLA_OP(Name("SimclicHistoryExchange").TypeConstraint("dtype", {tensorflow::DT_FLOAT, tensorflow::DT_BFLOAT16}),
                HistoryExchangeXlaOp);

// Philox-4x32-10 on XLA arrays (elementwise; scalars broadcast).
std::array<xla::XlaOp, 4> PhiloxXla(xla::XlaBuilder* b, std::array<xla::XlaOp, 4> c,
                                    std::array<xla::XlaOp, 2> k) {
  const xla::XlaOp m0 = xla::ConstantR0<uint64_t>(b, 0xD2511F53ull);
  const xla::XlaOp m1 = xla::ConstantR0<uint64_t>(b, 0xCD9E8D57ull);
  const xla::XlaOp w0 = xla::ConstantR0<uint32_t>(b, 0x9E3779B9u);
  const xla::XlaOp w1 = xla::ConstantR0<uint32_t>(b, 0xBB67AE85u);
  const xla::XlaOp s32 = xla::ConstantR0<uint64_t>(b, 32);
  for (int round = 0; round < 10; ++round) {
    xla::XlaOp p0 = xla::Mul(xla::ConvertElementType(c[0], xla::U64), m0);
    xla::XlaOp p1 = xla::Mul(xla::ConvertElementType(c[2], xla::U64), m1);
    xla::XlaOp lo0 = xla::ConvertElementType(p0, xla::U32);
    xla::XlaOp hi0 = xla::ConvertElementType(xla::ShiftRightLogical(p0, s32), xla::U32);
    xla::XlaOp lo1 = xla::ConvertElementType(p1, xla::U32);
    xla::XlaOp hi1 = xla::ConvertElementType(xla::ShiftRightLogical(p1, s32), xla::U32);
    c = {xla::Xor(xla::Xor(hi1, c[1]), k[0]), lo1, xla::Xor(xla::Xor(hi0, c[3]), k[1]), lo0};
    if (round < 9) {
      k = {xla::Add(k[0], w0), xla::Add(k[1], w1)};
    }
  }
  return c;
}

xla::XlaOp Uint32ToFloatXla(xla::XlaBuilder* b, xla::XlaOp bits) {
  xla::XlaOp mantissa = xla::And(bits, xla::ConstantR0<uint32_t>(b, 0x7fffffu));
  xla::XlaOp one_to_two = xla::BitcastConvertType(
      xla::Or(mantissa, xla::ConstantR0<uint32_t>(b, 127u << 23)), xla::F32);
  return xla::Sub(one_to_two, xla::ConstantR0<float>(b, 1.0f));
}

// eps of shape [size] from the int32[2] seed: the CPU kernel's stream.
xla::XlaOp NormalFromSeedXla(xla::XlaBuilder* b, xla::XlaOp seed, int64_t size) {
  auto word = [&](int i) { return xla::Reshape(xla::Slice(seed, {i}, {i + 1}, {1}), {}); };
  auto low = [&](xla::XlaOp s) { return xla::BitcastConvertType(s, xla::U32); };
  auto high = [&](xla::XlaOp s) {  // Sign extension of the int32 seed to 64 bits.
    return xla::Select(xla::Lt(s, xla::ConstantR0<int32_t>(b, 0)),
                       xla::ConstantR0<uint32_t>(b, 0xffffffffu), xla::ConstantR0<uint32_t>(b, 0u));
  };
  xla::XlaOp s0 = word(0), s1 = word(1);
  std::array<xla::XlaOp, 4> mix = PhiloxXla(
      b, {low(s0), high(s0), low(s1), high(s1)},
      {xla::ConstantR0<uint32_t>(b, 0x3ec8f720u), xla::ConstantR0<uint32_t>(b, 0x02461e29u)});
  const int64_t groups = (size + 3) / 4;
  // Group g uses the counter (g, 0, mix[2], mix[3]) (size < 2^34 here).
  xla::XlaOp g = xla::Iota(b, xla::U32, groups);
  xla::XlaOp zero = xla::Broadcast(xla::ConstantR0<uint32_t>(b, 0u), {groups});
  std::array<xla::XlaOp, 4> bits = PhiloxXla(
      b, {g, zero, xla::Broadcast(mix[2], {groups}), xla::Broadcast(mix[3], {groups})},
      {mix[0], mix[1]});
  // Box-Muller on the pairs (bits0, bits1) and (bits2, bits3), as TF's
  // BoxMullerFloat: u1 clamped at 1e-7, v1 = float(2 pi (double) * u(x1)).
  xla::XlaOp x0 = xla::ConcatInDim(b, {xla::Reshape(bits[0], {groups, 1}), xla::Reshape(bits[2], {groups, 1})}, 1);
  xla::XlaOp x1 = xla::ConcatInDim(b, {xla::Reshape(bits[1], {groups, 1}), xla::Reshape(bits[3], {groups, 1})}, 1);
  xla::XlaOp u1 = xla::Max(Uint32ToFloatXla(b, x0), xla::ConstantR0<float>(b, 1.0e-7f));
  xla::XlaOp v1 = xla::ConvertElementType(
      xla::Mul(xla::ConstantR0<double>(b, 2.0 * M_PI),
               xla::ConvertElementType(Uint32ToFloatXla(b, x1), xla::F64)),
      xla::F32);
  xla::XlaOp u2 = xla::Sqrt(xla::Mul(xla::ConstantR0<float>(b, -2.0f), xla::Log(u1)));
  xla::XlaOp f0 = xla::Mul(xla::Sin(v1), u2);
  xla::XlaOp f1 = xla::Mul(xla::Cos(v1), u2);
  xla::XlaOp all = xla::ConcatInDim(
      b, {xla::Reshape(f0, {groups, 2, 1}), xla::Reshape(f1, {groups, 2, 1})}, 2);
  return xla::Slice(xla::Reshape(all, {groups * 4}), {0}, {size}, {1});
}

class RepresentationNoiseXlaOp : public XlaOpKernel {
 public:
  explicit RepresentationNoiseXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &dtype_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    xla::XlaBuilder* b = ctx->builder();
    xla::PrimitiveType type;
    OP_REQUIRES_OK(ctx, ToPrimitive(dtype_, &type));
    const TensorShape x_shape = ctx->InputShape(0);
    OP_REQUIRES(ctx, x_shape.dims() >= 1,
                absl::InvalidArgumentError(absl::StrCat(kNoiseOp, ": x must have rank >= 1")));
    const TensorShape seed_shape = ctx->InputShape(2);
    OP_REQUIRES(ctx, seed_shape.dims() == 1 && seed_shape.dim_size(0) == 2,
                absl::InvalidArgumentError(absl::StrCat(
                    kNoiseOp, ": seed must have shape [2], got ", seed_shape.DebugString())));
    const int64_t size = x_shape.num_elements();
    OP_REQUIRES(ctx, size < (int64_t{1} << 34),
                absl::InvalidArgumentError(absl::StrCat(kNoiseOp, ": x is too large")));
    if (size == 0) {
      ctx->SetOutput(0, ctx->Input(0));
      return;
    }
    const int64_t rows = x_shape.dim_size(0);
    const int64_t cols = size / rows;
    std::vector<int64_t> dims;
    for (int i = 0; i < x_shape.dims(); ++i) dims.push_back(x_shape.dim_size(i));
    xla::XlaOp x32 = xla::Reshape(xla::ConvertElementType(ctx->Input(0), xla::F32), {rows, cols});
    xla::XlaOp scale = ctx->Input(1);
    xla::XlaComputation add = AddComputation(xla::F32);
    xla::XlaOp count = xla::ConstantR0<float>(b, static_cast<float>(rows));
    xla::XlaOp mean = xla::Div(xla::Reduce(x32, xla::ConstantR0<float>(b, 0.0f), add, {0}), count);
    xla::XlaOp dev = xla::Sub(x32, xla::BroadcastInDim(mean, {rows, cols}, {1}));
    xla::XlaOp var = xla::Div(
        xla::Reduce(xla::Mul(dev, dev), xla::ConstantR0<float>(b, 0.0f), add, {0}), count);
    xla::XlaOp col_scale = xla::Mul(scale, xla::Sqrt(var));
    xla::XlaOp eps = xla::Reshape(NormalFromSeedXla(b, ctx->Input(2), size), {rows, cols});
    xla::XlaOp y = xla::Add(x32, xla::Mul(xla::BroadcastInDim(col_scale, {rows, cols}, {1}), eps));
    ctx->SetOutput(0, xla::Reshape(xla::ConvertElementType(y, type), dims));
  }

 private:
  DataType dtype_;
};

REGISTER_XLA_OP(Name("SimclicRepresentationNoise")
                    .TypeConstraint("T", {tensorflow::DT_FLOAT, tensorflow::DT_BFLOAT16,
                                          tensorflow::DT_HALF}),
                RepresentationNoiseXlaOp);

// ---------------------------------------------------------------------------
// Late XLA kernel registration.
//
// TensorFlow turns the REGISTER_XLA_OP registrations into kernels for its JIT
// devices (XLA_CPU_JIT, XLA_GPU_JIT) once per process, at the first XLA
// compilation (XlaOpRegistry::RegisterCompilationKernels). A library loaded
// after that point has its registrations recorded but no JIT kernels, so a
// jit-compiled function using its ops fails with "no registered kernel". This
// function detects that case and registers the kernels the same way.

struct XlaKernelSpec {
  const char* op;
  const char* type_attr;
  std::vector<DataType> types;
  OpKernel* (*factory)(OpKernelConstruction*);
};

OpKernel* MakeHistoryXla(OpKernelConstruction* ctx) { return new HistoryExchangeXlaOp(ctx); }
OpKernel* MakeNoiseXla(OpKernelConstruction* ctx) { return new RepresentationNoiseXlaOp(ctx); }

bool HasKernel(const std::string& device, const std::string& op, const char* type_attr,
               DataType type) {
  tensorflow::NodeDef node;
  node.set_name("simclic_probe");
  node.set_op(op);
  if (type_attr != nullptr) {
    tensorflow::AttrValue value;
    value.set_type(type);
    (*node.mutable_attr())[type_attr] = value;
  }
  const tensorflow::KernelDef* def = nullptr;
  return tensorflow::FindKernelDef(tensorflow::DeviceType(device), node, &def, nullptr).ok();
}

}  // namespace
}  // namespace simclic

// Returns the number of JIT kernels registered here: 0 when TensorFlow has
// not collected its XLA kernels yet (it will include these ops when it does)
// or when they are registered already.
extern "C" int SimclicRegisterXlaKernels() {
  using namespace simclic;  // NOLINT
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  // NoOp has an XLA kernel on every backend: present iff the collection ran.
  if (!HasKernel(tensorflow::DEVICE_CPU_XLA_JIT, "NoOp", nullptr, tensorflow::DT_INVALID)) {
    return 0;
  }
  static const std::vector<XlaKernelSpec>* specs = new std::vector<XlaKernelSpec>{
      {kHistoryOp, "dtype", {tensorflow::DT_FLOAT, tensorflow::DT_BFLOAT16}, MakeHistoryXla},
      {kNoiseOp, "T", {tensorflow::DT_FLOAT, tensorflow::DT_BFLOAT16, tensorflow::DT_HALF},
       MakeNoiseXla},
  };
  int registered = 0;
  for (const std::string& backend : tensorflow::XlaOpRegistry::BackendNames()) {
    for (const XlaKernelSpec& spec : *specs) {
      if (HasKernel(backend, spec.op, spec.type_attr, spec.types[0])) continue;
      auto* def = new tensorflow::KernelDef;
      def->set_op(spec.op);
      def->set_device_type(backend);
      auto* constraint = def->add_constraint();
      constraint->set_name(spec.type_attr);
      for (DataType t : spec.types) {
        constraint->mutable_allowed_values()->mutable_list()->add_type(t);
      }
      // Kept for the life of the process, as TensorFlow's own registrars.
      new tensorflow::kernel_factory::OpKernelRegistrar(def, "XlaJitOp", spec.factory);
      ++registered;
    }
  }
  return registered;
}
