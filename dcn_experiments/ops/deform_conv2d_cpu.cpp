// Deformable convolution (DCN v1/v2) for CPU, matching torchvision.ops.deform_conv2d.
//
// Layout: the input is read channels-last (N, H, W, C) so that every bilinear corner is one
// contiguous vector of channels. Sampled columns are laid out (rows = N*Ho*Wo, cols = K*C) and the
// convolution becomes one GEMM per chunk of images against the weight reshaped to (O, K*C); the
// forward of layers with 4-32 output channels multiplies small tiles of columns in L1 instead.
// The backward recomputes the columns (as torchvision does) instead of keeping them alive.
//
// Bilinear sampling follows torchvision exactly: corners outside the image read as zero, and the
// gradient w.r.t. a coordinate is the one-sided derivative through floor(), also on integer and
// border coordinates.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

struct Geometry {
  int64_t batch, channels, height, width;
  int64_t out_channels, weight_groups, offset_groups;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;
  // Distance between images in the offset and mask tensors the kernels read: their planes are read
  // in place, so the images may lie apart (see readable_planes).
  int64_t offset_batch_stride = 0, mask_batch_stride = 0;
  // Where the backward writes the offset and mask gradients, (N, P, L) per image: the strides of the
  // gradient tensors, planes (channel stride L, pixel stride 1) or, for offsets from a channels-last
  // model, pixels (1, P).
  int64_t grad_offset_channel_stride = 0, grad_offset_pixel_stride = 0;
  int64_t grad_mask_channel_stride = 0, grad_mask_pixel_stride = 0;
  int64_t kernel_size() const { return kernel_h * kernel_w; }
  int64_t out_size() const { return out_h * out_w; }
  int64_t channels_per_offset_group() const { return channels / offset_groups; }
};

// Integer part of each kernel tap's sampling position relative to its output position's
// (oy * stride, ox * stride): k -> (ki * dil - pad, kj * dil - pad). Saves a division per tap.
struct TapGrid {
  std::vector<int64_t> dy, dx;
  explicit TapGrid(const Geometry& g) : dy(g.kernel_size()), dx(g.kernel_size()) {
    for (int64_t k = 0; k < g.kernel_size(); ++k) {
      dy[k] = (k / g.kernel_w) * g.dil_h - g.pad_h;
      dx[k] = (k % g.kernel_w) * g.dil_w - g.pad_w;
    }
  }
};

// The bilinear sampling plan of up to kPlanRows consecutive rows of one image for one kernel tap:
// each corner's pixel index (y * W + x, -1 outside the image) and bilinear weight, the mask value
// and the fractional parts (for the offset gradient). Computed for all rows of a tap at once
// (vectorised over rows: the offsets and the mask are contiguous along the rows), then used per
// row by the channel loops; keeps the scalar floor/compare work out of the loop that waits on the
// corner loads.
constexpr int64_t kPlanRows = 64;

template <typename scalar_t>
struct TapPlan {
  int32_t index[4][kPlanRows];
  scalar_t weight[4][kPlanRows];
  scalar_t mask[kPlanRows], ly[kPlanRows], lx[kPlanRows];
};

// floor(v), exact for |v| < 2^22 (float) or 2^51 (double), where it equals std::floor; beyond,
// every corner is outside any image anyway. Rounds to nearest by adding and removing 1.5 * 2^mantissa.
template <typename scalar_t>
inline scalar_t floor_small(scalar_t v) {
  const scalar_t magic = sizeof(scalar_t) == 4 ? scalar_t(12582912.0) : scalar_t(6755399441055744.0);
  const scalar_t r = (v + magic) - magic;
  return r > v ? r - 1 : r;
}

// A corner coordinate limited to [-2, hi] (NaN -> hi): one that was outside [-1, hi - 1] stays so.
template <typename scalar_t>
inline scalar_t clamp_coordinate(scalar_t v, scalar_t hi) {
  const scalar_t c = v < hi ? v : hi;
  return c > scalar_t(-2) ? c : scalar_t(-2);
}

// Plan rows [l0, l0 + n) of image `b` (n <= kPlanRows) for every (offset group, tap) into
// plans[grp * K + k]. kMaskInWeights: the corner weights carry the mask value (bilinear weight * mask,
// the same product the samplers took per row), for the samplers; the scatter keeps them apart.
template <typename scalar_t, bool kMaskInWeights>
void plan_rows(const Geometry& g, const scalar_t* offset, const scalar_t* mask, int64_t b, int64_t l0, int64_t n,
               const TapGrid& taps, TapPlan<scalar_t>* plans) {
  const int64_t L = g.out_size(), K = g.kernel_size(), G = g.offset_groups;
  const int32_t H = static_cast<int32_t>(g.height), W = static_cast<int32_t>(g.width);
  int32_t base_y[kPlanRows], base_x[kPlanRows];
  scalar_t ones[kPlanRows];
  std::fill(ones, ones + kPlanRows, scalar_t(1));
  for (int64_t i = 0, oy = l0 / g.out_w, ox = l0 % g.out_w; i < n; ++i) {
    base_y[i] = static_cast<int32_t>(oy * g.stride_h);
    base_x[i] = static_cast<int32_t>(ox * g.stride_w);
    if (++ox == g.out_w) ox = 0, ++oy;
  }
  for (int64_t grp = 0; grp < G; ++grp) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t plane = grp * K + k;
      const scalar_t* oy = offset + b * g.offset_batch_stride + 2 * plane * L + l0;
      const scalar_t* ox = oy + L;
      const scalar_t* msk = mask ? mask + b * g.mask_batch_stride + plane * L + l0 : ones;
      const int32_t dy = static_cast<int32_t>(taps.dy[k]), dx = static_cast<int32_t>(taps.dx[k]);
      TapPlan<scalar_t>& p = plans[plane];
      // The rows after this block's (the next block's, as a rule) in the offset and mask planes:
      // 2 or 3 * G * K short streams, more than the hardware prefetcher follows (the loads below
      // missed cache at 16-64 channels).
      for (int64_t a = n; a < 2 * n && l0 + a < L; a += 64 / static_cast<int64_t>(sizeof(scalar_t))) {
        __builtin_prefetch(oy + a);
        __builtin_prefetch(ox + a);
        if (mask) __builtin_prefetch(msk + a);
      }
      // Branch-free so that it vectorises (GCC 12 vectorises neither std::floor nor std::min/max here).
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t y = static_cast<scalar_t>(base_y[i] + dy) + oy[i];
        const scalar_t x = static_cast<scalar_t>(base_x[i] + dx) + ox[i];
        const scalar_t y0f = floor_small(y), x0f = floor_small(x);
        const scalar_t ly = y - y0f, lx = x - x0f, hy = 1 - ly, hx = 1 - lx;
        // Clamped before the integer conversion (huge or NaN offsets): outside stays outside.
        const int32_t y0 = static_cast<int32_t>(clamp_coordinate(y0f, scalar_t(H)));
        const int32_t x0 = static_cast<int32_t>(clamp_coordinate(x0f, scalar_t(W)));
        // Corner validity as all-ones/zero masks: (unsigned) v < H is 0 <= v < H.
        const int32_t vy0 = -int32_t(uint32_t(y0) < uint32_t(H)), vy1 = -int32_t(uint32_t(y0 + 1) < uint32_t(H));
        const int32_t vx0 = -int32_t(uint32_t(x0) < uint32_t(W)), vx1 = -int32_t(uint32_t(x0 + 1) < uint32_t(W));
        const int32_t at = y0 * W + x0;
        p.index[0][i] = ((at + 1) & vy0 & vx0) - 1;
        p.index[1][i] = ((at + 2) & vy0 & vx1) - 1;
        p.index[2][i] = ((at + W + 1) & vy1 & vx0) - 1;
        p.index[3][i] = ((at + W + 2) & vy1 & vx1) - 1;
        const scalar_t in_weights = kMaskInWeights ? msk[i] : scalar_t(1);  // x * 1 is exact: x
        p.weight[0][i] = (hy * hx) * in_weights;
        p.weight[1][i] = (hy * lx) * in_weights;
        p.weight[2][i] = (ly * hx) * in_weights;
        p.weight[3][i] = (ly * lx) * in_weights;
        p.mask[i] = msk[i];
        p.ly[i] = ly;
        p.lx[i] = lx;
      }
    }
  }
}

// Plan the rows [row0, row0 + rows) block by block (blocks of at most kPlanRows rows inside one
// image) and call body(b, r, n) for each: image b, rows [r, r + n) relative to row0, plans filled.
// offset: (N, G, K, 2, L) and mask: (N, G, K, L) or null, i.e. the caller's NCHW tensors read in
// place, images g.offset_batch_stride and g.mask_batch_stride apart. kMaskInWeights: see plan_rows.
template <typename scalar_t, bool kMaskInWeights, typename Body>
void for_planned_blocks(const Geometry& g, const scalar_t* offset, const scalar_t* mask, int64_t row0, int64_t rows,
                        const Body& body) {
  const int64_t L = g.out_size();
  const TapGrid taps(g);
  std::vector<TapPlan<scalar_t>> plans(g.offset_groups * g.kernel_size());
  for (int64_t r = 0; r < rows;) {
    const int64_t row = row0 + r, b = row / L, l0 = row % L;
    const int64_t n = std::min({kPlanRows, rows - r, L - l0});
    plan_rows<scalar_t, kMaskInWeights>(g, offset, mask, b, l0, n, taps, plans.data());
    body(b, r, n, static_cast<const TapPlan<scalar_t>*>(plans.data()));
    r += n;
  }
}

