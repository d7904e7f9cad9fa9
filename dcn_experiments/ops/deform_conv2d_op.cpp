// The public operator's kernels for CPU tensors: dcn_experiments::deform_conv2d (CPU and AutogradCPU)
// and dcn_experiments::deform_conv2d_backward (CPU).
//
// The operators are defined in Python (deform_conv.py, torch.library.custom_op): schema, fake kernel,
// CUDA kernels, the reference fallback, and kernels and an autograd formula written in Python, which
// serve every call until this library is loaded. The custom op registers those under the
// CompositeExplicitAutograd and Autograd keys; the CPU and AutogradCPU kernels below take precedence
// for CPU tensors. They do the same work as the Python ones -- the same argument checks and messages,
// the same compute-dtype rule, memory formats and per-call counts -- without a trip through Python per
// call (the Python layer cost ~0.24 ms per forward+backward of a tiny layer; see
// scripts/bench_op_overhead.py). Fake tensors (torch.compile, torch.export) still reach the Python
// fake kernel: the autograd kernel calls both operators through the dispatcher, so tracing records
// them as nodes, as the Python formula does.
//
// The checks mirror _validated and _check_arguments in deform_conv.py message for message (a test
// compares both on every bad input); the arithmetic is in deform_conv2d_cpu.cpp, reached through its
// raw operators (dcn_experiments_cpu::deform_conv2d_forward / _backward).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using Gradients = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;  // input, offset, weight, bias, mask

// Calls served here per compute dtype (float32, float64): backend_usage / precision_usage in Python.
std::atomic<int64_t> calls_float32{0}, calls_float64{0};
// Off: the kernels below hand every call to the Python ones (the custom op's CompositeExplicitAutograd
// and Autograd kernels), as before this library was loaded; tests use it to reach the Python paths.
std::atomic<bool> cpu_kernels_enabled{true};

// Run operator `name`'s Python kernel for `key` on `args`.
template <typename... Args>
torch::jit::Stack python_kernel(const char* name, c10::DispatchKey key, Args&&... args) {
  torch::jit::Stack stack;
  torch::jit::push(stack, std::forward<Args>(args)...);
  c10::Dispatcher::singleton().findSchemaOrThrow(name, "").callBoxedForDispatchKey(key, stack);
  return stack;
}

// --- Python's spelling of values in error messages ------------------------------------------------

std::string python_tuple(at::IntArrayRef values) {  // str(tuple(values)): "(1, 4)", "(4,)", "()"
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < values.size(); ++i) s << (i ? ", " : "") << values[i];
  s << (values.size() == 1 ? ",)" : ")");
  return s.str();
}

std::string python_list(at::IntArrayRef values) {  // str(list(values)): "[1, 2, 3]"
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < values.size(); ++i) s << (i ? ", " : "") << values[i];
  s << "]";
  return s.str();
}

std::string python_dtype(at::ScalarType type) {  // str(dtype): "torch.float32"
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // c10's name in lower case is Python's for the rest: UInt16 -> uint16, Float8_e5m2 -> float8_e5m2
      std::string name = c10::toString(type);
      std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
      return "torch." + name;
    }
  }
}

