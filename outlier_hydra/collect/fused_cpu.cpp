// The CPU reduction in one pass over each hooked tensor (fused_cpu.py builds and loads it).
//
// reduce(x [N, D], pval [N, D], edges [E]) -> (ge [D, E] int64, amax [D] float32, nonfinite [] int64)
//   a = |x|, NaN/Inf counted in nonfinite and then treated as 0:
//   ge[d, e] = #(a[:, d] >= edges[e]), amax[d] = max a[:, d]; and in place, for every value that
//   reaches edges[0]: pval[n, d] = x[n, d] where |x| > |pval| (ties keep the earlier). |pval| is the
//   position's largest |x| over the modules so far: the dense reduction's pabs, without its buffer.
// positions(pval [N, D], edges [E], k) -> (pos_ge [D, E] int64, top [k, D] float32)
//   pos_ge[d, e] = #(|pval[:, d]| >= edges[e]); top: per dim the k values of largest |pval| >= edges[0]
//   (|v| desc, then v desc), NaN where fewer.
// row_absmax(t [S, C]) -> [S] float32: max |t| per row, -1 for a row holding a NaN (the experts stage)
// hits(x [N, D], t) -> [K] int64: the flat indices n * D + d where |x| >= float32(t), in order (NaN: never)
//   (the router stage's outlier positions, without a [N, D] mask)
// segment_max(values [S] float32, segment [S] int64, token [S] int64, n) -> (best [n] float32, row [n] int64)
//   per segment, the largest value >= 0 and its row: among equal values the smallest token, among
//   equal tokens the last row; best -1 and row -1 where no value >= 0 (the experts stage's records)
// routing(logits [N, E] float32, idx [N, k] int64, weights [N, k] float32 or None, hits [K], d)
//   -> [E + 2 + (E + 3) * d] float64, the router stage's sums for one pass of one layer: choices per
//   expert, sum of the softmax entropies (nats), sum of the top-1 shares of the top-k weight (1/k
//   without weights), then per column c of [choices per expert | entropy | share | 1] and dim j, the
//   sum over the outlier positions (hits: flat n * d + j) at dim j. Softmax and sums in float64.
// Comparisons are made in float (double for double tensors) against the float32 edges, as the dense
// reduction's promotion does, so all four reductions give the same integers.
//
// Each row is read once: a vectorised pass (AVX-512 where the compiler targets it; four rows per load
// and store of the per-dim maxima) keeps the maxima and the positions of the few values >= edges[0];
// only those are binned and compared with the position buffer, a block of 32 rows at a time while
// the block is still in the cache. Rows are split over PyTorch's own intra-op threads (at::parallel_for), each
// with private counts merged at the end, so the integers do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

template <typename T>
using Compute = std::conditional_t<std::is_same_v<T, double>, double, float>;

#ifdef __AVX512F__
template <typename T>
constexpr bool kVector = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// |row[j .. j + 16)| as 16 floats (exact for float, bfloat16 and half)
template <typename T>
inline __m512 abs16(const T* p) {
  __m512 v;
  if constexpr (std::is_same_v<T, float>) {
    v = _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  return _mm512_and_ps(v, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)));
}
#endif

// Append i * d + j for each j in the row with |row[j]| >= low or NaN; keep mx[j] = max(mx[j], |row[j]|).
// An infinite value enters mx here (the caller takes the maxima again in that rare case).
template <typename T>
inline void scan_row(const T* __restrict__ row, int64_t d, int64_t base, Compute<T> low, Compute<T>* __restrict__ mx,
                     std::vector<int64_t>& hits) {
  using C = Compute<T>;
  int64_t j = 0;
#ifdef __AVX512F__
  if constexpr (kVector<T>) {
    const __m512 lowv = _mm512_set1_ps(low);
    for (; j + 16 <= d; j += 16) {
      const __m512 v = abs16(row + j);
      // max(v, m) returns m when v is NaN: NaN never enters the maxima
      _mm512_storeu_ps(mx + j, _mm512_max_ps(v, _mm512_loadu_ps(mx + j)));
      __mmask16 hit = _mm512_cmp_ps_mask(v, lowv, _CMP_NLT_UQ);  // >= low, or NaN
      while (hit) {
        hits.push_back(base + j + __builtin_ctz(hit));
        hit &= hit - 1;
      }
    }
  }
#endif
  for (; j < d; ++j) {
    C v = std::fabs(static_cast<C>(row[j]));
    mx[j] = v > mx[j] ? v : mx[j];
    if (!(v < low)) hits.push_back(base + j);
  }
}