// The four corners of row i of a planned tap in `image` (H, W, C; the input or its gradient), from
// channel `channel_at` on, into pt; corners outside the image point at `outside` (a zero row to read,
// a scratch row to write). When all four are inside (most rows) they are one pixel, its right
// neighbour and the two below, found without the per-corner selects.
template <typename scalar_t, typename T>
inline void corner_pointers(const Geometry& g, const TapPlan<scalar_t>& p, int64_t i, T* image, int64_t channel_at,
                            T* outside, T* (&pt)[4]) {
  const int64_t C = g.channels;
  const int32_t first = p.index[0][i], last = p.index[3][i];
  if (__builtin_expect((first | last) >= 0, 1)) {  // corners 0 and 3 inside: all four are
    pt[0] = image + static_cast<int64_t>(first) * C + channel_at;
    pt[1] = pt[0] + C;
    pt[2] = pt[0] + g.width * C;
    pt[3] = pt[2] + C;
    return;
  }
  for (int q = 0; q < 4; ++q) {
    const int32_t at = p.index[q][i];
    pt[q] = at >= 0 ? image + static_cast<int64_t>(at) * C + channel_at : outside;
  }
}

// Sample row i of a planned block into dst_row, laid out (K, C); image: (H, W, C) of the block's
// image. CG: channels per offset group known at compile time (0: read from g). The channel loops
// are then fixed-length, so short ones (U-Net widths, 8-64) vectorise without scalar remainders.
template <typename scalar_t, int64_t CG>
inline void sample_planned_row(const Geometry& g, const TapPlan<scalar_t>* plans, const scalar_t* image,
                               const scalar_t* zero, int64_t i, scalar_t* dst_row) {
  const int64_t K = g.kernel_size(), C = g.channels;
  const int64_t G = g.offset_groups, Cg = CG ? CG : g.channels_per_offset_group();
  for (int64_t grp = 0; grp < G; ++grp) {
    for (int64_t k = 0; k < K; ++k) {
      const TapPlan<scalar_t>& p = plans[grp * K + k];
      const scalar_t* pt[4];
      corner_pointers(g, p, i, image, grp * Cg, zero, pt);
      // Planned with the mask in the weights (for_planned_blocks<scalar_t, true>).
      const scalar_t w0 = p.weight[0][i], w1 = p.weight[1][i], w2 = p.weight[2][i], w3 = p.weight[3][i];
      const scalar_t *p0 = pt[0], *p1 = pt[1], *p2 = pt[2], *p3 = pt[3];
      scalar_t* __restrict__ dst = dst_row + k * C + grp * Cg;
#pragma omp simd
      for (int64_t ch = 0; ch < Cg; ++ch) {
        dst[ch] = w0 * p0[ch] + w1 * p1[ch] + w2 * p2[ch] + w3 * p3[ch];
      }
    }
  }
}

// Fill `rows` rows of columns, starting at global row `row0` (row = b * L + l), laid out
// (row, K, C); input: (N, H, W, C).
template <typename scalar_t, int64_t CG>
void sample_rows_cg(const Geometry& g, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                    const scalar_t* zero, int64_t row0, int64_t rows, scalar_t* columns) {
  const int64_t KC = g.kernel_size() * g.channels, image_size = g.height * g.width * g.channels;
  for_planned_blocks<scalar_t, true>(g, offset, mask, row0, rows, [&](int64_t b, int64_t r, int64_t n, const TapPlan<scalar_t>* plans) {
    for (int64_t i = 0; i < n; ++i) {
      sample_planned_row<scalar_t, CG>(g, plans, input + b * image_size, zero, i, columns + (r + i) * KC);
    }
  });
}

// A 32-byte GCC vector of scalar_t (8 floats, 4 doubles), with unaligned loads and stores.
template <typename scalar_t>
struct Vector32 {
  static constexpr int64_t lanes = 32 / static_cast<int64_t>(sizeof(scalar_t));
  typedef scalar_t type __attribute__((vector_size(32)));
};

template <typename V, typename scalar_t>
inline V load_vector(const scalar_t* from) {
  V v;
  std::memcpy(&v, from, sizeof(V));
  return v;
}

template <typename V, typename scalar_t>
inline void store_vector(scalar_t* to, const V& v) {
  std::memcpy(to, &v, sizeof(V));
}

// Pairwise sums of adjacent lanes of a, then of b: {a0 + a1, a2 + a3, ..., b0 + b1, ...}.
// (__builtin_shufflevector from GCC 12 and in Clang; __builtin_shuffle in older GCC.)
template <typename V>
inline V pair_sums(const V& a, const V& b) {
  if constexpr (sizeof(a[0]) == 4) {
#if defined(__clang__) || __GNUC__ >= 12
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
#else
    typedef int32_t Mask __attribute__((vector_size(32)));
    return __builtin_shuffle(a, b, Mask{0, 2, 4, 6, 8, 10, 12, 14}) +
           __builtin_shuffle(a, b, Mask{1, 3, 5, 7, 9, 11, 13, 15});
#endif
  } else {
#if defined(__clang__) || __GNUC__ >= 12
    return __builtin_shufflevector(a, b, 0, 2, 4, 6) + __builtin_shufflevector(a, b, 1, 3, 5, 7);
#else
    typedef int64_t Mask __attribute__((vector_size(32)));
    return __builtin_shuffle(a, b, Mask{0, 2, 4, 6}) + __builtin_shuffle(a, b, Mask{1, 3, 5, 7});
#endif
  }
}

// The lane sums of a, b, c and d in lanes 0-3, reduced together (levels of pair sums instead of
// four chains of lane-by-lane adds).
template <typename V>
inline V sum_four(const V& a, const V& b, const V& c, const V& d) {
  const V level2 = pair_sums(pair_sums(a, b), pair_sums(c, d));
  if constexpr (sizeof(a[0]) == 4) {
    return pair_sums(level2, level2);  // 8 lanes: one more level
  } else {
    return level2;
  }
}

// Where the backward of one planned block writes: the image and its input gradient (null: not
// needed), the offset and mask gradients (null: not needed) and two scratch rows of Cg values that
// take the writes nobody reads (input gradient at outside corners, columns when not needed).
template <typename scalar_t>
struct ScatterTargets {
  const scalar_t* image;
  scalar_t* grad_image;
  scalar_t* grad_offset;
  scalar_t* grad_mask;
  const scalar_t* zero;
  scalar_t* scratch_grad;
  scalar_t* scratch_columns;
};

