// Deformable convolution (DCN v1/v2) for CPU, matching torchvision.ops.deform_conv2d.
//
// Layout: the input is read channels-last (N, H, W, C) so that every bilinear corner is one
// contiguous vector of channels. Sampled columns are laid out (rows = N*Ho*Wo, cols = K*C) and the
// convolution becomes one GEMM per chunk of images against the weight reshaped to (O, K*C).
// The backward recomputes the columns (as torchvision does) instead of keeping them alive.
//
// Bilinear sampling follows torchvision exactly: corners outside the image read as zero, and the
// gradient w.r.t. a coordinate is the one-sided derivative through floor(), also on integer and
// border coordinates.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

struct Geometry {
  int64_t batch, channels, height, width;
  int64_t out_channels, weight_groups, offset_groups;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;
  int64_t kernel_size() const { return kernel_h * kernel_w; }
  int64_t out_size() const { return out_h * out_w; }
  int64_t channels_per_offset_group() const { return channels / offset_groups; }
};

// One sampling point: four corner pointers (nullptr = outside) and the bilinear weights.
template <typename scalar_t>
struct Corners {
  int64_t index[4];  // flattened (y * W + x) position of each corner, -1 if outside
  scalar_t weight[4];
  scalar_t ly, lx;
};

template <typename scalar_t>
inline Corners<scalar_t> locate(scalar_t y, scalar_t x, int64_t height, int64_t width) {
  Corners<scalar_t> c;
  const scalar_t y0f = std::floor(y), x0f = std::floor(x);
  const int64_t y0 = static_cast<int64_t>(y0f), x0 = static_cast<int64_t>(x0f);
  c.ly = y - y0f;
  c.lx = x - x0f;
  const scalar_t hy = 1 - c.ly, hx = 1 - c.lx;
  const bool vy0 = y0 >= 0 && y0 < height, vy1 = y0 + 1 >= 0 && y0 + 1 < height;
  const bool vx0 = x0 >= 0 && x0 < width, vx1 = x0 + 1 >= 0 && x0 + 1 < width;
  c.index[0] = (vy0 && vx0) ? y0 * width + x0 : -1;
  c.index[1] = (vy0 && vx1) ? y0 * width + x0 + 1 : -1;
  c.index[2] = (vy1 && vx0) ? (y0 + 1) * width + x0 : -1;
  c.index[3] = (vy1 && vx1) ? (y0 + 1) * width + x0 + 1 : -1;
  c.weight[0] = hy * hx;
  c.weight[1] = hy * c.lx;
  c.weight[2] = c.ly * hx;
  c.weight[3] = c.ly * c.lx;
  return c;
}

// Fill columns (rows = images [first, first+count) x out positions, cols = K x C) for one chunk.
// offset: (N, L, G, K, 2), mask: (N, L, G, K) or undefined; input: (N, H, W, C).
template <typename scalar_t>
void sample_columns(const Geometry& g, const scalar_t* input, const scalar_t* offset,
                    const scalar_t* mask, int64_t first, int64_t count, scalar_t* columns) {
  const int64_t L = g.out_size(), K = g.kernel_size(), C = g.channels;
  const int64_t G = g.offset_groups, Cg = g.channels_per_offset_group();
  std::vector<scalar_t> zeros(C, scalar_t(0));
  const scalar_t* zero = zeros.data();
  at::parallel_for(0, count * L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = first + row / L, l = row % L;
      const int64_t oy = l / g.out_w, ox = l % g.out_w;
      const scalar_t* image = input + b * g.height * g.width * C;
      const scalar_t* off = offset + (b * L + l) * G * K * 2;
      const scalar_t* msk = mask ? mask + (b * L + l) * G * K : nullptr;
      scalar_t* dst_row = columns + row * K * C;
      for (int64_t grp = 0; grp < G; ++grp) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t ki = k / g.kernel_w, kj = k % g.kernel_w;
          const scalar_t y = oy * g.stride_h - g.pad_h + ki * g.dil_h + off[(grp * K + k) * 2];
          const scalar_t x = ox * g.stride_w - g.pad_w + kj * g.dil_w + off[(grp * K + k) * 2 + 1];
          const scalar_t m = msk ? msk[grp * K + k] : scalar_t(1);
          const Corners<scalar_t> c = locate(y, x, g.height, g.width);
          const scalar_t* p[4];
          scalar_t w[4];
          for (int q = 0; q < 4; ++q) {
            p[q] = c.index[q] >= 0 ? image + c.index[q] * C + grp * Cg : zero;
            w[q] = c.weight[q] * m;
          }
          scalar_t* dst = dst_row + k * C + grp * Cg;
          const scalar_t *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];
          const scalar_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
#pragma omp simd
          for (int64_t ch = 0; ch < Cg; ++ch) {
            dst[ch] = w0 * p0[ch] + w1 * p1[ch] + w2 * p2[ch] + w3 * p3[ch];
          }
        }
      }
    }
  });
}