int64_t floor_divide(int64_t a, int64_t b) {  // Python's a // b (b > 0)
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// --- arguments -------------------------------------------------------------------------------------

struct Arguments {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t offset_groups;
  // float64 if any tensor is, else float32 (deform_conv.py's _compute_dtype for the CPU kernel).
  at::ScalarType compute_dtype;
};

bool is_floating(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kBFloat16 || type == at::kHalf;
}

// Throws "deform_conv2d: expected floating-point tensors, got [torch.float32, torch.int64]" for `tensors`.
void fail_not_floating(const std::vector<Tensor>& tensors) {
  std::ostringstream s;
  for (size_t i = 0; i < tensors.size(); ++i) s << (i ? ", " : "") << python_dtype(tensors[i].scalar_type());
  TORCH_CHECK(false, "deform_conv2d: expected floating-point tensors, got [", s.str(), "]");
}

std::array<int64_t, 2> pair_of(const char* name, c10::SymIntArrayRef values) {
  const std::vector<int64_t> concrete = C10_AS_INTARRAYREF_SLOW(values).vec();
  TORCH_CHECK(concrete.size() == 2, "deform_conv2d: ", name, " must have two values (height, width), got ",
              python_list(concrete));
  return {concrete[0], concrete[1]};
}

// The tensors that are there, in the order (input, offset, weight, bias, mask).
std::vector<Tensor> present(std::initializer_list<const Tensor*> tensors, const OptionalTensor& bias,
                            const OptionalTensor& mask) {
  std::vector<Tensor> out;
  for (const Tensor* t : tensors) out.push_back(*t);
  if (bias.has_value() && bias->defined()) out.push_back(*bias);
  if (mask.has_value() && mask->defined()) out.push_back(*mask);
  return out;
}

// deform_conv.py's _validated: geometry, shapes, one device, floating point. Returns the geometry and
// the number of offset groups.
Arguments validated(const Tensor& input, const Tensor& offset, const Tensor& weight, const OptionalTensor& bias_,
                    const OptionalTensor& mask_, c10::SymIntArrayRef stride_, c10::SymIntArrayRef padding_,
                    c10::SymIntArrayRef dilation_) {
  Arguments a{pair_of("stride", stride_), pair_of("padding", padding_), pair_of("dilation", dilation_), 0,
              at::kFloat};
  const bool has_bias = bias_.has_value() && bias_->defined(), has_mask = mask_.has_value() && mask_->defined();
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"input", &input}, {"offset", &offset},
                                {"weight", &weight}}) {
    TORCH_CHECK(t->dim() == 4, "deform_conv2d: ", name, " must be a 4-D tensor, got shape ",
                python_tuple(t->sizes()));
  }
  TORCH_CHECK(!has_mask || mask_->dim() == 4, "deform_conv2d: mask must be a 4-D tensor, got shape ",
              python_tuple(mask_->sizes()));
  const auto& [stride, padding, dilation] = std::tie(a.stride, a.padding, a.dilation);
  TORCH_CHECK(std::min(stride[0], stride[1]) > 0 && std::min(dilation[0], dilation[1]) > 0 &&
                  std::min(padding[0], padding[1]) >= 0,
              "deform_conv2d: stride and dilation must be > 0 and padding >= 0, got stride=", python_tuple(stride),
              ", padding=", python_tuple(padding), ", dilation=", python_tuple(dilation));
  const int64_t n = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t out_c = weight.size(0), c_per_group = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(c != 0, "deform_conv2d: input must have at least one channel, got shape ", python_tuple(input.sizes()));
  TORCH_CHECK(c_per_group != 0 && c % c_per_group == 0, "deform_conv2d: input channels (", c,
              ") must be divisible by weight.shape[1] (", c_per_group, ")");
  const int64_t groups = c / c_per_group;
  TORCH_CHECK(out_c % groups == 0, "deform_conv2d: weight.shape[0] (", out_c, ") must be divisible by the groups (",
              groups, ")");
  const int64_t taps = kh * kw;
  TORCH_CHECK(offset.size(1) != 0 && taps != 0 && offset.size(1) % (2 * taps) == 0,
              "deform_conv2d: the shape of the offset tensor at dimension 1 is not valid. It should be a "
              "multiple of 2 * weight.size[2] * weight.size[3].\nGot offset.shape[1]=",
              offset.size(1), ", while 2 * weight.size[2] * weight.size[3]=", 2 * taps);
  a.offset_groups = offset.size(1) / (2 * taps);
  TORCH_CHECK(c % a.offset_groups == 0, "deform_conv2d: input channels (", c,
              ") must be divisible by the offset groups (", a.offset_groups, ")");
  TORCH_CHECK(offset.size(0) == n, "deform_conv2d: offset batch (", offset.size(0), ") must equal input batch (", n,
              ")");
  const int64_t out_h = floor_divide(h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1), stride[0]) + 1;
  const int64_t out_w = floor_divide(w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1), stride[1]) + 1;
  TORCH_CHECK(out_h > 0 && out_w > 0, "deform_conv2d: calculated output size is too small (", out_h, "x", out_w,
              ") for input ", h, "x", w, ", kernel ", kh, "x", kw, ", stride ", python_tuple(stride), ", padding ",
              python_tuple(padding), ", dilation ", python_tuple(dilation));
  TORCH_CHECK(offset.size(2) == out_h && offset.size(3) == out_w, "deform_conv2d: offset spatial size ",
              python_tuple(offset.sizes().slice(2)), " must equal the output size ", python_tuple({out_h, out_w}));
  TORCH_CHECK(!has_mask || (mask_->size(0) == n && mask_->size(1) == a.offset_groups * taps &&
                            mask_->size(2) == out_h && mask_->size(3) == out_w),
              "deform_conv2d: mask shape ", python_tuple(mask_->sizes()), " must be ",
              python_tuple({n, a.offset_groups * taps, out_h, out_w}),
              " (batch, offset_groups * kh * kw, out_h, out_w)");
  TORCH_CHECK(!has_bias || (bias_->dim() == 1 && bias_->size(0) == out_c), "deform_conv2d: bias must have shape (",
              out_c, ",), got ", python_tuple(bias_->sizes()));
  const std::vector<Tensor> tensors = present({&input, &offset, &weight}, bias_, mask_);
  bool one_device = true, floating = true;
  for (const Tensor& t : tensors) {
    one_device = one_device && t.device() == input.device();
    floating = floating && is_floating(t.scalar_type());
    if (t.scalar_type() == at::kDouble) a.compute_dtype = at::kDouble;
  }
  if (!one_device) {
    std::ostringstream s;
    for (size_t i = 0; i < tensors.size(); ++i) s << (i ? ", '" : "'") << tensors[i].device().str() << "'";
    TORCH_CHECK(false, "deform_conv2d: all tensors must be on one device, got [", s.str(), "]");
  }
  if (!floating) fail_not_floating(tensors);
  return a;
}