// Row i (output position l of image b) of a planned block: scatter the column gradient row
// gcol_row (K, C) into the input gradient and reduce it into the offset/mask gradients; with
// col_row, also sample the forward's columns (for the weight gradient) while the corners are in
// cache. Bilinear sampling follows torchvision: outside corners read zero; the gradient w.r.t. a
// coordinate is the one-sided derivative through floor().
template <typename scalar_t, int64_t CG>
inline void scatter_planned_row(const Geometry& g, const TapPlan<scalar_t>* plans, const ScatterTargets<scalar_t>& t,
                                int64_t b, int64_t l, int64_t i, const scalar_t* gcol_row, scalar_t* col_row) {
  const int64_t L = g.out_size(), K = g.kernel_size(), C = g.channels;
  const int64_t G = g.offset_groups, Cg = CG ? CG : g.channels_per_offset_group();
  const int64_t off_at = b * G * K * 2 * L + l * g.grad_offset_pixel_stride;  // (N, G * K * 2, L)
  const int64_t msk_at = b * G * K * L + l * g.grad_mask_pixel_stride;          // (N, G * K, L)
  const int64_t off_channel = g.grad_offset_channel_stride, msk_channel = g.grad_mask_channel_stride;
  for (int64_t grp = 0; grp < G; ++grp) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t plane = grp * K + k;
      const TapPlan<scalar_t>& p = plans[plane];
      const scalar_t m = p.mask[i];
      const scalar_t* __restrict__ gc = gcol_row + k * C + grp * Cg;
      // One pass over the channels does everything: the input gradient at the four corners, the
      // columns, and four dot products of the column gradient (with corner 0 and with the other
      // corners' differences to it), from which the offset and mask gradients follow (the
      // derivatives of the sample in y and x, and the sample itself, are fixed combinations of the
      // corners).
      // Corners outside the image read zeros and add their input gradient into a scratch row.
      const scalar_t* pt[4];
      scalar_t* gpt[4];
      corner_pointers(g, p, i, t.image, grp * Cg, t.zero, pt);
      if (t.grad_image) {
        corner_pointers(g, p, i, t.grad_image, grp * Cg, t.scratch_grad, gpt);
      } else {
        std::fill_n(gpt, 4, t.scratch_grad);
      }
      const scalar_t b0 = p.weight[0][i], b1 = p.weight[1][i], b2 = p.weight[2][i], b3 = p.weight[3][i];
      const scalar_t w0 = b0 * m, w1 = b1 * m, w2 = b2 * m, w3 = b3 * m;
      const scalar_t *p0 = pt[0], *p1 = pt[1], *p2 = pt[2], *p3 = pt[3];
      scalar_t *g0 = gpt[0], *g1 = gpt[1], *g2 = gpt[2], *g3 = gpt[3];
      scalar_t* __restrict__ col = col_row ? col_row + k * C + grp * Cg : t.scratch_columns;
      // d0 = gcol . corner 0 and e_q = gcol . (corner q - corner 0): the differences are taken per
      // channel, before the sums, so that a large common level of the corners (inputs with a large
      // mean) cancels exactly instead of in the difference of two large sums.
      scalar_t d0 = 0, e1 = 0, e2 = 0, e3 = 0;
      if (Cg % Vector32<scalar_t>::lanes == 0) {
        // Whole 32-byte vectors: the four sums stay vectors until one joint reduction at the end
        // (GCC reduces an `omp simd` sum lane by lane, a chain of 8 dependent adds per sum).
        using V = typename Vector32<scalar_t>::type;
        constexpr int64_t lanes = Vector32<scalar_t>::lanes;
        V acc0 = V{} + scalar_t(0), acc1 = acc0, acc2 = acc0, acc3 = acc0;  // d0, e1, e2, e3
        for (int64_t ch = 0; ch < Cg; ch += lanes) {
          const V v0 = load_vector<V>(p0 + ch), v1 = load_vector<V>(p1 + ch), v2 = load_vector<V>(p2 + ch),
                  v3 = load_vector<V>(p3 + ch), gch = load_vector<V>(gc + ch);
          store_vector(col + ch, w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3);
          store_vector(g0 + ch, load_vector<V>(g0 + ch) + w0 * gch);
          store_vector(g1 + ch, load_vector<V>(g1 + ch) + w1 * gch);
          store_vector(g2 + ch, load_vector<V>(g2 + ch) + w2 * gch);
          store_vector(g3 + ch, load_vector<V>(g3 + ch) + w3 * gch);
          acc0 += gch * v0;
          acc1 += gch * (v1 - v0);
          acc2 += gch * (v2 - v0);
          acc3 += gch * (v3 - v0);
        }
        const V sums = sum_four(acc0, acc1, acc2, acc3);
        d0 = sums[0];
        e1 = sums[1];
        e2 = sums[2];
        e3 = sums[3];
      } else {
#pragma omp simd reduction(+ : d0, e1, e2, e3)
        for (int64_t ch = 0; ch < Cg; ++ch) {
          const scalar_t v0 = p0[ch], v1 = p1[ch], v2 = p2[ch], v3 = p3[ch], gch = gc[ch];
          col[ch] = w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3;
          g0[ch] += w0 * gch;
          g1[ch] += w1 * gch;
          g2[ch] += w2 * gch;
          g3[ch] += w3 * gch;
          d0 += gch * v0;
          e1 += gch * (v1 - v0);
          e2 += gch * (v2 - v0);
          e3 += gch * (v3 - v0);
        }
      }
      const scalar_t ly = p.ly[i], lx = p.lx[i], hy = 1 - ly, hx = 1 - lx;
      // The sample's derivatives: hx (v2 - v0) + lx (v3 - v1) in y, hy (v1 - v0) + ly (v3 - v2) in x.
      const scalar_t sum_y = hx * e2 + lx * (e3 - e1), sum_x = hy * e1 + ly * (e3 - e2);
      const scalar_t sum_mask = (b0 + b1 + b2 + b3) * d0 + b1 * e1 + b2 * e2 + b3 * e3;  // gcol . sample
      if (t.grad_offset) {
        t.grad_offset[off_at + 2 * plane * off_channel] = m * sum_y;
        t.grad_offset[off_at + (2 * plane + 1) * off_channel] = m * sum_x;
      }
      if (t.grad_mask) t.grad_mask[msk_at + plane * msk_channel] = sum_mask;
    }
  }
}

// For `rows` rows starting at global row `row0`: scatter_planned_row for each, with the column
// gradients grad_columns (rows, K, C) and, when not null, the columns written to `columns`.
// The caller owns the images these rows touch.
template <typename scalar_t, int64_t CG>
void scatter_rows_cg(const Geometry& g, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                     const scalar_t* grad_columns, int64_t row0, int64_t rows, scalar_t* grad_input,
                     scalar_t* grad_offset, scalar_t* grad_mask, const scalar_t* zero, scalar_t* columns) {
  const int64_t L = g.out_size(), KC = g.kernel_size() * g.channels, image_size = g.height * g.width * g.channels;
  std::vector<scalar_t> scratch_grad(g.channels_per_offset_group()), scratch_columns(g.channels_per_offset_group());
  for_planned_blocks<scalar_t, false>(g, offset, mask, row0, rows, [&](int64_t b, int64_t r, int64_t n, const TapPlan<scalar_t>* plans) {
    const ScatterTargets<scalar_t> t{input + b * image_size, grad_input ? grad_input + b * image_size : nullptr,
                                     grad_offset, grad_mask, zero, scratch_grad.data(), scratch_columns.data()};
    const int64_t l0 = (row0 + r) % L;
    for (int64_t i = 0; i < n; ++i) {
      scatter_planned_row<scalar_t, CG>(g, plans, t, b, l0 + i, i, grad_columns + (r + i) * KC,
                                        columns ? columns + (r + i) * KC : nullptr);
    }
  });
}

// Calls body(std::integral_constant<int64_t, CG>) with CG = `channels` for the common widths, else 0.
template <typename Body>
void with_channel_count(int64_t channels, const Body& body) {
  switch (channels) {
    case 4: return body(std::integral_constant<int64_t, 4>());
    case 8: return body(std::integral_constant<int64_t, 8>());
    case 16: return body(std::integral_constant<int64_t, 16>());
    case 32: return body(std::integral_constant<int64_t, 32>());
    case 64: return body(std::integral_constant<int64_t, 64>());
    default: return body(std::integral_constant<int64_t, 0>());
  }
}

template <typename scalar_t>
void sample_rows(const Geometry& g, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                 const scalar_t* zero, int64_t row0, int64_t rows, scalar_t* columns) {
  with_channel_count(g.channels_per_offset_group(), [&](auto cg) {
    sample_rows_cg<scalar_t, decltype(cg)::value>(g, input, offset, mask, zero, row0, rows, columns);
  });
}

template <typename scalar_t>
void scatter_rows(const Geometry& g, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                  const scalar_t* grad_columns, int64_t row0, int64_t rows, scalar_t* grad_input,
                  scalar_t* grad_offset, scalar_t* grad_mask, const scalar_t* zero, scalar_t* columns) {
  with_channel_count(g.channels_per_offset_group(), [&](auto cg) {
    scatter_rows_cg<scalar_t, decltype(cg)::value>(g, input, offset, mask, grad_columns, row0, rows, grad_input,
                                                   grad_offset, grad_mask, zero, columns);
  });
}

// The forward of narrow layers (4, 8, 16 or 32 output channels, one weight group: the U-Net's
// upper levels) skips the columns block and the BLAS GEMM. MKL's GEMM with 4-16 output channels
// runs at a fraction of the core's peak (3-5x the time of its arithmetic, measured), and a 1 MiB
// columns block evicts the image the sampling reads. Here, kTileRows rows at a time are sampled
// into a small buffer and multiplied by the weight while they are in L1 (U-Net shapes: 0.67-0.90x
// the forward's time at 8-16 channels in two runs, on par with BLAS at 32; one parallel region per
// call, which is what batch 1 gains). The same fusion in the backward (column gradients and weight
// gradient by own products) measured no faster than BLAS there, so the backward keeps its blocks.
constexpr int64_t kTileRows = 16;

// The vectors that hold O values of scalar_t: `count` GCC vectors of at most 32 bytes each.
template <typename scalar_t, int64_t O>
struct NarrowVectors {
  static constexpr int64_t bytes = std::min<int64_t>(32, O * static_cast<int64_t>(sizeof(scalar_t)));
  static constexpr int64_t lanes = bytes / static_cast<int64_t>(sizeof(scalar_t)), count = O / lanes;
  // Rows per step: at least 8 independent accumulators, so that FMA latency does not bound the loop.
  static constexpr int64_t rows = count >= 4 ? 2 : 8 / count;
  typedef scalar_t type __attribute__((vector_size(bytes)));
};

// N vectors from `from` into registers. GCC 12 keeps one memcpy of up to two vectors in registers
// (vector by vector it folds the loads into every FMA and the loop becomes load-bound), but sends a
// memcpy of four through the stack.
template <int64_t N, typename scalar_t, typename V>
inline void load_row(const scalar_t* from, V (&to)[N]) {
  if constexpr (N <= 2) {
    std::memcpy(to, from, sizeof(to));
  } else {
    for (int64_t v = 0; v < N; ++v) to[v] = load_vector<V>(from + v * int64_t(sizeof(V) / sizeof(scalar_t)));
  }
}

