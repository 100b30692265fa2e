// A MoE layer's experts on the CPU with few parallel regions: compiled on first use by
// nanoq_plugin/kernels/cpu_grouped.py and registered as `nano_cpu::` ops.
//
// grouped_rows_: one linear op run for several weights (the experts) on row ranges of one input, all in one
// parallel region over the weights.
//
// Why: at decode a MoE layer gives each expert a few rows, and each expert's linear op (PyTorch's int4 kernel, our
// int8 and AVX2 ones) opens its own parallel region to split that expert's outputs over the threads: ~30 regions per
// projection per layer, each a barrier where every thread waits for the slowest (on shared cores, for one that
// was descheduled). Here the threads split the experts instead, and each expert's op runs inside the region on
// one thread (ATen's parallel_for runs inline there), so a projection waits at one barrier.
//
//   tensor / list    dtype     shape                         meaning
//   out              x.dtype   [R, N]                        written: rows bounds[2i]..bounds[2i+1]-1 by weight i
//   x                any       [X, K]                        contiguous input rows
//   gather           int64?    [R]                           row r of the input is x[gather[r]] (None: x[r])
//   bounds           int[]     [2 * W]                       (start, end) input rows of weight i = 0..W-1
//   op               str                                     "namespace::name" of an op `(Tensor x, ...) -> Tensor`
//   tensors          Tensor[]  [W * T]                       weight i's tensor arguments, in the op's order
//   ints             int[]     [W * I]                       weight i's int arguments, in the op's order
//
// The op's arguments after `x` are filled from its schema: each Tensor from weight i's tensors, each int from
// its ints, in order (e.g. aten::_weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros)). Its result for
// the rows [end - start, N] is copied into `out`; the numerics are exactly the op's.
//
// weighted_row_sum: out[index[r]] += src[r] * weights[r] for r = 0..R-1 in order, in float32 from zero (a MoE
// layer's combine: each token's sum added up expert by expert, bit for bit as `index_add_` of `src.float() *
// weights[:, None]` into float32 zeros: built with -ffp-contract=off so no multiply-add is fused), then rounded to
// `dtype` as `.to(dtype)` rounds. Parallel over column ranges of at least kCombineGrain products, so a decode step's
// combine runs on one thread, with no barrier.
//
//   src     f32/bf16/f16 [R, N]    rows to add;  weights f32 [R] or None (1);  index int64 [R] target rows
//   out     dtype        [T, N]    T = targets; rows no index names are 0

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

namespace {

c10::OperatorHandle find_op(const std::string& op) {
  const auto split = op.find("::");
  TORCH_CHECK(split != std::string::npos, "grouped_rows_: op '", op, "' is not 'namespace::name'");
  const auto dot = op.find('.', split);
  const std::string name = op.substr(0, dot);
  const std::string overload = dot == std::string::npos ? "" : op.substr(dot + 1);
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
}

constexpr int64_t kCombineGrain = 1 << 15;  // products per thread before a combine is split: ATen's own grain

void grouped_rows_(at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& gather,
                   at::IntArrayRef bounds, const std::string& op, at::TensorList tensors, at::IntArrayRef ints) {
  TORCH_CHECK(bounds.size() % 2 == 0, "grouped_rows_: bounds has ", bounds.size(), " entries, expected 2 per weight");
  const int64_t weights = static_cast<int64_t>(bounds.size() / 2);
  if (weights == 0) {
    return;
  }
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "grouped_rows_: x must be contiguous [R, K], got ", x.sizes());
  const int64_t rows = gather ? gather->numel() : x.size(0);
  TORCH_CHECK(!gather || (gather->dim() == 1 && gather->scalar_type() == at::kLong),
              "grouped_rows_: gather must be int64 [R]");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows, "grouped_rows_: out ", out.sizes(), " must be [", rows,
              ", N]");
  const auto handle = find_op(op);
  const auto& arguments = handle.schema().arguments();
  int64_t tensor_args = 0, int_args = 0;
  for (size_t a = 1; a < arguments.size(); ++a) {
    const auto kind = arguments[a].type()->kind();
    TORCH_CHECK(kind == c10::TypeKind::TensorType || kind == c10::TypeKind::IntType, "grouped_rows_: argument '",
                arguments[a].name(), "' of ", op, " is neither a Tensor nor an int");
    (kind == c10::TypeKind::TensorType ? tensor_args : int_args) += 1;
  }
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == weights * tensor_args, "grouped_rows_: ", tensors.size(),
              " tensors for ", weights, " weights of ", op, ", expected ", weights * tensor_args);
  TORCH_CHECK(static_cast<int64_t>(ints.size()) == weights * int_args, "grouped_rows_: ", ints.size(),
              " ints for ", weights, " weights of ", op, ", expected ", weights * int_args);
  for (int64_t i = 0; i < weights; ++i) {
    TORCH_CHECK(0 <= bounds[2 * i] && bounds[2 * i] < bounds[2 * i + 1] && bounds[2 * i + 1] <= rows,
                "grouped_rows_: rows [", bounds[2 * i], ", ", bounds[2 * i + 1], ") of weight ", i,
                " are not a non-empty range of the ", rows, " rows");
  }
  // Threads take whole weights: at a few rows a weight's cost is reading it, the same for every weight. Each runs
  // the op under the caller's thread-local state (grad and inference mode, dispatch keys), as the caller would.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, weights, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t start = bounds[2 * i], stop = bounds[2 * i + 1];
      torch::jit::Stack stack;
      stack.reserve(arguments.size());
      stack.emplace_back(gather ? x.index_select(0, gather->slice(0, start, stop)) : x.slice(0, start, stop));
      int64_t next_tensor = i * tensor_args, next_int = i * int_args;
      for (size_t a = 1; a < arguments.size(); ++a) {
        if (arguments[a].type()->kind() == c10::TypeKind::TensorType) {
          stack.emplace_back(tensors[next_tensor++]);
        } else {
          stack.emplace_back(ints[next_int++]);
        }
      }
      handle.callBoxed(stack);
      out.slice(0, start, stop).copy_(stack.at(0).toTensor());
    }
  });
}