Tensor cast(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

OptionalTensor cast(const OptionalTensor& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return cast(*t, dtype);
}

// memory_format_of and offset_gradient_format_of in deform_conv.py.
at::MemoryFormat memory_format_of(const Tensor& t) {
  const bool channels_last = t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

at::MemoryFormat offset_gradient_format_of(const Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.size(1) > 1 && t.stride(1) == 1) return at::MemoryFormat::ChannelsLast;
  return memory_format_of(t);
}

// --- the raw kernels and the public operators, called through the dispatcher -------------------------

Tensor raw_forward(const Tensor& input, const Tensor& weight, const OptionalTensor& bias, const Tensor& offset,
                   const OptionalTensor& mask, const Arguments& a) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dcn_experiments_cpu::deform_conv2d_forward", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                                           const OptionalTensor&, int64_t, int64_t, int64_t, int64_t, int64_t,
                                           int64_t, int64_t)>();
  return op.call(input, weight, bias, offset, mask, a.stride[0], a.stride[1], a.padding[0], a.padding[1],
                 a.dilation[0], a.dilation[1], a.offset_groups);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> raw_backward(const Tensor& grad_out, const Tensor& input,
                                                                const Tensor& weight, const Tensor& offset,
                                                                const OptionalTensor& mask, const Arguments& a,
                                                                const std::array<bool, 5>& need) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dcn_experiments_cpu::deform_conv2d_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, int64_t, int64_t,
              int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, bool, bool, bool)>();
  // The raw backward takes (input, offset, mask, weight, bias) flags and returns its gradients in that order.
  return op.call(grad_out, input, weight, offset, mask, a.stride[0], a.stride[1], a.padding[0], a.padding[1],
                 a.dilation[0], a.dilation[1], a.offset_groups, need[0], need[1], need[4], need[2], need[3]);
}

using ForwardSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
                                const OptionalTensor&, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef);
using BackwardSignature = Gradients(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
                                    const OptionalTensor&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                    c10::SymIntArrayRef, c10::List<bool>);

// --- CPU kernels -------------------------------------------------------------------------------------