// c (rows, O) = a (rows, depth) x b (depth, O) (+ bias (O) when not null); O at compile time, so
// that the accumulators of several rows stay in registers while b streams from L1. Written with
// GCC vector types: with plain arrays GCC 12 kept one accumulator on the stack.
template <typename scalar_t, int64_t O>
void multiply_narrow(const scalar_t* a, int64_t rows, int64_t depth, const scalar_t* b, const scalar_t* bias,
                     scalar_t* c) {
  using NV = NarrowVectors<scalar_t, O>;
  using V = typename NV::type;
  constexpr int64_t N = NV::count, lanes = NV::lanes, R = NV::rows;
  V init[N];
  for (int64_t v = 0; v < N; ++v) {
    init[v] = V{} + scalar_t(0);
    if (bias) std::memcpy(&init[v], bias + v * lanes, sizeof(V));
  }
  int64_t r = 0;
  for (; r + R <= rows; r += R) {
    V acc[R][N];
    for (int64_t j = 0; j < R; ++j) {
      for (int64_t v = 0; v < N; ++v) acc[j][v] = init[v];
    }
    const scalar_t* ar = a + r * depth;
    for (int64_t d = 0; d < depth; ++d) {
      V bd[N];
      load_row<N>(b + d * O, bd);
      for (int64_t j = 0; j < R; ++j) {
        const scalar_t x = ar[j * depth + d];
        for (int64_t v = 0; v < N; ++v) acc[j][v] += x * bd[v];
      }
    }
    std::memcpy(c + r * O, acc, sizeof(acc));
  }
  for (; r < rows; ++r) {
    V acc[N];
    for (int64_t v = 0; v < N; ++v) acc[v] = init[v];
    for (int64_t d = 0; d < depth; ++d) {
      const scalar_t x = a[r * depth + d];
      V bd[N];
      load_row<N>(b + d * O, bd);
      for (int64_t v = 0; v < N; ++v) acc[v] += x * bd[v];
    }
    std::memcpy(c + r * O, acc, sizeof(acc));
  }
}

// Forward of a narrow layer for the rows [row0, row0 + rows): out is (N, Ho, Wo, O) when nhwc_out,
// else (N, O, Ho, Wo); weight_t: the weight as (K*C, O), contiguous.
template <typename scalar_t, int64_t CG, int64_t O>
void forward_narrow_rows(const Geometry& g, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                         const scalar_t* zero, const scalar_t* weight_t, const scalar_t* bias, int64_t row0,
                         int64_t rows, bool nhwc_out, scalar_t* out) {
  const int64_t L = g.out_size(), KC = g.kernel_size() * g.channels, image_size = g.height * g.width * g.channels;
  std::vector<scalar_t> columns(kTileRows * KC), product(kTileRows * O);
  for_planned_blocks<scalar_t, true>(g, offset, mask, row0, rows, [&](int64_t b, int64_t r, int64_t n, const TapPlan<scalar_t>* plans) {
    const scalar_t* image = input + b * image_size;
    const int64_t l0 = (row0 + r) % L;
    for (int64_t t0 = 0; t0 < n; t0 += kTileRows) {
      const int64_t tn = std::min(kTileRows, n - t0);
      for (int64_t i = 0; i < tn; ++i) {
        sample_planned_row<scalar_t, CG>(g, plans, image, zero, t0 + i, columns.data() + i * KC);
      }
      if (nhwc_out) {
        multiply_narrow<scalar_t, O>(columns.data(), tn, KC, weight_t, bias, out + (row0 + r + t0) * O);
        continue;
      }
      multiply_narrow<scalar_t, O>(columns.data(), tn, KC, weight_t, bias, product.data());
      scalar_t* planes = out + b * O * L + l0 + t0;
      for (int64_t o = 0; o < O; ++o) {
        for (int64_t i = 0; i < tn; ++i) planes[o * L + i] = product[i * O + o];
      }
    }
  });
}

// Whether the forward takes the narrow-layer kernel (see kTileRows).
bool use_narrow_kernels(const Geometry& g) {
  return g.weight_groups == 1 && (g.out_channels == 4 || g.out_channels == 8 || g.out_channels == 16 || g.out_channels == 32);
}