#ifdef __AVX512F__
// scan_row over four rows at once: the maxima loaded and stored once per four rows, the hits of a
// 16-column block appended row by row (their order does not matter to reduce)
template <typename T>
inline void scan_rows4(const T* __restrict__ row, int64_t d, int64_t base, float low, float* __restrict__ mx,
                       std::vector<int64_t>& hits) {
  const __m512 lowv = _mm512_set1_ps(low);
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m512 v0 = abs16(row + j), v1 = abs16(row + d + j), v2 = abs16(row + 2 * d + j), v3 = abs16(row + 3 * d + j);
    // max(v, m) returns m when v is NaN: chained through m, no NaN enters (a tree would let one in)
    __m512 m = _mm512_max_ps(v0, _mm512_loadu_ps(mx + j));
    m = _mm512_max_ps(v1, m);
    m = _mm512_max_ps(v2, m);
    _mm512_storeu_ps(mx + j, _mm512_max_ps(v3, m));
    __mmask16 h0 = _mm512_cmp_ps_mask(v0, lowv, _CMP_NLT_UQ), h1 = _mm512_cmp_ps_mask(v1, lowv, _CMP_NLT_UQ),
              h2 = _mm512_cmp_ps_mask(v2, lowv, _CMP_NLT_UQ), h3 = _mm512_cmp_ps_mask(v3, lowv, _CMP_NLT_UQ);
    if (__builtin_expect((h0 | h1 | h2 | h3) != 0, 0)) {
      __mmask16 hs[4] = {h0, h1, h2, h3};
      for (int r = 0; r < 4; ++r)
        for (__mmask16 h = hs[r]; h; h &= h - 1) hits.push_back(base + r * d + j + __builtin_ctz(h));
    }
  }
  for (int r = 0; r < 4 && j < d; ++r)  // the last d % 16 columns: scan_row's scalar loop
    scan_row<T>(row + r * d + j, d - j, base + r * d + j, low, mx + j, hits);
}
#endif

template <typename T>
inline int64_t bin_of(Compute<T> v, const float* edges, int64_t e) {
  int64_t b = 0;  // v >= edges[0]; the last edge <= v
  while (b + 1 < e && v >= static_cast<Compute<T>>(edges[b + 1])) ++b;
  return b;
}

// ge[d, b] holds the count of bin b ([edges[b], edges[b+1])): make it the count of >= edges[b]
void cumulate(int64_t* ge, int64_t d, int64_t e) {
  for (int64_t j = 0; j < d; ++j)
    for (int64_t b = e - 2; b >= 0; --b) ge[j * e + b] += ge[j * e + b + 1];
}

constexpr int64_t kBlockRows = 32;  // 32 rows of 4096 floats: 512 KB, within a core's L2