// Scatter column gradients into the input gradient and reduce them into offset/mask gradients
// for images [first, first+count). grad_columns has the same layout as the columns.
template <typename scalar_t>
void scatter_column_grads(const Geometry& g, const scalar_t* input, const scalar_t* offset,
                          const scalar_t* mask, const scalar_t* grad_columns, int64_t first,
                          int64_t count, scalar_t* grad_input, scalar_t* grad_offset,
                          scalar_t* grad_mask) {
  const int64_t L = g.out_size(), K = g.kernel_size(), C = g.channels;
  const int64_t G = g.offset_groups, Cg = g.channels_per_offset_group();
  const int64_t HW = g.height * g.width;
  // Each image's input gradient is written by one thread only, so no atomics are needed.
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = first + bi;
      const scalar_t* image = input + b * HW * C;
      scalar_t* gimage = grad_input ? grad_input + b * HW * C : nullptr;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t oy = l / g.out_w, ox = l % g.out_w;
        const scalar_t* off = offset + (b * L + l) * G * K * 2;
        const scalar_t* msk = mask ? mask + (b * L + l) * G * K : nullptr;
        const scalar_t* gcol_row = grad_columns + (bi * L + l) * K * C;
        for (int64_t grp = 0; grp < G; ++grp) {
          for (int64_t k = 0; k < K; ++k) {
            const int64_t ki = k / g.kernel_w, kj = k % g.kernel_w;
            const scalar_t y = oy * g.stride_h - g.pad_h + ki * g.dil_h + off[(grp * K + k) * 2];
            const scalar_t x = ox * g.stride_w - g.pad_w + kj * g.dil_w + off[(grp * K + k) * 2 + 1];
            const scalar_t m = msk ? msk[grp * K + k] : scalar_t(1);
            const Corners<scalar_t> c = locate(y, x, g.height, g.width);
            const scalar_t* gc = gcol_row + k * C + grp * Cg;
            scalar_t dots[4] = {0, 0, 0, 0};
            if (grad_offset || grad_mask) {
              for (int q = 0; q < 4; ++q) {
                if (c.index[q] < 0) continue;
                const scalar_t* v = image + c.index[q] * C + grp * Cg;
                scalar_t s = 0;
#pragma omp simd reduction(+ : s)
                for (int64_t ch = 0; ch < Cg; ++ch) s += gc[ch] * v[ch];
                dots[q] = s;
              }
            }
            if (gimage) {
              for (int q = 0; q < 4; ++q) {
                if (c.index[q] < 0) continue;
                const scalar_t wq = c.weight[q] * m;
                scalar_t* dst = gimage + c.index[q] * C + grp * Cg;
#pragma omp simd
                for (int64_t ch = 0; ch < Cg; ++ch) dst[ch] += wq * gc[ch];
              }
            }
            const int64_t slot = (b * L + l) * G * K + grp * K + k;
            if (grad_offset) {
              const scalar_t hy = 1 - c.ly, hx = 1 - c.lx;
              grad_offset[slot * 2] = m * (hx * (dots[2] - dots[0]) + c.lx * (dots[3] - dots[1]));
              grad_offset[slot * 2 + 1] = m * (hy * (dots[1] - dots[0]) + c.ly * (dots[3] - dots[2]));
            }
            if (grad_mask) {
              grad_mask[slot] = c.weight[0] * dots[0] + c.weight[1] * dots[1] +
                                c.weight[2] * dots[2] + c.weight[3] * dots[3];
            }
          }
        }
      }
    }
  });
}

Geometry make_geometry(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                       int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                       int64_t dil_h, int64_t dil_w, int64_t offset_groups) {
  Geometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.weight_groups = g.channels / weight.size(1);
  g.offset_groups = offset_groups;
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dil_h = dil_h;
  g.dil_w = dil_w;
  g.out_h = offset.size(2);
  g.out_w = offset.size(3);
  return g;
}

// Images per chunk so that one chunk's columns stay near `budget` bytes.
int64_t chunk_size(const Geometry& g, int64_t element_size) {
  const int64_t budget = int64_t(64) << 20;
  const int64_t per_image = std::max<int64_t>(1, g.out_size() * g.kernel_size() * g.channels * element_size);
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, budget / per_image));
}