// Calls body(cg, o) with both as std::integral_constant: cg as with_channel_count, o = the output
// channels of a narrow layer (see use_narrow_kernels).
template <typename Body>
void with_narrow_layer(const Geometry& g, const Body& body) {
  with_channel_count(g.channels_per_offset_group(), [&](auto cg) {
    switch (g.out_channels) {
      case 4: return body(cg, std::integral_constant<int64_t, 4>());
      case 8: return body(cg, std::integral_constant<int64_t, 8>());
      case 16: return body(cg, std::integral_constant<int64_t, 16>());
      case 32: return body(cg, std::integral_constant<int64_t, 32>());
      default: TORCH_CHECK(false, "deform_conv2d: no narrow kernel for ", g.out_channels, " output channels");
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
  // The sampling plans hold pixel indices (y * W + x) in int32.
  TORCH_CHECK(g.height * g.width < (int64_t(1) << 30), "deform_conv2d: the CPU kernel takes images of fewer than 2^30 ",
              "pixels, got ", g.height, "x", g.width);
  return g;
}

// Rows per block: about 1 MiB of columns (stays in L2 between sampling and the GEMM), but at
// least 256 rows so that the weight matrix is streamed a few times only for wide layers.
int64_t block_rows(const Geometry& g, int64_t element_size) {
  const int64_t row_bytes = std::max<int64_t>(1, g.kernel_size() * g.channels * element_size);
  return std::max<int64_t>(256, (int64_t(1) << 20) / row_bytes);
}

// Columns block (rows, K*C) as g contiguous matrices (g, rows, K*C/g); a view when g == 1.
at::Tensor group_columns(const at::Tensor& columns, int64_t rows, int64_t K, int64_t C, int64_t groups) {
  if (groups == 1) return columns.view({1, rows, K * C});
  return columns.view({rows, K, groups, C / groups}).permute({2, 0, 1, 3}).reshape({groups, rows, K * (C / groups)});
}

// Depth and width of the pieces multiply_rows hands to the ukernel: a (512, 64) panel of B
// (128 KiB) stays in L2 while the rows of A stream past it.
constexpr int64_t kPanelDepth = 512, kPanelWidth = 64;

// ATen keeps every brgemm kernel it generates, per thread and shape, for the life of the process.
// Training or evaluating at one resolution needs a few dozen product shapes, but inference over
// images of many sizes would keep adding kernels. Past kUkernelShapes distinct shapes of
// multiply_rows (each up to 8 ukernels per thread: panel tails x accumulate flag), new shapes run
// through ATen's mm instead (same values up to float rounding).
#ifdef CPUBLAS_BRGEMM_F32F32F32
constexpr size_t kUkernelShapes = 1024;

bool ukernel_admits(const std::array<int64_t, 7>& shape) {
  static std::mutex lock;
  static std::set<std::array<int64_t, 7>> shapes;
  std::lock_guard<std::mutex> guard(lock);
  if (shapes.count(shape) > 0) return true;
  if (shapes.size() >= kUkernelShapes) {
    TORCH_WARN_ONCE("deform_conv2d: more than ", kUkernelShapes, " GEMM shapes (many input sizes); new shapes ",
                    "use ATen's BLAS GEMM instead of oneDNN's ukernel, which is slower on some CPUs");
    return false;
  }
  shapes.insert(shape);
  return true;
}
#endif

// Row-major c (m, n) = a (m, k) x b (k, n), or c += a x b when `accumulate`; on the calling thread.
// Float goes through oneDNN's brgemm ukernel where ATen has it: on one core it ran 1.15-1.25x
// faster than MKL's sgemm on this kernel's block shapes, because MKL takes its AVX2 path on AMD
// CPUs. Double (and float on older ATen) goes through ATen's mm.
template <typename scalar_t>
void multiply_rows(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb,
                   scalar_t* c, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;  // an empty product (a layer without output channels)
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (k == 0) {  // an empty sum (a layer without output channels): the ukernel would not write c
      for (int64_t r = 0; r < m && !accumulate; ++r) std::fill_n(c + r * ldc, n, scalar_t(0));
      return;
    }
    if (ukernel_admits({m, n, k, lda, ldb, ldc, accumulate})) {
      for (int64_t k0 = 0; k0 < k; k0 += kPanelDepth) {
        for (int64_t n0 = 0; n0 < n; n0 += kPanelWidth) {
          at::native::cpublas::brgemm(m, std::min(kPanelWidth, n - n0), std::min(kPanelDepth, k - k0), lda, ldb,
                                      ldc, accumulate || k0 > 0, a + k0, b + k0 * ldb + n0, c + n0, false);
        }
      }
      return;
    }
  }
#endif
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto a_t = at::from_blob(const_cast<scalar_t*>(a), {m, k}, {lda, 1}, options);
  const auto b_t = at::from_blob(const_cast<scalar_t*>(b), {k, n}, {ldb, 1}, options);
  auto c_t = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (accumulate) {
    c_t.addmm_(a_t, b_t);
  } else {
    at::mm_out(c_t, a_t, b_t);
  }
}

#if defined(__AVX__)
// One 8 x 8 float block transposed in registers: pairs interleaved, then quadruples, then halves.
inline void transpose_8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 row[8], pair[8], quad[8];
  for (int i = 0; i < 8; ++i) row[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    pair[i] = _mm256_unpacklo_ps(row[i], row[i + 1]);
    pair[i + 1] = _mm256_unpackhi_ps(row[i], row[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    quad[i] = _mm256_shuffle_ps(pair[i], pair[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    quad[i + 1] = _mm256_shuffle_ps(pair[i], pair[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    quad[i + 2] = _mm256_shuffle_ps(pair[i + 1], pair[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    quad[i + 3] = _mm256_shuffle_ps(pair[i + 1], pair[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(quad[i], quad[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(quad[i], quad[i + 4], 0x31));
  }
}
#endif

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, on the calling thread: 8 x 8
// blocks (in registers where the build has AVX) inside 16 x 16 tiles, whose reads and writes are
// whole cache lines. ATen's strided copy ran 2-4x slower on this kernel's layouts, worst on planes
// of 1024 pixels, whose 4 KiB stride sends every read of a column to the same cache set.
template <typename scalar_t>
void transpose_into(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld_src, scalar_t* dst, int64_t ld_dst) {
  constexpr int64_t kTile = 16, kBlock = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r_end = std::min(rows, r0 + kTile);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c_end = std::min(cols, c0 + kTile);
      for (int64_t r1 = r0; r1 < r_end; r1 += kBlock) {
        for (int64_t c1 = c0; c1 < c_end; c1 += kBlock) {
#if defined(__AVX__)
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (r1 + kBlock <= r_end && c1 + kBlock <= c_end) {
              transpose_8x8(src + r1 * ld_src + c1, ld_src, dst + c1 * ld_dst + r1, ld_dst);
              continue;
            }
          }
#endif
          for (int64_t r = r1; r < std::min(r_end, r1 + kBlock); ++r) {
            for (int64_t c = c1; c < std::min(c_end, c1 + kBlock); ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
          }
        }
      }
    }
  }
}

// Per image, (a, b) planes -> (b, a) planes into `result`, on all threads, in pieces of 256 of b.
void transpose_images_into(const at::Tensor& t, int64_t a, int64_t b, at::Tensor& result) {
  constexpr int64_t kPiece = 256;
  const int64_t images = t.size(0), pieces = (b + kPiece - 1) / kPiece;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "dcn_transpose_images", [&] {
    const scalar_t* from = t.data_ptr<scalar_t>();
    scalar_t* to = result.data_ptr<scalar_t>();
    at::parallel_for(0, images * pieces, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / pieces, b0 = (i % pieces) * kPiece;
        transpose_into(from + n * a * b + b0, a, std::min(kPiece, b - b0), b, to + n * a * b + b0 * a, a);
      }
    });
  });
}

at::Tensor transpose_images(const at::Tensor& t, int64_t a, int64_t b, at::IntArrayRef result_shape) {
  auto result = at::empty(result_shape, t.options());
  transpose_images_into(t, a, b, result);
  return result;
}

// Scratch tensors that live only inside one call (the channels-last copies of the input and of
// grad_out, the channels-last input gradient before it is transposed, the weight reordered for the
// products, the column blocks of each worker thread, the weight-gradient partials) are views of
// memory kept per thread and reused by its next call. Fresh buffers of these sizes come from mmap and
// are page-faulted in on every call: on the U-Net's 8ch@128 forward+backward (1 thread) the OS
// clearing pages took ~20 % of the time, and on ResNet-34's 512ch@4 (2 threads, where the weight
// alone is 9.4 MB) ~30 %. Buffers over 64 MiB are allocated per call instead. One slot per use, so
// that no two tensors alive at once on one thread share memory.
enum class Scratch {
  kInput,
  kGradOut,
  kGradInput,
  kWeight,
  kColumns,
  kColumnsByChannel,
  kGradColumns,
  kProduct,
  kWeightGrad,
  kOffset,
  kMask,
  kCount
};

at::Tensor scratch(Scratch slot, at::IntArrayRef shape, const at::TensorOptions& options) {
  constexpr size_t kSlots = static_cast<size_t>(Scratch::kCount);
  thread_local std::array<c10::DataPtr, kSlots> kept;
  thread_local std::array<size_t, kSlots> kept_bytes{};
  const size_t bytes = c10::multiply_integers(shape) * options.dtype().itemsize();
  if (bytes > (size_t(64) << 20)) return at::empty(shape, options);
  const auto i = static_cast<size_t>(slot);
  if (kept_bytes[i] < bytes) {
    kept[i] = c10::GetCPUAllocator()->allocate(bytes);
    kept_bytes[i] = bytes;
  }
  return at::from_blob(kept[i].get(), shape, options);  // no owner: valid until this thread's next call
}

// Weight (O, C/g, kh, kw) as (g, O/g, K*C/g), matching the column layout (k, c) of each group; in
// the calling thread's kWeight scratch.
at::Tensor weight_matrix(const at::Tensor& weight, int64_t groups) {
  const int64_t O = weight.size(0), Cg = weight.size(1), K = weight.size(2) * weight.size(3);
  auto result = scratch(Scratch::kWeight, {O, K, Cg}, weight.options());
  transpose_images_into(weight.contiguous(), Cg, K, result);
  return result.view({groups, O / groups, K * Cg});
}

// Weight (O, C, kh, kw) of one weight group as (K*C, O), the B operand of the forward's products;
// in the calling thread's kWeight scratch. One pass over the weight: blocks of 16 outputs, whose
// rows are read once and whose 16 values in each result row fill one 64-byte line.
at::Tensor weight_by_output(const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const int64_t O = w.size(0), C = w.size(1), K = w.size(2) * w.size(3);
  auto result = scratch(Scratch::kWeight, {K * C, O}, w.options());
  constexpr int64_t kOutputs = 16;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "dcn_weight_by_output", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = result.data_ptr<scalar_t>();
    at::parallel_for(0, (O + kOutputs - 1) / kOutputs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t o0 = begin * kOutputs; o0 < std::min(O, end * kOutputs); o0 += kOutputs) {
        const int64_t o1 = std::min(O, o0 + kOutputs);
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t k = 0; k < K; ++k) {
            for (int64_t o = o0; o < o1; ++o) dst[(k * C + c) * O + o] = src[(o * C + c) * K + k];
          }
        }
      }
    });
  });
  return result;
}

// (N, C, H, W) -> contiguous (N, H, W, C): a view of a channels-last tensor, else a copy into `slot`.
at::Tensor channels_last_rows(const at::Tensor& t, Scratch slot) {
  if (!t.is_contiguous()) return t.permute({0, 2, 3, 1}).contiguous();  // a view if channels-last
  auto rows = scratch(slot, {t.size(0), t.size(2), t.size(3), t.size(1)}, t.options());
  transpose_images_into(t, t.size(1), t.size(2) * t.size(3), rows);
  return rows;
}

// An (N, P, H, W) offset or mask tensor as the kernels read it, per image P contiguous planes; its
// stride(0) is the distance between images. In place when each image's planes are contiguous,
// whatever the distance between images: a channel slice of a larger tensor, as DCNv2's split of one
// predicted tensor into offsets and mask gives (a copy cost a pass over the offsets in every forward
// and backward). Channels-last tensors, and channel slices of them (a channels-last model's offsets),
// are transposed per image into `slot` (ATen's strided copy of these cost about a third of the
// deformable op's own time in a channels-last U-Net). Anything else: a contiguous copy.
at::Tensor readable_planes(const at::Tensor& t, Scratch slot) {
  if (t.size(0) == 0 || t.select(0, 0).is_contiguous()) return t;
  const int64_t P = t.size(1), H = t.size(2), W = t.size(3), pixel_stride = t.stride(3);
  const bool pixel_rows = t.stride(1) == 1 && pixel_stride >= P && t.stride(2) == W * pixel_stride;
  if (!pixel_rows) return t.contiguous();
  auto planes = scratch(slot, {t.size(0), P, H, W}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "dcn_readable_planes", [&] {
    const scalar_t* from = t.data_ptr<scalar_t>();
    scalar_t* to = planes.data_ptr<scalar_t>();
    at::parallel_for(0, t.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        transpose_into(from + n * t.stride(0), H * W, P, pixel_stride, to + n * P * H * W, H * W);
      }
    });
  });
  return planes;
}