template <typename T>
void reduce_impl(const T* x, T* pval, int64_t n, int64_t d, const float* edges, int64_t e, int64_t* ge, float* amax,
                 int64_t* nonfinite) {
  using C = Compute<T>;
  const C low = edges[0];
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<int64_t>> hists(nthreads);
  std::vector<std::vector<C>> maxes(nthreads);
  std::vector<int64_t> bad(nthreads, 0);
  std::vector<char> saw_inf(nthreads, 0);
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    const int t = at::get_thread_num();
    auto& hist = hists[t];
    auto& mx = maxes[t];
    if (hist.empty()) {
      hist.assign(d * e, 0);
      mx.assign(d, C(0));
    }
    std::vector<int64_t> hits;
    hits.reserve(1024);
    // a block of rows at a time, so that its few hits are read again while its rows are in the cache
    for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
      const int64_t b1 = std::min(r1, b0 + kBlockRows);
      hits.clear();
      int64_t i = b0;
#ifdef __AVX512F__
      if constexpr (kVector<T>)
        for (; i + 4 <= b1; i += 4) scan_rows4<T>(x + i * d, d, i * d, low, mx.data(), hits);
#endif
      for (; i < b1; ++i) scan_row<T>(x + i * d, d, i * d, low, mx.data(), hits);
      const int64_t nh = static_cast<int64_t>(hits.size());
      for (int64_t h = 0; h < nh; ++h) {
        if (h + 16 < nh) __builtin_prefetch(pval + hits[h + 16], 1);
        const int64_t k = hits[h];
        const T raw = x[k];
        const C v = std::fabs(static_cast<C>(raw));
        if (!(v < std::numeric_limits<C>::infinity())) {  // NaN or Inf: counted, then treated as 0
          ++bad[t];
          saw_inf[t] |= v == std::numeric_limits<C>::infinity();
          continue;
        }
        ++hist[(k % d) * e + bin_of<T>(v, edges, e)];
        if (v > std::fabs(static_cast<C>(pval[k]))) pval[k] = raw;
      }
    }
  });
  std::fill(ge, ge + d * e, 0);
  std::vector<C> merged(d, C(0));
  *nonfinite = 0;
  bool any_inf = false;
  for (int t = 0; t < nthreads; ++t) {
    *nonfinite += bad[t];
    any_inf |= saw_inf[t] != 0;
    if (hists[t].empty()) continue;
    for (int64_t j = 0; j < d * e; ++j) ge[j] += hists[t][j];
    for (int64_t j = 0; j < d; ++j) merged[j] = std::max(merged[j], maxes[t][j]);
  }
  if (any_inf) {  // rare: the maxima took an infinite |x|; take them again over the finite values
    std::fill(merged.begin(), merged.end(), C(0));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d; ++j) {
        const C v = std::fabs(static_cast<C>(x[i * d + j]));
        if (v < std::numeric_limits<C>::infinity() && v > merged[j]) merged[j] = v;
      }
  }
  for (int64_t j = 0; j < d; ++j) amax[j] = static_cast<float>(static_cast<T>(merged[j]));
  cumulate(ge, d, e);
}

// Per dim, the best k values so far as (|v|, v), best first.
template <typename C>
struct TopK {
  int64_t k;
  std::vector<C> abs_, val;
  std::vector<int64_t> kept;
  TopK(int64_t d, int64_t k) : k(k), abs_(d * k), val(d * k), kept(d, 0) {}
  void add(int64_t j, C v, C value) {
    C* ba = abs_.data() + j * k;
    C* bv = val.data() + j * k;
    int64_t at = kept[j];
    while (at > 0 && (v > ba[at - 1] || (v == ba[at - 1] && value > bv[at - 1]))) --at;
    if (at >= k) return;
    for (int64_t s = std::min(kept[j], k - 1); s > at; --s) {
      ba[s] = ba[s - 1];
      bv[s] = bv[s - 1];
    }
    ba[at] = v;
    bv[at] = value;
    kept[j] = std::min(kept[j] + 1, k);
  }
};

template <typename T>
void positions_impl(const T* pval, int64_t n, int64_t d, const float* edges, int64_t e, int64_t k, int64_t* pos_ge,
                    float* top) {
  using C = Compute<T>;
  const C low = edges[0];
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<int64_t>> counts(nthreads);
  std::vector<std::unique_ptr<TopK<C>>> tops(nthreads);
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    const int t = at::get_thread_num();
    if (!tops[t]) {
      counts[t].assign(d * e, 0);
      tops[t] = std::make_unique<TopK<C>>(d, k);
    }
    std::vector<C> mx(d, C(0));
    std::vector<int64_t> hits;
    for (int64_t i = r0; i < r1; ++i) scan_row<T>(pval + i * d, d, i * d, low, mx.data(), hits);
    for (const int64_t h : hits) {
      const int64_t j = h % d;
      const C value = static_cast<C>(pval[h]);
      const C v = std::fabs(value);
      ++counts[t][j * e + bin_of<T>(v, edges, e)];
      tops[t]->add(j, v, value);
    }
  });
  std::fill(pos_ge, pos_ge + d * e, 0);
  TopK<C> best(d, k);
  for (int t = 0; t < nthreads; ++t) {
    if (!tops[t]) continue;
    for (int64_t j = 0; j < d * e; ++j) pos_ge[j] += counts[t][j];
    for (int64_t j = 0; j < d; ++j)
      for (int64_t s = 0; s < tops[t]->kept[j]; ++s) best.add(j, tops[t]->abs_[j * k + s], tops[t]->val[j * k + s]);
  }
  cumulate(pos_ge, d, e);
  std::fill(top, top + k * d, std::numeric_limits<float>::quiet_NaN());
  for (int64_t j = 0; j < d; ++j)
    for (int64_t s = 0; s < best.kept[j]; ++s) top[s * d + j] = static_cast<float>(best.val[j * k + s]);
}