Tensor forward_cpu(const Tensor& input, const Tensor& offset, const Tensor& weight, const OptionalTensor& bias,
                   const OptionalTensor& mask, c10::SymIntArrayRef stride, c10::SymIntArrayRef padding,
                   c10::SymIntArrayRef dilation) {
  if (!cpu_kernels_enabled.load(std::memory_order_relaxed)) {
    return python_kernel("dcn_experiments::deform_conv2d", c10::DispatchKey::CompositeExplicitAutograd, input, offset,
                         weight, bias, mask, stride, padding, dilation)[0]
        .toTensor();
  }
  const Arguments a = validated(input, offset, weight, bias, mask, stride, padding, dilation);
  const at::ScalarType dtype = a.compute_dtype;
  (dtype == at::kDouble ? calls_float64 : calls_float32).fetch_add(1, std::memory_order_relaxed);
  Tensor out = raw_forward(cast(input, dtype), cast(weight, dtype), cast(bias, dtype), cast(offset, dtype),
                           cast(mask, dtype), a);
  // Half-precision inputs (autocast) get their own dtype back, as torchvision's autocast rule does.
  if (out.scalar_type() != input.scalar_type()) out = out.to(input.scalar_type());
  return out.contiguous(memory_format_of(input));
}

// A gradient in its tensor's dtype and layout, or an empty placeholder where none was asked for (an
// operator's outputs cannot be None); deform_conv.py's _grad_like.
Tensor gradient_for(const Tensor& grad, const Tensor* like, bool needed, at::MemoryFormat format,
                    const Tensor& input) {
  if (like == nullptr) return at::empty({0}, input.options());
  if (!needed || !grad.defined()) return at::empty({0}, like->options());
  return cast(grad, like->scalar_type()).contiguous(format);
}

Gradients backward_cpu(const Tensor& grad_out, const Tensor& input, const Tensor& offset, const Tensor& weight,
                       const OptionalTensor& bias, const OptionalTensor& mask, c10::SymIntArrayRef stride,
                       c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, c10::List<bool> output_mask) {
  if (!cpu_kernels_enabled.load(std::memory_order_relaxed)) {
    const auto out = python_kernel("dcn_experiments::deform_conv2d_backward",
                                   c10::DispatchKey::CompositeExplicitAutograd, grad_out, input, offset, weight, bias,
                                   mask, stride, padding, dilation, output_mask);
    return {out[0].toTensor(), out[1].toTensor(), out[2].toTensor(), out[3].toTensor(), out[4].toTensor()};
  }
  const Arguments a = validated(input, offset, weight, bias, mask, stride, padding, dilation);
  const bool has_bias = bias.has_value() && bias->defined(), has_mask = mask.has_value() && mask->defined();
  TORCH_CHECK(output_mask.size() == 5, "deform_conv2d_backward: output_mask must have 5 values, got ",
              output_mask.size());
  const std::array<bool, 5> need{output_mask[0], output_mask[1], output_mask[2], output_mask[3] && has_bias,
                                 output_mask[4] && has_mask};
  // The Python kernel checks grad_out with the others, listed first.
  if (!is_floating(grad_out.scalar_type())) {
    fail_not_floating(present({&grad_out, &input, &offset, &weight}, bias, mask));
  }
  const at::ScalarType dtype = grad_out.scalar_type() == at::kDouble ? at::kDouble : a.compute_dtype;
  const auto [grad_input, grad_offset, grad_mask, grad_weight, grad_bias] =
      raw_backward(cast(grad_out, dtype), cast(input, dtype), cast(weight, dtype), cast(offset, dtype),
                   cast(mask, dtype), a, need);
  return {gradient_for(grad_input, &input, need[0], memory_format_of(input), input),
          gradient_for(grad_offset, &offset, need[1], offset_gradient_format_of(offset), input),
          gradient_for(grad_weight, &weight, need[2], memory_format_of(weight), input),
          gradient_for(grad_bias, has_bias ? &*bias : nullptr, need[3], at::MemoryFormat::Contiguous, input),
          gradient_for(grad_mask, has_mask ? &*mask : nullptr, need[4],
                       has_mask ? offset_gradient_format_of(*mask) : at::MemoryFormat::Contiguous, input)};
}

// --- autograd ----------------------------------------------------------------------------------------