// The offset and mask (undefined without one) as the kernels read them (readable_planes), with their
// distances between images recorded in g.
std::pair<at::Tensor, at::Tensor> read_offset_and_mask(const at::Tensor& offset_, const c10::optional<at::Tensor>& mask_,
                                                       Geometry& g) {
  const at::Tensor offset = readable_planes(offset_, Scratch::kOffset);
  const bool has_mask = mask_.has_value() && mask_->defined();
  const at::Tensor mask = has_mask ? readable_planes(*mask_, Scratch::kMask) : at::Tensor();
  g.offset_batch_stride = offset.stride(0);
  g.mask_batch_stride = has_mask ? mask.stride(0) : 0;
  return {offset, mask};
}

// An empty gradient for an offset or mask tensor: channels-last for a tensor whose channels are
// innermost (a channels-last model's offsets and mask, sliced from one prediction), so that it joins
// that prediction's channels-last gradient without a copy; planes otherwise. The same rule as
// offset_gradient_format_of in deform_conv.py, which the op's fake kernel follows.
at::Tensor gradient_like(const at::Tensor& t, const at::TensorOptions& options) {
  const bool channels_innermost = !t.is_contiguous() && t.size(1) > 1 && t.stride(1) == 1;
  return at::empty(t.sizes(), options.memory_format(channels_innermost ? at::MemoryFormat::ChannelsLast
                                                                         : at::MemoryFormat::Contiguous));
}

// A (r, c) matrix with unit row stride (a transposed view) as a contiguous copy in this thread's
// kProduct scratch.
template <typename scalar_t>
at::Tensor contiguous_block(const at::Tensor& m) {
  if (m.is_contiguous()) return m;
  TORCH_INTERNAL_ASSERT(m.dim() == 2 && m.stride(0) == 1);
  auto result = scratch(Scratch::kProduct, {m.size(0), m.size(1)}, m.options());
  transpose_into(m.data_ptr<scalar_t>(), m.size(1), m.size(0), m.stride(1), result.data_ptr<scalar_t>(), m.size(1));
  return result;
}

at::Tensor planes_of_rows(const at::Tensor& t) {  // contiguous (N, H, W, C) -> contiguous (N, C, H, W)
  return transpose_images(t, t.size(1) * t.size(2), t.size(3), {t.size(0), t.size(3), t.size(1), t.size(2)});
}

// Call `body(row0, rows)` for blocks of at most `block` rows covering rows [r_begin, r_end),
// never crossing an image boundary: each image's part of the range is cut into equal blocks.
template <typename Body>
void for_blocks_of_rows(const Geometry& g, int64_t block, int64_t r_begin, int64_t r_end, const Body& body) {
  const int64_t L = g.out_size();
  for (int64_t start = r_begin; start < r_end;) {
    const int64_t end = std::min(r_end, (start / L + 1) * L), n = end - start;
    const int64_t pieces = (n + block - 1) / block, step = (n + pieces - 1) / pieces;
    for (int64_t row0 = start; row0 < end; row0 += step) body(row0, std::min(step, end - row0));
    start = end;
  }
}

// Call `body(row0, rows)` for blocks of about `block` rows covering images [b_begin, b_end).
// Blocks span image boundaries unless `within_images`, in which case each image is cut into
// equal blocks of at most `block` rows.
template <typename Body>
void for_blocks_of_images(const Geometry& g, int64_t block, bool within_images, int64_t b_begin,
                          int64_t b_end, const Body& body) {
  const int64_t L = g.out_size();
  if (within_images) return for_blocks_of_rows(g, block, b_begin * L, b_end * L, body);
  const int64_t end = b_end * L;
  for (int64_t row0 = b_begin * L; row0 < end; row0 += block) body(row0, std::min(block, end - row0));
}

// Whether NCHW planes are large enough for blocks inside one image (blocks of whole images
// otherwise): the backward then reads grad_out's planes in place instead of a channels-last copy.
bool use_planes_directly(const Geometry& g, int64_t block) {
  return g.out_size() >= std::min<int64_t>(block, 256);
}

// Splitting the work by image leaves cores idle when there are fewer images than about two per
// thread (batch-1 inference). Such batches are split by rows instead (each thread samples and
// multiplies its own rows, or, with few rows, samples its share and then multiplies its share of
// the output channels; see the forward), and the backward by blocks of rows.
bool split_by_rows(const Geometry& g) {
  return g.batch < 2 * static_cast<int64_t>(at::get_num_threads());
}

// The caller's thread-local modes for a worker thread, which does not inherit them: grad mode off,
// and InferenceMode as the caller has it (a forward under inference_mode makes its output an
// inference tensor, which the workers' GEMMs write into).
struct WorkerModes {
  explicit WorkerModes(bool inference) : inference_mode(inference) {}
  c10::InferenceMode inference_mode;
  at::NoGradGuard no_grad;
};

// Rows a thread needs for its own GEMM to run near full speed (see row_ranges in the forward).
constexpr int64_t kRowsPerThread = 256;

// Rows per piece of a row-split batch: the columns of one piece stay below about 64 MiB.
int64_t rows_per_piece(const Geometry& g, int64_t element_size) {
  const int64_t row_bytes = std::max<int64_t>(1, g.kernel_size() * g.channels * element_size);
  return std::max<int64_t>(256, (int64_t(64) << 20) / row_bytes);
}

// Sample `rows` rows from global row `row0` into `cols` on all threads (rows are independent).
template <typename scalar_t>
void sample_rows_parallel(const Geometry& g, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                          const scalar_t* zero, int64_t row0, int64_t rows, scalar_t* cols) {
  const int64_t row_elems = g.kernel_size() * g.channels;
  at::parallel_for(0, rows, 16, [&](int64_t r_begin, int64_t r_end) {
    sample_rows<scalar_t>(g, input, offset, mask, zero, row0 + r_begin, r_end - r_begin, cols + r_begin * row_elems);
  });
}

// Forward of a small batch with few rows per thread (see row_ranges in the forward): per piece of
// one image, the columns are sampled on all threads and transposed to (C*K, rows), then the
// threads split the output channels: out^T (O, rows) = W (O, C*K) x cols^T, each thread reading
// its share of the weight in place. Deep layers at batch 1 hold more weight than columns (512
// channels at 4 px: 2.4M weights, 74K column values), so the weight is read once and never
// reordered, and no thread waits on another's GEMM. (MKL's threaded GEMM scaled 1.35x from 1 to
// 2 threads on 128 channels at 16 px, batch 1.)
template <typename scalar_t>
void forward_by_output_channels(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& bias, const at::Tensor& offset, const at::Tensor& mask,
                                const at::Tensor& zero, bool nhwc_out, at::Tensor& out) {
  const int64_t L = g.out_size(), K = g.kernel_size(), C = g.channels, O = g.out_channels;
  const int64_t groups = g.weight_groups, Og = O / groups, depth = (C / groups) * K;  // per group
  const bool inference = c10::InferenceMode::is_enabled();
  const at::Tensor w = weight.contiguous();  // (O, C/g, kh, kw): per group (O/g, C/g * K), (c, k) order
  const scalar_t* w_data = w.data_ptr<scalar_t>();
  const scalar_t* bias_data = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const int64_t piece = rows_per_piece(g, input.element_size());
  const int64_t threads = static_cast<int64_t>(at::get_num_threads());
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t l0 = 0; l0 < L; l0 += piece) {
      const int64_t rows = std::min(piece, L - l0), row0 = b * L + l0;
      auto cols = scratch(Scratch::kColumns, {rows, K * C}, input.options());
      auto cols_t = scratch(Scratch::kColumnsByChannel, {C * K, rows}, input.options());  // (c, k), as the weight
      sample_rows_parallel<scalar_t>(g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                     mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, zero.data_ptr<scalar_t>(),
                                     row0, rows, cols.data_ptr<scalar_t>());
      at::parallel_for(0, K, 1, [&](int64_t k_begin, int64_t k_end) {
        for (int64_t k = k_begin; k < k_end; ++k) {  // tap k's (rows, C) -> rows c * K + k of cols_t
          transpose_into(cols.data_ptr<scalar_t>() + k * C, rows, C, K * C, cols_t.data_ptr<scalar_t>() + k * rows,
                         K * rows);
        }
      });
      // NHWC output: the threads' (O, rows) products go through a scratch and are transposed.
      auto product = nhwc_out ? scratch(Scratch::kProduct, {O, rows}, input.options()) : at::Tensor();
      scalar_t* dst = nhwc_out ? product.data_ptr<scalar_t>() : out_data + b * O * L + l0;
      const int64_t ld_dst = nhwc_out ? rows : L;
      at::parallel_for(0, O, (O + threads - 1) / threads, [&](int64_t o_begin, int64_t o_end) {
        const WorkerModes modes(inference);
        for (int64_t o0 = o_begin; o0 < o_end;) {  // cut at weight-group boundaries
          const int64_t group = o0 / Og, o_count = std::min(o_end, (group + 1) * Og) - o0;
          if (bias_data != nullptr) {
            for (int64_t o = o0; o < o0 + o_count; ++o) std::fill_n(dst + o * ld_dst, rows, bias_data[o]);
          }
          multiply_rows<scalar_t>(o_count, rows, depth, w_data + o0 * depth, depth,
                                  cols_t.data_ptr<scalar_t>() + group * depth * rows, rows, dst + o0 * ld_dst, ld_dst,
                                  bias_data != nullptr);
          if (nhwc_out) {
            transpose_into(dst + o0 * ld_dst, o_count, rows, ld_dst, out_data + row0 * O + o0, O);
          }
          o0 += o_count;
        }
      });
    }
  }
}