template <typename T>
void row_absmax_impl(const T* t, int64_t s, int64_t c, float* out) {
  using C = Compute<T>;
  at::parallel_for(0, s, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const T* __restrict__ row = t + i * c;
      C m = C(0);
      bool nan = false;
      int64_t j = 0;
#ifdef __AVX512F__
      if constexpr (kVector<T>) {
        __m512 best = _mm512_setzero_ps();
        __mmask16 unordered = 0;
        for (; j + 16 <= c; j += 16) {
          const __m512 v = abs16(row + j);
          unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          best = _mm512_max_ps(v, best);  // NaN: keeps best
        }
        m = _mm512_reduce_max_ps(best);
        nan = unordered != 0;
      }
#endif
      for (; j < c; ++j) {
        const C v = std::fabs(static_cast<C>(row[j]));
        nan |= v != v;
        m = v > m ? v : m;
      }
      out[i] = nan ? -1.f : static_cast<float>(m);
    }
  });
}

template <typename T>
std::vector<int64_t> hits_impl(const T* x, int64_t n, int64_t d, double threshold) {
  using C = Compute<T>;
  // t as float32 holds it, as every threshold and edge; |x| exact
  const C low = static_cast<C>(static_cast<float>(threshold));
  std::vector<std::vector<int64_t>> parts((n + 63) / 64);  // per block of 64 rows, in row order
  at::parallel_for(0, (n + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
    std::vector<C> mx(d, C(0));  // (scan_row's maxima: not needed here)
    for (int64_t b = b0; b < b1; ++b) {
      auto& out = parts[b];
      for (int64_t i = b * 64; i < std::min(n, b * 64 + 64); ++i) scan_row<T>(x + i * d, d, i * d, low, mx.data(), out);
      // scan_row also lists NaN: not an outlier here
      out.erase(std::remove_if(out.begin(), out.end(), [&](int64_t h) { return x[h] != x[h]; }), out.end());
    }
  });
  std::vector<int64_t> all;
  for (auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

void segment_max_impl(const float* values, const int64_t* segment, const int64_t* token, int64_t s, int64_t n,
                      float* best, int64_t* row) {
  std::fill(best, best + n, -1.f);
  std::fill(row, row + n, int64_t(-1));
  std::vector<int64_t> tok(n, std::numeric_limits<int64_t>::max());
  for (int64_t i = 0; i < s; ++i) {
    const float v = values[i];
    const int64_t g = segment[i];
    TORCH_CHECK(g >= 0 && g < n, "fused_cpu.segment_max: segment ", g, " out of range");
    if (!(v >= 0.f)) continue;  // -1 (no value) and NaN never hold a record
    if (v > best[g] || (v == best[g] && token[i] <= tok[g])) {
      best[g] = v;
      tok[g] = token[i];
      row[g] = i;
    }
  }
}

void routing_impl(const float* logits, const int64_t* idx, const float* weights, const int64_t* hits, int64_t n,
                  int64_t e, int64_t k, int64_t nh, int64_t d, double* out) {
  std::fill(out, out + e + 2 + (e + 3) * d, 0.0);
  double* counts = out;
  double* feature = out + e + 2;  // [E + 3, d]
  std::vector<double> entropy(n), share(n), p(e);
  for (int64_t i = 0; i < n; ++i) {
    const float* l = logits + i * e;
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < e; ++c) top = std::max(top, static_cast<double>(l[c]));
    double z = 0.0;
    for (int64_t c = 0; c < e; ++c) z += (p[c] = std::exp(static_cast<double>(l[c]) - top));
    double h = 0.0;
    for (int64_t c = 0; c < e; ++c) {
      const double q = p[c] / z;
      h -= q * std::log(std::max(q, 1e-30));
    }
    entropy[i] = h;
    double best = 1.0, total = static_cast<double>(k);
    if (weights != nullptr) {
      const float* w = weights + i * k;
      best = -std::numeric_limits<double>::infinity();
      total = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        best = std::max(best, static_cast<double>(w[j]));
        total += w[j];
      }
    }
    share[i] = best / std::max(total, 1e-30);
    out[e] += entropy[i];
    out[e + 1] += share[i];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t c = idx[i * k + j];
      TORCH_CHECK(c >= 0 && c < e, "fused_cpu.routing: expert ", c, " out of range");
      counts[c] += 1.0;
    }
  }
  for (int64_t h = 0; h < nh; ++h) {
    const int64_t i = hits[h] / d, j = hits[h] % d;
    TORCH_CHECK(i >= 0 && i < n, "fused_cpu.routing: position out of range");
    for (int64_t c = 0; c < k; ++c) feature[idx[i * k + c] * d + j] += 1.0;
    feature[e * d + j] += entropy[i];
    feature[(e + 1) * d + j] += share[i];
    feature[(e + 2) * d + j] += 1.0;
  }
}