// Weight (O, C/g, kh, kw) as g matrices (g, K*C/g, O/g), matching the column layout (k, c).
at::Tensor weight_matrix(const at::Tensor& weight, int64_t groups) {
  const int64_t O = weight.size(0), Cg = weight.size(1), K = weight.size(2) * weight.size(3);
  return weight.view({groups, O / groups, Cg, K}).permute({0, 3, 2, 1}).reshape({groups, K * Cg, O / groups});
}

// Columns (rows, K*C) as g matrices (g, rows, K*C/g).
at::Tensor group_columns(const at::Tensor& columns, int64_t rows, int64_t K, int64_t C, int64_t groups) {
  if (groups == 1) return columns.view({1, rows, K * C});
  return columns.view({rows, K, groups, C / groups}).permute({2, 0, 1, 3}).reshape({groups, rows, K * (C / groups)});
}

// Inverse of group_columns: (g, rows, K*C/g) back to (rows, K*C).
at::Tensor ungroup_columns(const at::Tensor& grouped, int64_t rows, int64_t K, int64_t C, int64_t groups) {
  if (groups == 1) return grouped.view({rows, K * C});
  return grouped.view({groups, rows, K, C / groups}).permute({1, 2, 0, 3}).reshape({rows, K * C});
}

at::Tensor channels_last_rows(const at::Tensor& t) {  // (N, C, H, W) -> contiguous (N, H, W, C)
  return t.permute({0, 2, 3, 1}).contiguous();
}

// offset (N, G*K*2, Ho, Wo) -> (N, Ho*Wo, G, K, 2); mask (N, G*K, Ho, Wo) -> (N, Ho*Wo, G, K)
at::Tensor offsets_by_position(const at::Tensor& offset, int64_t G, int64_t K) {
  const int64_t N = offset.size(0), L = offset.size(2) * offset.size(3);
  return offset.reshape({N, G, K, 2, L}).permute({0, 4, 1, 2, 3}).contiguous();
}
at::Tensor mask_by_position(const at::Tensor& mask, int64_t G, int64_t K) {
  const int64_t N = mask.size(0), L = mask.size(2) * mask.size(3);
  return mask.reshape({N, G, K, L}).permute({0, 3, 1, 2}).contiguous();
}