// The Python formula's twin: save the inputs, and in the backward call the backward operator for the
// gradients autograd asks for.
class DeformConv2dFunction : public torch::autograd::Function<DeformConv2dFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input, const Tensor& offset,
                        const Tensor& weight, const OptionalTensor& bias, const OptionalTensor& mask,
                        c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("dcn_experiments::deform_conv2d", "")
                               .typed<ForwardSignature>();
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = op.call(input, offset, weight, bias, mask, stride, padding, dilation);
    }
    const bool has_bias = bias.has_value() && bias->defined(), has_mask = mask.has_value() && mask->defined();
    ctx->save_for_backward({input, offset, weight, has_bias ? *bias : Tensor(), has_mask ? *mask : Tensor()});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["has_mask"] = has_mask;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("dcn_experiments::deform_conv2d_backward", "")
                               .typed<BackwardSignature>();
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool(), has_mask = ctx->saved_data["has_mask"].toBool();
    // Autograd's edges are the tensors given: bias and mask have one only when they were there.
    const size_t bias_edge = 3, mask_edge = has_bias ? 4 : 3;
    const std::array<bool, 5> need{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   has_bias && ctx->needs_input_grad(bias_edge),
                                   has_mask && ctx->needs_input_grad(mask_edge)};
    const OptionalTensor bias = has_bias ? OptionalTensor(saved[3]) : std::nullopt;
    const OptionalTensor mask = has_mask ? OptionalTensor(saved[4]) : std::nullopt;
    const auto stride = ctx->saved_data["stride"].toSymIntVector();
    const auto padding = ctx->saved_data["padding"].toSymIntVector();
    const auto dilation = ctx->saved_data["dilation"].toSymIntVector();
    const c10::List<bool> output_mask({need[0], need[1], need[2], need[3], need[4]});
    // The backward operator has no derivative of its own. Without create_graph (grad mode off here)
    // its gradients need no graph, so skip its autograd kernel (Python, ~0.1 ms); with create_graph
    // that kernel says, as before, that there is no double backward.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    const auto grads =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], bias, mask, stride, padding, dilation, output_mask);
    const auto keep = [&](const Tensor& g, bool needed) { return needed ? g : Tensor(); };
    return {keep(std::get<0>(grads), need[0]), keep(std::get<1>(grads), need[1]), keep(std::get<2>(grads), need[2]),
            keep(std::get<3>(grads), need[3]), keep(std::get<4>(grads), need[4]), Tensor(), Tensor(), Tensor()};
  }
};

Tensor forward_autograd(const Tensor& input, const Tensor& offset, const Tensor& weight, const OptionalTensor& bias,
                        const OptionalTensor& mask, c10::SymIntArrayRef stride, c10::SymIntArrayRef padding,
                        c10::SymIntArrayRef dilation) {
  if (!cpu_kernels_enabled.load(std::memory_order_relaxed)) {
    return python_kernel("dcn_experiments::deform_conv2d", c10::DispatchKey::Autograd, input, offset, weight, bias,
                         mask, stride, padding, dilation)[0]
        .toTensor();
  }
  return DeformConv2dFunction::apply(input, offset, weight, bias, mask, stride, padding, dilation);
}

std::vector<int64_t> public_op_calls() { return {calls_float32.load(), calls_float64.load()}; }

void reset_public_op_calls() {
  calls_float32.store(0);
  calls_float64.store(0);
}

bool set_public_cpu_kernels(bool enabled) { return cpu_kernels_enabled.exchange(enabled); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcn_experiments_cpu, m) {
  // Calls of the public operator served by forward_cpu, per compute dtype: [float32, float64].
  m.def("public_op_calls() -> int[]", &public_op_calls);
  m.def("reset_public_op_calls() -> ()", &reset_public_op_calls);
  // Whether the CPU kernels below serve calls (default) or hand them to the Python ones; returns the
  // previous setting. For tests and diagnosis.
  m.def("set_public_cpu_kernels(bool enabled) -> bool", &set_public_cpu_kernels);
}

TORCH_LIBRARY_IMPL(dcn_experiments, CPU, m) {
  m.impl("deform_conv2d", &forward_cpu);
  m.impl("deform_conv2d_backward", &backward_cpu);
}

TORCH_LIBRARY_IMPL(dcn_experiments, AutogradCPU, m) { m.impl("deform_conv2d", &forward_autograd); }