void check(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), "fused_cpu: ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() == dims, "fused_cpu: ", name, " must have ", dims, " dimensions");
  TORCH_CHECK(t.is_contiguous(), "fused_cpu: ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reduce(const at::Tensor& x_in, at::Tensor pval, const at::Tensor& edges) {
  const at::Tensor x = x_in.contiguous();
  check(x, "x", 2);
  check(pval, "pval", 2);
  check(edges, "edges", 1);
  TORCH_CHECK(pval.sizes() == x.sizes() && pval.scalar_type() == x.scalar_type(), "fused_cpu: pval must match x");
  TORCH_CHECK(edges.scalar_type() == at::kFloat && edges.numel() > 0, "fused_cpu: edges must be float32");
  const int64_t n = x.size(0), d = x.size(1), e = edges.size(0);
  auto ge = at::empty({d, e}, at::kLong);
  auto amax = at::empty({d}, at::kFloat);
  auto bad = at::empty({}, at::kLong);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_cpu.reduce", [&] {
    reduce_impl<scalar_t>(x.const_data_ptr<scalar_t>(), pval.data_ptr<scalar_t>(), n, d, edges.const_data_ptr<float>(), e,
                          ge.data_ptr<int64_t>(), amax.data_ptr<float>(), bad.data_ptr<int64_t>());
  });
  return {ge, amax, bad};
}

std::tuple<at::Tensor, at::Tensor> positions(const at::Tensor& pval, const at::Tensor& edges, int64_t k) {
  check(pval, "pval", 2);
  check(edges, "edges", 1);
  TORCH_CHECK(edges.scalar_type() == at::kFloat && edges.numel() > 0, "fused_cpu: edges must be float32");
  TORCH_CHECK(k >= 0, "fused_cpu: k must be >= 0");
  const int64_t n = pval.size(0), d = pval.size(1), e = edges.size(0);
  auto pos_ge = at::empty({d, e}, at::kLong);
  auto top = at::empty({k, d}, at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pval.scalar_type(), "fused_cpu.positions", [&] {
    positions_impl<scalar_t>(pval.const_data_ptr<scalar_t>(), n, d, edges.const_data_ptr<float>(), e, k,
                             pos_ge.data_ptr<int64_t>(), top.data_ptr<float>());
  });
  return {pos_ge, top};
}

at::Tensor row_absmax(const at::Tensor& t_in) {
  const at::Tensor t = t_in.contiguous();
  check(t, "t", 2);
  auto out = at::empty({t.size(0)}, at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "fused_cpu.row_absmax", [&] {
    row_absmax_impl<scalar_t>(t.const_data_ptr<scalar_t>(), t.size(0), t.size(1), out.data_ptr<float>());
  });
  return out;
}