at::Tensor deform_conv2d_forward(const at::Tensor& input_, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& offset_,
                                 const c10::optional<at::Tensor>& mask_, int64_t stride_h,
                                 int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                 int64_t dil_w, int64_t offset_groups) {
  const Geometry g = make_geometry(input_, weight, offset_, stride_h, stride_w, pad_h, pad_w, dil_h,
                                   dil_w, offset_groups);
  const int64_t L = g.out_size(), K = g.kernel_size(), C = g.channels, O = g.out_channels;
  const int64_t groups = g.weight_groups;
  auto out = at::empty({g.batch, g.out_h, g.out_w, O}, input_.options());
  if (g.batch == 0) return out.permute({0, 3, 1, 2});
  const at::Tensor input = channels_last_rows(input_);
  const at::Tensor offset = offsets_by_position(offset_, offset_groups, K);
  const bool has_mask = mask_.has_value() && mask_->defined();
  const at::Tensor mask = has_mask ? mask_by_position(*mask_, offset_groups, K) : at::Tensor();
  const at::Tensor wmat = weight_matrix(weight, groups);
  const int64_t chunk = chunk_size(g, input.element_size());
  auto columns = at::empty({chunk * L, K * C}, input.options());
  auto out_rows = out.view({g.batch * L, O});
  for (int64_t first = 0; first < g.batch; first += chunk) {
    const int64_t count = std::min(chunk, g.batch - first);
    const int64_t rows = count * L;
    auto cols = columns.narrow(0, 0, rows);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_sample_columns", [&] {
      sample_columns<scalar_t>(g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                               has_mask ? mask.data_ptr<scalar_t>() : nullptr, first, count,
                               cols.data_ptr<scalar_t>());
    });
    auto dst = out_rows.narrow(0, first * L, rows);
    if (groups == 1) {
      at::mm_out(dst, cols, wmat[0]);
    } else {
      auto grouped = at::bmm(group_columns(cols, rows, K, C, groups), wmat);  // (g, rows, O/g)
      dst.copy_(grouped.permute({1, 0, 2}).reshape({rows, O}));
    }
  }
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  return out.permute({0, 3, 1, 2});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward(
    const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& weight,
    const at::Tensor& offset_, const c10::optional<at::Tensor>& mask_, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
    int64_t offset_groups, bool need_input, bool need_offset, bool need_mask, bool need_weight,
    bool need_bias) {
  const Geometry g = make_geometry(input_, weight, offset_, stride_h, stride_w, pad_h, pad_w, dil_h,
                                   dil_w, offset_groups);
  const int64_t L = g.out_size(), K = g.kernel_size(), C = g.channels, O = g.out_channels;
  const int64_t groups = g.weight_groups, G = offset_groups;
  const bool has_mask = mask_.has_value() && mask_->defined();
  need_mask = need_mask && has_mask;
  const auto opts = input_.options();

  at::Tensor grad_input = need_input ? at::zeros({g.batch, g.height, g.width, C}, opts) : at::Tensor();
  at::Tensor grad_offset = need_offset ? at::empty({g.batch, L, G, K, 2}, opts) : at::Tensor();
  at::Tensor grad_mask = need_mask ? at::empty({g.batch, L, G, K}, opts) : at::Tensor();
  at::Tensor grad_wmat = need_weight ? at::zeros({groups, K * (C / groups), O / groups}, opts) : at::Tensor();
  at::Tensor grad_bias = need_bias ? grad_out_.sum({0, 2, 3}) : at::Tensor();

  if (g.batch > 0 && (need_input || need_offset || need_mask || need_weight)) {
    const at::Tensor input = channels_last_rows(input_);
    const at::Tensor offset = offsets_by_position(offset_, G, K);
    const at::Tensor mask = has_mask ? mask_by_position(*mask_, G, K) : at::Tensor();
    const at::Tensor grad_rows = channels_last_rows(grad_out_).view({g.batch * L, O});
    const at::Tensor wmat = weight_matrix(weight, groups);
    const int64_t chunk = chunk_size(g, input.element_size());
    auto columns = need_weight ? at::empty({chunk * L, K * C}, opts) : at::Tensor();
    const bool need_scatter = need_input || need_offset || need_mask;
    for (int64_t first = 0; first < g.batch; first += chunk) {
      const int64_t count = std::min(chunk, g.batch - first);
      const int64_t rows = count * L;
      auto grad_chunk = grad_rows.narrow(0, first * L, rows);
      auto grad_grouped = grad_chunk.view({rows, groups, O / groups}).permute({1, 0, 2});  // (g, rows, O/g)
      if (need_weight) {
        auto cols = columns.narrow(0, 0, rows);
        AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_sample_columns", [&] {
          sample_columns<scalar_t>(g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                   has_mask ? mask.data_ptr<scalar_t>() : nullptr, first, count,
                                   cols.data_ptr<scalar_t>());
        });
        grad_wmat.baddbmm_(group_columns(cols, rows, K, C, groups).transpose(1, 2), grad_grouped);
      }
      if (need_scatter) {
        // (g, rows, O/g) x (g, O/g, K*C/g) -> columns' gradient
        auto grad_cols = ungroup_columns(at::bmm(grad_grouped, wmat.transpose(1, 2)), rows, K, C, groups).contiguous();
        AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_scatter_column_grads", [&] {
          scatter_column_grads<scalar_t>(
              g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
              has_mask ? mask.data_ptr<scalar_t>() : nullptr, grad_cols.data_ptr<scalar_t>(), first,
              count, need_input ? grad_input.data_ptr<scalar_t>() : nullptr,
              need_offset ? grad_offset.data_ptr<scalar_t>() : nullptr,
              need_mask ? grad_mask.data_ptr<scalar_t>() : nullptr);
        });
      }
    }
  } else if (g.batch == 0) {
    // Nothing to scatter; keep the zero/empty gradients of the right shapes.
  }

  if (need_input) grad_input = grad_input.permute({0, 3, 1, 2});
  if (need_offset) {
    grad_offset = grad_offset.permute({0, 2, 3, 4, 1}).reshape({g.batch, G * K * 2, g.out_h, g.out_w});
  }
  if (need_mask) grad_mask = grad_mask.permute({0, 2, 3, 1}).reshape({g.batch, G * K, g.out_h, g.out_w});
  at::Tensor grad_weight;
  if (need_weight) {
    // (g, K*Cg, O/g) -> (O, Cg, kh, kw)
    const int64_t Cg = C / groups;
    grad_weight = grad_wmat.view({groups, K, Cg, O / groups}).permute({0, 3, 2, 1}).reshape(
        {O, Cg, g.kernel_h, g.kernel_w});
  }
  return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY(dcn_experiments_cpu, m) {
  m.def("deform_conv2d_forward", &deform_conv2d_forward);
  m.def("deform_conv2d_backward", &deform_conv2d_backward);
}