at::Tensor deform_conv2d_forward(const at::Tensor& input_, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& offset_,
                                 const c10::optional<at::Tensor>& mask_, int64_t stride_h,
                                 int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                 int64_t dil_w, int64_t offset_groups) {
  Geometry g = make_geometry(input_, weight, offset_, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                             offset_groups);
  const int64_t L = g.out_size(), K = g.kernel_size(), C = g.channels, O = g.out_channels;
  const int64_t groups = g.weight_groups, Og = O / groups;
  const bool inference = c10::InferenceMode::is_enabled();
  // The output takes the input's memory format, like F.conv2d: a channels-last result for an
  // NCHW input would send the rest of the network down other (and, in oneDNN, buggy) kernels.
  const bool nhwc_out = input_.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  auto out = nhwc_out ? at::empty({g.batch, g.out_h, g.out_w, O}, input_.options())
                      : at::empty({g.batch, O, g.out_h, g.out_w}, input_.options());
  const auto as_nchw_view = [&](const at::Tensor& t) { return nhwc_out ? t.permute({0, 3, 1, 2}) : t; };
  if (g.batch == 0) return as_nchw_view(out);
  const at::Tensor input = channels_last_rows(input_, Scratch::kInput);
  const bool has_mask = mask_.has_value() && mask_->defined();
  const auto read = read_offset_and_mask(offset_, mask_, g);
  const at::Tensor &offset = read.first, &mask = read.second;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor zero = at::zeros({C}, input.options());  // the value of corners outside the image
  if (use_narrow_kernels(g)) {
    at::NoGradGuard no_grad;
    const at::Tensor weight_t = weight_by_output(weight.detach());  // (K*C, O)
    const at::Tensor bias_c = has_bias ? bias->detach().to(input.options()).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_forward_narrow", [&] {
      with_narrow_layer(g, [&](auto cg, auto o) {
        at::parallel_for(0, g.batch * L, kPlanRows, [&](int64_t begin, int64_t end) {
          forward_narrow_rows<scalar_t, decltype(cg)::value, decltype(o)::value>(
              g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), has_mask ? mask.data_ptr<scalar_t>() : nullptr,
              zero.data_ptr<scalar_t>(), weight_t.data_ptr<scalar_t>(), has_bias ? bias_c.data_ptr<scalar_t>() : nullptr,
              begin, end - begin, nhwc_out, out.data_ptr<scalar_t>());
        });
      });
    });
    return as_nchw_view(out);
  }
  // Small batches with enough rows for every thread's own GEMM: split the rows between the threads,
  // each sampling and multiplying its blocks (one parallel region instead of sample, GEMM, copy).
  const int64_t block = block_rows(g, input.element_size());
  const bool row_ranges = split_by_rows(g) && (nhwc_out || use_planes_directly(g, block)) &&
                          g.batch * L >= kRowsPerThread * static_cast<int64_t>(at::get_num_threads());
  // Otherwise small batches sample on all threads, then split the output channels.
  if (split_by_rows(g) && !row_ranges) {
    const at::Tensor bias_c = has_bias ? bias->detach().to(input.options()).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_forward_by_output_channels", [&] {
      forward_by_output_channels<scalar_t>(g, input, weight.detach(), bias_c, offset, mask, zero, nhwc_out, out);
    });
    return as_nchw_view(out);
  }
  // Per block of rows on one thread: out (rows, O) = cols (rows, K*C) x W^T, through the ukernel
  // for one weight group (W^T as (K*C, O)), through ATen's batched product for several.
  const bool ukernel_products = groups == 1;
  const at::Tensor wmat = ukernel_products ? at::Tensor() : weight_matrix(weight.detach(), groups);  // (g, O/g, K*C/g)
  const at::Tensor wmat_t = ukernel_products ? at::Tensor() : wmat.transpose(1, 2);  // GEMM operand, no copy
  const bool planes_direct = !nhwc_out && use_planes_directly(g, block);
  const at::Tensor weight_kc = ukernel_products ? weight_by_output(weight.detach()) : at::Tensor();  // (K*C, O)
  // NHWC output: each block's product goes straight into its rows of the output. NCHW: the product
  // (rows, O) goes through a scratch and is transposed into the planes, in blocks inside one image
  // for large images and of whole images for small ones (weight groups with large images: the
  // batched product writes the planes directly).
  const int64_t block_fw = (nhwc_out || planes_direct) ? block : std::max<int64_t>(1, block / L) * L;
  auto out_rows = nhwc_out ? out.view({g.batch * L, O}) : at::Tensor();
  auto out_planes = nhwc_out ? at::Tensor() : out.view({g.batch, groups, Og, L});
  const at::Tensor bias_column = has_bias ? bias->view({groups, Og, 1}) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_forward", [&] {
    const auto run_block = [&](int64_t row0, int64_t rows) {
      auto cols = scratch(Scratch::kColumns, {rows, K * C}, input.options());
      sample_rows<scalar_t>(g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                            has_mask ? mask.data_ptr<scalar_t>() : nullptr, zero.data_ptr<scalar_t>(), row0,
                            rows, cols.data_ptr<scalar_t>());
      if (planes_direct && groups > 1) {  // (g, O/g, rows) straight into the image's planes
        auto dst = out_planes[row0 / L].narrow(2, row0 % L, rows);
        dst.copy_(at::bmm(wmat, group_columns(cols, rows, K, C, groups).transpose(1, 2)));
        if (has_bias) dst.add_(bias_column);
        return;
      }
      auto dst = nhwc_out ? out_rows.narrow(0, row0, rows) : scratch(Scratch::kProduct, {rows, O}, input.options());
      if (groups == 1) {
        multiply_rows<scalar_t>(rows, O, K * C, cols.data_ptr<scalar_t>(), K * C, weight_kc.data_ptr<scalar_t>(), O,
                                dst.data_ptr<scalar_t>(), O, false);
      } else {
        auto grouped = at::bmm(group_columns(cols, rows, K, C, groups), wmat_t);  // (g, rows, O/g)
        dst.view({rows, groups, Og}).copy_(grouped.transpose(0, 1));
      }
      if (has_bias) dst.add_(*bias);
      if (nhwc_out) return;
      for (int64_t r = 0; r < rows;) {  // rows (rows, O) -> each image's planes (O, L)
        const int64_t b = (row0 + r) / L, l = (row0 + r) % L, n = std::min(rows - r, L - l);
        transpose_into(dst.data_ptr<scalar_t>() + r * O, n, O, O, out.data_ptr<scalar_t>() + b * O * L + l, L);
        r += n;
      }
    };
    if (row_ranges) {
      at::parallel_for(0, g.batch * L, kRowsPerThread, [&](int64_t r_begin, int64_t r_end) {
        const WorkerModes modes(inference);
        for_blocks_of_rows(g, block_fw, r_begin, r_end, run_block);
      });
      return;
    }
    at::parallel_for(0, g.batch, 1, [&](int64_t b_begin, int64_t b_end) {
      const WorkerModes modes(inference);
      for_blocks_of_images(g, block_fw, planes_direct, b_begin, b_end, run_block);
    });
  });
  return as_nchw_view(out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward(
    const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& weight,
    const at::Tensor& offset_, const c10::optional<at::Tensor>& mask_, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
    int64_t offset_groups, bool need_input, bool need_offset, bool need_mask, bool need_weight,
    bool need_bias) {
  Geometry g = make_geometry(input_, weight, offset_, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                             offset_groups);
  const int64_t L = g.out_size(), K = g.kernel_size(), C = g.channels, O = g.out_channels;
  const int64_t groups = g.weight_groups, G = offset_groups, Og = O / groups, Cg = C / groups;
  const bool has_mask = mask_.has_value() && mask_->defined();
  need_mask = need_mask && has_mask;
  const auto opts = input_.options();
  const bool inference = c10::InferenceMode::is_enabled();

  // Channels-last here; an NCHW input's gradient is transposed into a new tensor at the end.
  const bool nhwc_in = input_.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  at::Tensor grad_input;
  if (need_input) {
    grad_input = nhwc_in ? at::empty({g.batch, g.height, g.width, C}, opts)
                         : scratch(Scratch::kGradInput, {g.batch, g.height, g.width, C}, opts);
    grad_input.zero_();
  }
  at::Tensor grad_offset = need_offset ? gradient_like(offset_, opts) : at::Tensor();
  at::Tensor grad_mask = need_mask ? gradient_like(*mask_, opts) : at::Tensor();
  if (need_offset) {
    g.grad_offset_channel_stride = grad_offset.stride(1);
    g.grad_offset_pixel_stride = grad_offset.stride(3);
  }
  if (need_mask) {
    g.grad_mask_channel_stride = grad_mask.stride(1);
    g.grad_mask_pixel_stride = grad_mask.stride(3);
  }
  at::Tensor grad_wmat;  // (g, O/g, K*Cg): the first chunk's partial, then the others added in order
  at::Tensor grad_bias = need_bias ? grad_out_.sum({0, 2, 3}) : at::Tensor();
  const bool need_scatter = need_input || need_offset || need_mask;

  if (g.batch > 0 && (need_scatter || need_weight)) {
    const at::Tensor input = channels_last_rows(input_, Scratch::kInput);
    const auto read = read_offset_and_mask(offset_, mask_, g);
    const at::Tensor &offset = read.first, &mask = read.second;
    const at::Tensor wmat = weight_matrix(weight.detach(), groups);  // (g, O/g, K*Cg)
    const at::Tensor zero = at::zeros({C}, opts);
    // The scatter pass holds the columns and their gradient at once: half the forward's blocks
    // (at least 128 rows) keep that pair within the memory of one forward block.
    const int64_t block = need_weight && need_scatter ? std::max<int64_t>(128, block_rows(g, input.element_size()) / 2)
                                                      : block_rows(g, input.element_size());
    // An NCHW gradient with large planes is read in place, per image (see the forward);
    // otherwise as (rows, O) after one channels-last copy.
    const bool planes_direct = grad_out_.is_contiguous() && use_planes_directly(g, block);
    const at::Tensor grad_planes = planes_direct ? grad_out_.view({g.batch, groups, Og, L}) : at::Tensor();
    const at::Tensor grad_rows = planes_direct ? at::Tensor() : channels_last_rows(grad_out_, Scratch::kGradOut).view({g.batch * L, O});
    // Per-chunk weight-gradient partials, summed in chunk order afterwards: the result does not
    // depend on which thread finishes first (bitwise-reproducible runs, exact resume).
    std::mutex partials_lock;
    std::map<int64_t, at::Tensor> partials;
    // Small batches are split by rows, in blocks inside one image; then the blocks of one thread
    // scatter into a private input gradient (two threads may touch the same pixels), and these are
    // summed in chunk order afterwards, like the weight-gradient partials.
    const bool by_rows = split_by_rows(g);
    std::vector<std::pair<int64_t, int64_t>> blocks;
    if (by_rows) {
      const int64_t wanted = 4 * static_cast<int64_t>(at::get_num_threads());
      const int64_t small = std::max<int64_t>(16, (g.batch * L + wanted - 1) / wanted);
      for_blocks_of_images(g, std::min(block, small), true, 0, g.batch,
                           [&](int64_t row0, int64_t rows) { blocks.emplace_back(row0, rows); });
    }
    std::map<int64_t, at::Tensor> input_partials;
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_backward", [&] {
      // One block of rows: weight-gradient partial into local_gw, scatter into gimage.
      const auto process = [&](int64_t row0, int64_t rows, at::Tensor& local_gw, scalar_t* gimage) {
        auto grad_grouped = planes_direct  // (g, rows, O/g)
                                ? grad_planes[row0 / L].narrow(2, row0 % L, rows).transpose(1, 2)
                                : grad_rows.narrow(0, row0, rows).view({rows, groups, Og}).transpose(0, 1);
        at::Tensor cols = need_weight ? scratch(Scratch::kColumns, {rows, K * C}, opts) : at::Tensor();
        if (need_scatter) {
          at::Tensor grad_cols;
          if (groups == 1) {  // (rows, K*C) = grad (rows, O) x W (O, K*C)
            const at::Tensor grad_block = contiguous_block<scalar_t>(grad_grouped[0]);
            grad_cols = scratch(Scratch::kGradColumns, {rows, K * C}, opts);
            multiply_rows<scalar_t>(rows, K * C, O, grad_block.data_ptr<scalar_t>(), O, wmat.data_ptr<scalar_t>(), K * C,
                                    grad_cols.data_ptr<scalar_t>(), K * C, false);
          } else {
            grad_cols = at::bmm(grad_grouped, wmat)  // (g, rows, K*Cg) -> (rows, K, g, Cg)
                            .view({groups, rows, K, Cg})
                            .permute({1, 2, 0, 3})
                            .reshape({rows, K * C});
          }
          // Samples the columns too (one pass over the bilinear corners for both jobs).
          scatter_rows<scalar_t>(g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                 has_mask ? mask.data_ptr<scalar_t>() : nullptr, grad_cols.data_ptr<scalar_t>(),
                                 row0, rows, gimage, need_offset ? grad_offset.data_ptr<scalar_t>() : nullptr,
                                 need_mask ? grad_mask.data_ptr<scalar_t>() : nullptr, zero.data_ptr<scalar_t>(),
                                 need_weight ? cols.data_ptr<scalar_t>() : nullptr);
        } else if (need_weight) {
          sample_rows<scalar_t>(g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                has_mask ? mask.data_ptr<scalar_t>() : nullptr, zero.data_ptr<scalar_t>(), row0,
                                rows, cols.data_ptr<scalar_t>());
        }
        if (need_weight && groups == 1) {  // W' (O, K*C) += grad^T (O, rows) x cols (rows, K*C)
          const at::Tensor grad_t = grad_grouped[0].t();
          const at::Tensor grad_by_output = grad_t.stride(1) == 1 ? grad_t : contiguous_block<scalar_t>(grad_t);
          multiply_rows<scalar_t>(O, K * C, rows, grad_by_output.data_ptr<scalar_t>(), grad_by_output.stride(0),
                                  cols.data_ptr<scalar_t>(), K * C, local_gw.data_ptr<scalar_t>(), K * C, true);
        } else if (need_weight) {
          local_gw.baddbmm_(grad_grouped.transpose(1, 2), group_columns(cols, rows, K, C, groups));
        }
      };
      if (by_rows) {
        at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t i_begin, int64_t i_end) {
          const WorkerModes modes(inference);
          at::Tensor local_gw = need_weight ? at::zeros({groups, Og, K * Cg}, opts) : at::Tensor();
          at::Tensor local_gi = need_input ? at::zeros_like(grad_input) : at::Tensor();
          for (int64_t i = i_begin; i < i_end; ++i) {
            process(blocks[i].first, blocks[i].second, local_gw, need_input ? local_gi.data_ptr<scalar_t>() : nullptr);
          }
          std::lock_guard<std::mutex> guard(partials_lock);
          if (need_weight) partials.emplace(i_begin, local_gw);
          if (need_input) input_partials.emplace(i_begin, local_gi);
        });
        return;
      }
      // One chunk of images per thread (cut as at::parallel_for cuts a range: none empty), each with
      // its weight-gradient partial in one scratch of the calling thread. (Past 64 MiB of partials,
      // many threads on a wide layer, the scratch is a fresh allocation per call.)
      const int64_t per_chunk = (g.batch + at::get_num_threads() - 1) / at::get_num_threads();
      const int64_t chunks = (g.batch + per_chunk - 1) / per_chunk;
      const at::Tensor chunk_partials =
          need_weight ? scratch(Scratch::kWeightGrad, {chunks, groups, Og, K * Cg}, opts) : at::Tensor();
      at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
        // Grad and inference modes are thread-local: workers do not inherit them, and the partials
        // (made on the calling thread) are inference tensors when the caller is in inference mode.
        const WorkerModes modes(inference);
        for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
          at::Tensor local_gw = need_weight ? chunk_partials[chunk].zero_() : at::Tensor();
          const int64_t b_begin = chunk * per_chunk, b_end = std::min(g.batch, b_begin + per_chunk);
          for_blocks_of_images(g, block, planes_direct, b_begin, b_end, [&](int64_t row0, int64_t rows) {
            process(row0, rows, local_gw, need_input ? grad_input.data_ptr<scalar_t>() : nullptr);
          });
        }
      });
      for (int64_t chunk = 0; chunk < chunks && need_weight; ++chunk) partials.emplace(chunk, chunk_partials[chunk]);
    });
    for (auto& entry : input_partials) grad_input.add_(entry.second);
    for (auto& entry : partials) {
      if (grad_wmat.defined()) {
        grad_wmat.add_(entry.second);
      } else {
        grad_wmat = entry.second;  // no zero-filled sum buffer: one weight-sized tensor less at the peak
      }
    }
  }

  if (need_input) {  // in the input's memory format, as the forward's output
    grad_input = nhwc_in ? grad_input.permute({0, 3, 1, 2}) : planes_of_rows(grad_input);
  }
  at::Tensor grad_weight;
  if (need_weight && !grad_wmat.defined()) grad_wmat = at::zeros({groups, Og, K * Cg}, opts);  // batch 0
  if (need_weight) {
    // (g, O/g, K, Cg) -> (O, Cg, kh, kw)
    grad_weight = transpose_images(grad_wmat.view({O, K, Cg}), K, Cg, {O, Cg, g.kernel_h, g.kernel_w});
  }
  return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY(dcn_experiments_cpu, m) {
  m.def("deform_conv2d_forward", &deform_conv2d_forward);
  m.def("deform_conv2d_backward", &deform_conv2d_backward);
}