at::Tensor hits(const at::Tensor& x_in, double threshold) {
  const at::Tensor x = x_in.contiguous();
  check(x, "x", 2);
  std::vector<int64_t> found;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_cpu.hits", [&] {
    found = hits_impl<scalar_t>(x.const_data_ptr<scalar_t>(), x.size(0), x.size(1), threshold);
  });
  auto out = at::empty({static_cast<int64_t>(found.size())}, at::kLong);
  std::copy(found.begin(), found.end(), out.data_ptr<int64_t>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> segment_max(const at::Tensor& values, const at::Tensor& segment,
                                               const at::Tensor& token, int64_t n) {
  check(values, "values", 1);
  check(segment, "segment", 1);
  check(token, "token", 1);
  TORCH_CHECK(values.scalar_type() == at::kFloat && segment.scalar_type() == at::kLong && token.scalar_type() == at::kLong,
              "fused_cpu.segment_max: float32 values, int64 segments and tokens");
  TORCH_CHECK(segment.numel() == values.numel() && token.numel() == values.numel(), "fused_cpu.segment_max: lengths");
  auto best = at::empty({n}, at::kFloat);
  auto row = at::empty({n}, at::kLong);
  segment_max_impl(values.const_data_ptr<float>(), segment.const_data_ptr<int64_t>(), token.const_data_ptr<int64_t>(),
                   values.numel(), n, best.data_ptr<float>(), row.data_ptr<int64_t>());
  return {best, row};
}

at::Tensor routing(const at::Tensor& logits_in, const at::Tensor& idx_in, const std::optional<at::Tensor>& weights_in,
                   const at::Tensor& hits_in, int64_t d) {
  const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
  const at::Tensor idx = idx_in.to(at::kLong).contiguous();
  const at::Tensor hits = hits_in.to(at::kLong).contiguous();
  check(logits, "logits", 2);
  check(idx, "idx", 2);
  check(hits, "hits", 1);
  TORCH_CHECK(idx.size(0) == logits.size(0), "fused_cpu.routing: one row of choices per row of logits");
  at::Tensor weights;
  if (weights_in.has_value()) {
    weights = weights_in->to(at::kFloat).contiguous();
    check(weights, "weights", 2);
    TORCH_CHECK(weights.sizes() == idx.sizes(), "fused_cpu.routing: weights must match the choices");
  }
  const int64_t n = logits.size(0), e = logits.size(1), k = idx.size(1);
  auto out = at::empty({e + 2 + (e + 3) * d}, at::kDouble);
  routing_impl(logits.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(),
               weights.defined() ? weights.const_data_ptr<float>() : nullptr, hits.const_data_ptr<int64_t>(), n, e, k,
               hits.numel(), d, out.data_ptr<double>());
  return out;
}

}  // namespace

TORCH_LIBRARY(outlier_hydra_fused_cpu, m) {
  m.def("reduce(Tensor x, Tensor(a!) pval, Tensor edges) -> (Tensor, Tensor, Tensor)");
  m.def("positions(Tensor pval, Tensor edges, int k) -> (Tensor, Tensor)");
  m.def("row_absmax(Tensor t) -> Tensor");
  m.def("hits(Tensor x, float threshold) -> Tensor");
  m.def("segment_max(Tensor values, Tensor segment, Tensor token, int n) -> (Tensor, Tensor)");
  m.def("routing(Tensor logits, Tensor idx, Tensor? weights, Tensor hits, int d) -> Tensor");
  m.impl("reduce", c10::DispatchKey::CPU, TORCH_FN(reduce));
  m.impl("routing", c10::DispatchKey::CPU, TORCH_FN(routing));
  m.impl("segment_max", c10::DispatchKey::CPU, TORCH_FN(segment_max));
  m.impl("row_absmax", c10::DispatchKey::CPU, TORCH_FN(row_absmax));
  m.impl("hits", c10::DispatchKey::CPU, TORCH_FN(hits));
  m.impl("positions", c10::DispatchKey::CPU, TORCH_FN(positions));
}