template <typename In, typename Out>
void weighted_row_sum_columns(const In* in, const float* w, const int64_t* target, Out* out, int64_t rows,
                              int64_t cols, int64_t targets, int64_t c0, int64_t c1) {
  const int64_t width = c1 - c0;
  std::vector<float> acc(static_cast<size_t>(targets * width), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const In* row = in + r * cols + c0;
    float* into = acc.data() + target[r] * width;
    const float factor = w == nullptr ? 1.0f : w[r];
    for (int64_t c = 0; c < width; ++c) {
      const float value = static_cast<float>(row[c]);
      into[c] += w == nullptr ? value : value * factor;
    }
  }
  for (int64_t t = 0; t < targets; ++t) {
    for (int64_t c = 0; c < width; ++c) {
      out[t * cols + c0 + c] = static_cast<Out>(acc[t * width + c]);
    }
  }
}

at::Tensor weighted_row_sum(const at::Tensor& src, const std::optional<at::Tensor>& weights, const at::Tensor& index,
                            int64_t targets, at::ScalarType dtype) {
  TORCH_CHECK(src.dim() == 2, "weighted_row_sum: src must be [R, N], got ", src.sizes());
  const int64_t rows = src.size(0), cols = src.size(1);
  TORCH_CHECK(index.dim() == 1 && index.numel() == rows && index.scalar_type() == at::kLong,
              "weighted_row_sum: index must be int64 [", rows, "]");
  TORCH_CHECK(!weights || (weights->numel() == rows && weights->scalar_type() == at::kFloat),
              "weighted_row_sum: weights must be float32 [", rows, "]");
  const at::Tensor values = src.contiguous();
  const at::Tensor where = index.contiguous();
  const at::Tensor scale = weights ? weights->contiguous() : at::Tensor();
  const int64_t* target = where.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(0 <= target[r] && target[r] < targets, "weighted_row_sum: index ", target[r], " of row ", r,
                " is outside the ", targets, " targets");
  }
  at::Tensor out = at::empty({targets, cols}, src.options().dtype(dtype));
  const float* w = weights ? scale.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kCombineGrain / std::max<int64_t>(1, rows));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "weighted_row_sum_in", [&] {
    using In = scalar_t;
    const In* in = values.data_ptr<In>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "weighted_row_sum_out", [&] {
      scalar_t* into = out.data_ptr<scalar_t>();
      at::parallel_for(0, cols, grain, [&](int64_t c0, int64_t c1) {
        weighted_row_sum_columns<In, scalar_t>(in, w, target, into, rows, cols, targets, c0, c1);
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nano_cpu, m) {
  m.def("grouped_rows_(Tensor(a!) out, Tensor x, Tensor? gather, int[] bounds, str op, Tensor[] tensors, "
        "int[] ints) -> ()");
  m.def("weighted_row_sum(Tensor src, Tensor? weights, Tensor index, int targets, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(nano_cpu, CPU, m) {
  m.impl("grouped_rows_", grouped_rows_);
  m.impl("weighted_row_sum", weighted_row_sum);
}
