// nmfx CPU kernel: the N:M mask of a weight in one pass (nmfx.pattern.nm_mask's rule, exactly).
//
//   w    [G * M] contiguous fp32 / bf16 / fp16: G groups of M consecutive elements
//   out  [G * M] bool: per group, the N elements of largest |w|; ties go to the lower index; NaN
//        scores -1, below every magnitude (so an all-NaN or all-zero group still keeps N)
//
// The plain-torch version needs |w| written out, a NaN scan, one argmax pass per kept element (or a
// sort) and several boolean passes, 5-10 elementwise passes in all. Here each group is read once into
// a local score array and its M mask bytes are written once. N = 1 and N = 2 are branchless running
// maxima (a strict > keeps the lower index on ties); larger N partial-sorts the group's indices by
// (score descending, index ascending). Threads split the groups (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>

namespace nmfx_cpu {

template <typename T>
static inline float mask_score(T v) {
  const float f = static_cast<float>(v);
  return std::isnan(f) ? -1.f : std::fabs(f);
}

template <typename T>
static void mask_groups(const T* w, bool* out, int64_t g0, int64_t g1, int n, int m) {
  float s[256];
  int idx[256];
  for (int64_t g = g0; g < g1; ++g) {
    const T* src = w + g * m;
    bool* dst = out + g * m;
    for (int i = 0; i < m; ++i) s[i] = mask_score(src[i]);
    if (n == 1) {
      int b1 = 0;
      float v1 = s[0];
      for (int i = 1; i < m; ++i) {
        const bool gt = s[i] > v1;
        b1 = gt ? i : b1;
        v1 = gt ? s[i] : v1;
      }
      for (int i = 0; i < m; ++i) dst[i] = i == b1;
    } else if (n == 2) {
      int b1 = 0, b2 = 1;
      float v1 = s[0], v2 = s[1];
      if (v2 > v1) { std::swap(b1, b2); std::swap(v1, v2); }
      for (int i = 2; i < m; ++i) {
        const bool gt1 = s[i] > v1, gt2 = s[i] > v2;
        b2 = gt1 ? b1 : (gt2 ? i : b2);
        v2 = gt1 ? v1 : (gt2 ? s[i] : v2);
        b1 = gt1 ? i : b1;
        v1 = gt1 ? s[i] : v1;
      }
      for (int i = 0; i < m; ++i) dst[i] = (i == b1) | (i == b2);
    } else {
      std::iota(idx, idx + m, 0);
      std::partial_sort(idx, idx + n, idx + m, [&](int a, int b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
      std::fill(dst, dst + m, false);
      for (int k = 0; k < n; ++k) dst[idx[k]] = true;
    }
  }
}

// Mask of `w` (any shape, contiguous, last dimension a multiple of M) grouped along its last dimension.
at::Tensor nm_mask(const at::Tensor& w, int64_t n, int64_t m) {
  // Every argument is checked here; the per-group scratch arrays hold M <= 256 (nmfx.pattern.MAX_M).
  TORCH_CHECK_VALUE(w.device().is_cpu() && !w.is_sparse(), "nmfx cpu nm_mask: the tensor must be a dense CPU tensor");
  TORCH_CHECK_VALUE(n >= 1 && m >= n && m <= 256, "nmfx cpu nm_mask: need 1 <= N <= M <= 256, got ", n, ":", m);
  TORCH_CHECK_VALUE(w.dim() >= 1 && w.size(-1) % m == 0, "nmfx cpu nm_mask: last dimension must be a multiple of M=",
                    m, ", got shape ", w.sizes());
  const at::Tensor src = w.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(at::kBool));
  const int64_t groups = src.numel() / m;
  bool* dst = out.data_ptr<bool>();
  const int nn = static_cast<int>(n), mm = static_cast<int>(m);
  const int64_t grain = std::max<int64_t>(1, 16384 / m);
  switch (src.scalar_type()) {
#define NMFX_MASK_CASE(ST, T)                                                                           \
  case ST: {                                                                                            \
    const T* p = src.const_data_ptr<T>();                                                               \
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) { mask_groups<T>(p, dst, g0, g1, nn, mm); }); \
    break;                                                                                              \
  }
    NMFX_MASK_CASE(at::kFloat, float)
    NMFX_MASK_CASE(at::kBFloat16, c10::BFloat16)
    NMFX_MASK_CASE(at::kHalf, c10::Half)
#undef NMFX_MASK_CASE
    default:
      TORCH_CHECK_VALUE(false, "nmfx cpu nm_mask supports float32, bfloat16, float16; got ", src.scalar_type());
  }
  return out;
}

}  // namespace nmfx_cpu
