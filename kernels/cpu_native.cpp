// DAM's block-sparse prefill for bf16 CPU tensors on CPUs with AMX (built and called by
// cpu_native.py; the semantics of dam.kernels.block_sparse_attention).
//
// K and V are packed once per call into the VNNI layouts of AMX's bf16 products (whole sequence
// per batch entry and KV head, so a run of consecutive kept blocks is one sub-matrix). One task
// per (batch entry, KV head, query block): the query tiles of the KV head's G query heads are
// stacked; the KV blocks every one of them keeps run stacked ([G * rows, D] against each K/V tile,
// read once), the blocks only some keep run per head. Kept blocks are read in place (no gather),
// a chunk of at most CHUNK_KEYS keys at a time: Q K^T of the chunk's blocks lands side by side in
// one fp32 row buffer (a brgemm per run of consecutive blocks), one online-softmax update per
// row and chunk (the accumulator is rescaled per chunk, not per block), and P V accumulates into
// an fp32 accumulator. Only blocks that cross the causal boundary or the ragged key tail are
// masked. Output in bf16; the LSE (natural log) in float32 when asked for.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t CHUNK_KEYS = 512;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Keys [j0, j0 + bn) of one (batch, KV head), K into the B operand of Q K^T in VNNI-2 layout
// [D/2][NkP][2] (element (d, j) of K^T at ((d/2)*NkP + j)*2 + d%2), V into the B operand of P V,
// [NkP/2][D][2] (element (j, d) of V at ((j/2)*D + d)*2 + j%2). Keys at or past Nk are zero.
// Whole-sequence layouts: a run of consecutive kept blocks is one sub-matrix of each.
template <typename T>
void pack_block(const T* k, int64_t ksN, const T* v, int64_t vsN, int64_t j0, int64_t bn, int64_t Nk,
                int64_t NkP, int64_t D, T* kp, T* vp) {
  for (int64_t j = j0; j < j0 + bn; ++j) {
    const bool ok = j < Nk;
    const T* row = k + j * ksN;
    for (int64_t t = 0; t < D / 2; ++t) {
      T* o = kp + (t * NkP + j) * 2;
      o[0] = ok ? row[2 * t] : T(0);
      o[1] = ok ? row[2 * t + 1] : T(0);
    }
  }
  for (int64_t j = j0; j < j0 + bn; j += 2) {
    const T* r0 = v + j * vsN;
    const T* r1 = v + (j + 1) * vsN;
    const bool ok0 = j < Nk, ok1 = j + 1 < Nk;
    T* o = vp + (j / 2) * D * 2;
    for (int64_t d = 0; d < D; ++d) {
      o[2 * d] = ok0 ? r0[d] : T(0);
      o[2 * d + 1] = ok1 ? r1[d] : T(0);
    }
  }
}

float row_max(const float* x, int64_t n) {  // n is a multiple of 16 (a whole number of blocks)
  __m512 m = _mm512_set1_ps(NEG_INF);
  for (int64_t j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + j));
  return _mm512_reduce_max_ps(m);
}

// p <- exp(scale * x - mx) in the 16-bit dtype (rounded once from fp32); returns the fp32 sum
float exp_sum(const float* x, int64_t n, float scale, float mx, at::BFloat16* p) {  // n: a multiple of 16
  Vec s(0.f), vs(scale), vm(mx);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) * vs - vm).exp_u20();
    s = s + e;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), at::vec::cvtfp32_bf16(__m512(e)));
  }
  return _mm512_reduce_add_ps(__m512(s));
}

template <typename T>
void attend_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                 const at::Tensor& cnt, at::Tensor& out, float* lse, int64_t bm, int64_t bn, float scale,
                 bool causal, bool stack) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), G = Hq / Hkv;
  const int64_t nqb = (Nq + bm - 1) / bm, nkb = (Nk + bn - 1) / bn;
  const int64_t off = Nk - Nq;
  const T* qd = q.data_ptr<T>();
  const T* kd = k.data_ptr<T>();
  const T* vd = v.data_ptr<T>();
  T* od = out.data_ptr<T>();
  const int32_t* id = idx.data_ptr<int32_t>();
  const int32_t* cd = cnt.data_ptr<int32_t>();
  const int64_t qsB = q.stride(0), qsH = q.stride(1), qsN = q.stride(2);
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksN = k.stride(2);
  const int64_t vsB = v.stride(0), vsH = v.stride(1), vsN = v.stride(2);
  const int64_t osB = out.stride(0), osH = out.stride(1), osN = out.stride(2);
  const int64_t Bl = idx.size(0), Hl = idx.size(1), W = idx.size(3);
  const int64_t isB = idx.stride(0), isH = idx.stride(1), isQ = idx.stride(2);
  const int64_t csB = cnt.stride(0), csH = cnt.stride(1), csQ = cnt.stride(2);

  // K and V packed once per call (whole sequence per batch entry and KV head): [B * Hkv, NkP * D]
  const int64_t NkP = nkb * bn, per = NkP * D;
  at::Tensor kpt = at::empty({B * Hkv * per}, q.options());  // uninitialised: every element is written
  at::Tensor vpt = at::empty({B * Hkv * per}, q.options());
  T* kpd = kpt.data_ptr<T>();
  T* vpd = vpt.data_ptr<T>();
  at::parallel_for(0, B * Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nkb, j = t % nkb, b = bh / Hkv, h = bh % Hkv;
      pack_block(kd + b * ksB + h * ksH, ksN, vd + b * vsB + h * vsH, vsN, j * bn, bn, Nk, NkP, D,
                 kpd + bh * per, vpd + bh * per);
    }
  });

  const int64_t chunk = std::max<int64_t>(1, CHUNK_KEYS / bn);
  const int64_t L = chunk * bn;  // row stride of the score and probability buffers
  // GQA: the query heads of a KV head run as one task; the blocks all of them keep run stacked
  // ([G * rows, D] queries: each K/V tile read once, bigger products), the rest per head. One
  // online softmax state per query row, so the two sets need no merge. More than 64 query
  // heads per KV head: one head per task.
  const int64_t gs = (stack && G <= 64) ? G : 1;  // heads per task
  const int64_t tasks = B * (Hq / gs) * nqb;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = gs * bm;
    std::vector<float> S(static_cast<size_t>(R * L)), acc(static_cast<size_t>(R * D)), mx(R), sm(R);
    std::vector<T> P(static_cast<size_t>(R * L)), Qs(static_cast<size_t>(R * D));
    std::vector<int32_t> vis(static_cast<size_t>(gs * W)), nvis(gs), common(static_cast<size_t>(W)),
        own(static_cast<size_t>(W));
    std::vector<uint64_t> mark(static_cast<size_t>(nkb), 0);
    const uint64_t all = gs == 64 ? ~uint64_t(0) : ((uint64_t(1) << gs) - 1);
    for (int64_t t = begin; t < end; ++t) {
      // query blocks in the order 0, n-1, 1, n-2, ...: every contiguous range of tasks (one per
      // thread) holds short and long rows alike
      const int64_t ntask_bh = B * (Hq / gs);
      const int64_t o = t / ntask_bh, bh = t % ntask_bh;
      const int64_t qb = (o % 2 == 0) ? o / 2 : nqb - 1 - o / 2;
      const int64_t b = bh / (Hq / gs), h0 = (bh % (Hq / gs)) * gs, hk = h0 / G;
      const int64_t m0 = qb * bm, mr = std::min(bm, Nq - m0);
      // keys < lim(r) are visible to row r
      const int64_t lim_first = causal ? std::min(off + m0 + 1, Nk) : Nk;
      const int64_t lim_last = causal ? std::min(off + m0 + mr, Nk) : Nk;
      for (int64_t g = 0; g < gs; ++g) {
        const int64_t h = h0 + g;
        const int32_t* ids = id + (Bl == 1 ? 0 : b) * isB + (Hl == 1 ? 0 : h) * isH + qb * isQ;
        const int32_t n = cd[(Bl == 1 ? 0 : b) * csB + (Hl == 1 ? 0 : h) * csH + qb * csQ];
        int32_t nv = 0;
        for (int32_t i = 0; i < n; ++i) {
          const int32_t j = ids[i];
          if (j >= 0 && j * bn < lim_last) {
            vis[g * W + nv++] = j;
            mark[j] |= uint64_t(1) << g;
          }
        }
        nvis[g] = nv;
        const T* qrow = qd + b * qsB + h * qsH + m0 * qsN;
        for (int64_t r = 0; r < mr; ++r) std::copy(qrow + r * qsN, qrow + r * qsN + D, Qs.data() + (g * mr + r) * D);
      }
      int64_t nc = 0;  // blocks every head keeps (ascending: head 0's order)
      for (int32_t i = 0; i < nvis[0]; ++i) {
        const int32_t j = vis[i];
        if (mark[j] == all) common[nc++] = j;
      }
      const int64_t rows = gs * mr;
      for (int64_t r = 0; r < rows; ++r) {
        mx[r] = NEG_INF;
        sm[r] = 0.f;
        std::fill(acc.data() + r * D, acc.data() + (r + 1) * D, 0.f);
      }
      const T* kbase = kpd + (b * Hkv + hk) * per;
      const T* vbase = vpd + (b * Hkv + hk) * per;
      // rows [r0, r0 + M) of the task against the blocks list[0..nl)
      auto run = [&](int64_t r0, int64_t M, const int32_t* list, int64_t nl) {
        const T* A = Qs.data() + r0 * D;
        float* Sr = S.data() + r0 * L;
        T* Pr = P.data() + r0 * L;
        for (int64_t c = 0; c < nl; c += chunk) {
          const int64_t nb = std::min(chunk, nl - c), Lc = nb * bn;
          // runs of consecutive blocks: one product each
          for (int64_t i = 0; i < nb;) {
            int64_t e = i + 1;
            while (e < nb && list[c + e] == list[c + e - 1] + 1) ++e;
            at::native::cpublas::brgemm(M, (e - i) * bn, D, D, NkP, L, false, A,
                                        kbase + static_cast<int64_t>(list[c + i]) * bn * 2, Sr + i * bn, true);
            i = e;
          }
          for (int64_t i = 0; i < nb; ++i) {  // mask the blocks that cross the boundary or the tail
            const int64_t j0 = static_cast<int64_t>(list[c + i]) * bn;
            if (j0 + bn <= lim_first) continue;
            for (int64_t x = 0; x < M; ++x) {
              const int64_t r = (r0 + x) % mr;  // the row's query within its head
              const int64_t lim = causal ? std::min(off + m0 + r + 1, Nk) : Nk;
              const int64_t keep = std::clamp<int64_t>(lim - j0, 0, bn);
              std::fill(Sr + x * L + i * bn + keep, Sr + x * L + (i + 1) * bn, NEG_INF);
            }
          }
          for (int64_t x = 0; x < M; ++x) {
            const float* row = Sr + x * L;
            float& m_ = mx[r0 + x];
            const float m_new = std::max(m_, row_max(row, Lc) * scale);
            if (m_new == NEG_INF) {  // nothing visible yet in this row
              std::fill(Pr + x * L, Pr + x * L + Lc, T(0));
              continue;
            }
            const float s = exp_sum(row, Lc, scale, m_new, Pr + x * L);
            const float corr = std::exp(m_ - m_new);  // 0 when nothing was seen before
            sm[r0 + x] = sm[r0 + x] * corr + s;
            m_ = m_new;
            if (corr != 1.f) {
              float* a = acc.data() + (r0 + x) * D;
              int64_t d = 0;
              for (; d + Vec::size() <= D; d += Vec::size()) (Vec::loadu(a + d) * Vec(corr)).store(a + d);
              for (; d < D; ++d) a[d] *= corr;
            }
          }
          for (int64_t i = 0; i < nb;) {
            int64_t e = i + 1;
            while (e < nb && list[c + e] == list[c + e - 1] + 1) ++e;
            at::native::cpublas::brgemm(M, D, (e - i) * bn, L, D, D, true, Pr + i * bn,
                                        vbase + static_cast<int64_t>(list[c + i]) * bn * D,
                                        acc.data() + r0 * D, true);
            i = e;
          }
        }
      };
      if (nc > 0) run(0, rows, common.data(), nc);
      for (int64_t g = 0; g < gs; ++g) {
        int64_t no = 0;
        for (int32_t i = 0; i < nvis[g]; ++i) {
          const int32_t j = vis[g * W + i];
          if (mark[j] != all) own[no++] = j;
        }
        if (no > 0) run(g * mr, mr, own.data(), no);
      }
      for (int64_t g = 0; g < gs; ++g) {
        for (int32_t i = 0; i < nvis[g]; ++i) mark[vis[g * W + i]] = 0;
      }
      for (int64_t g = 0; g < gs; ++g) {
        const int64_t h = h0 + g;
        for (int64_t r = 0; r < mr; ++r) {
          const int64_t x = g * mr + r;
          T* orow = od + b * osB + h * osH + (m0 + r) * osN;
          const bool empty = sm[x] == 0.f;
          const float inv = empty ? 0.f : 1.f / sm[x];
          const float* a = acc.data() + x * D;
          for (int64_t d = 0; d < D; ++d) orow[d] = T(empty ? 0.f : a[d] * inv);
          if (lse != nullptr) lse[(b * Hq + h) * Nq + m0 + r] = empty ? NEG_INF : mx[x] + std::log(sm[x]);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// The planner's dynamic block score (dam.kernels.scores.block_logsumexp of k . colsT, fused):
// out[b, h, kb, c] = log sum_{j in key block kb} exp(k_j . col_c) in fp32, for the key blocks a
// column's query block can see (kb <= last[c / per]); -inf for the others. Columns are query-block
// major (column c belongs to query block c / per), so the columns that see key block kb are one
// suffix: one brgemm per (batch entry, KV head, key block) against it, then per-column max and
// exp-sum over the block's rows (vectorised across columns). The scores never leave the cache.
void block_lse_impl(const at::Tensor& k, const at::Tensor& cols, const at::Tensor& last, int64_t per, int64_t bn,
                    at::Tensor& out) {
  using T = at::BFloat16;
  const int64_t B = k.size(0), H = k.size(1), Nk = k.size(2), D = k.size(3), C = cols.size(2);
  const int64_t nkb = (Nk + bn - 1) / bn, nqb = C / per;
  const T* kd = k.data_ptr<T>();
  const T* cd = cols.data_ptr<T>();
  const int64_t* ld = last.data_ptr<int64_t>();
  float* od = out.data_ptr<float>();
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksN = k.stride(2);
  const int64_t csB = cols.stride(0), csH = cols.stride(1), csC = cols.stride(2);
  // cols^T in VNNI-2 layout [D/2][C][2] per (batch entry, KV head)
  at::Tensor packed = at::empty({B * H * C * D}, k.options());
  T* pd = packed.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* src = cd + (t / H) * csB + (t % H) * csH;
      T* dst = pd + t * C * D;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t d2 = 0; d2 < D / 2; ++d2) {
          dst[(d2 * C + c) * 2] = src[c * csC + 2 * d2];
          dst[(d2 * C + c) * 2 + 1] = src[c * csC + 2 * d2 + 1];
        }
      }
    }
  });
  // first query block that sees key block kb (last[] is ascending)
  std::vector<int64_t> first(static_cast<size_t>(nkb));
  for (int64_t kb = 0, a = 0; kb < nkb; ++kb) {
    while (a < nqb && ld[a] < kb) ++a;
    first[kb] = a;
  }
  at::parallel_for(0, B * H * nkb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(static_cast<size_t>(bn * C)), m(static_cast<size_t>(C)), sm(static_cast<size_t>(C));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nkb, kb = t % nkb;
      float* o = od + (bh * nkb + kb) * C;
      const int64_t c0 = first[kb] * per, nc = C - c0, rows = std::min(bn, Nk - kb * bn);
      std::fill(o, o + c0, NEG_INF);
      if (nc <= 0) continue;
      const T* A = kd + (bh / H) * ksB + (bh % H) * ksH + kb * bn * ksN;
      at::native::cpublas::brgemm(rows, nc, D, ksN, C, nc, false, A, pd + bh * C * D + c0 * 2, S.data(), true);
      std::copy(S.data(), S.data() + nc, m.data());
      for (int64_t r = 1; r < rows; ++r) {
        const float* row = S.data() + r * nc;
        int64_t c = 0;
        for (; c + 16 <= nc; c += 16)
          _mm512_storeu_ps(m.data() + c, _mm512_max_ps(_mm512_loadu_ps(m.data() + c), _mm512_loadu_ps(row + c)));
        for (; c < nc; ++c) m[c] = std::max(m[c], row[c]);
      }
      std::fill(sm.data(), sm.data() + nc, 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = S.data() + r * nc;
        int64_t c = 0;
        for (; c + 16 <= nc; c += 16) {
          Vec e = (Vec::loadu(row + c) - Vec::loadu(m.data() + c)).exp_u20();
          (Vec::loadu(sm.data() + c) + e).store(sm.data() + c);
        }
        for (; c < nc; ++c) sm[c] += std::exp(row[c] - m[c]);
      }
      for (int64_t c = 0; c < nc; ++c) o[c0 + c] = m[c] + std::log(sm[c]);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// The planner's last-query element scores (dam.runtime.estimate.last_query_scores): per query
// head, the exact softmax of its last n queries (positions Nk - n + t) over their causal keys,
// summed per key (vert[j] = sum_t p[t, j]) and per offset (slash[d] = sum_t p[t, i_t - d]). Two
// passes over 512-key chunks (the products are recomputed rather than stored): the first keeps
// each row's max and sum, the second adds the normalised probabilities into vert and, shifted by
// n - 1 - t, into slash (u = Nk - 1 - d coordinates, flipped at the end). A task is (batch entry,
// query head, half of the rows), each half into its own partial sums.
void last_query_impl(const at::Tensor& qc, const at::Tensor& k, int64_t n, float scale, at::Tensor& vert,
                     at::Tensor& slash) {
  using T = at::BFloat16;
  const int64_t B = k.size(0), H = k.size(1), Nk = k.size(2), D = k.size(3), G = qc.size(2) / n;
  const int64_t CH = CHUNK_KEYS, nch = (Nk + CH - 1) / CH, NkP = nch * CH;
  const T* qd = qc.data_ptr<T>();
  const T* kd = k.data_ptr<T>();
  const int64_t qsB = qc.stride(0), qsH = qc.stride(1), qsN = qc.stride(2);
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksN = k.stride(2);
  at::Tensor packed = at::empty({B * H * NkP * D}, k.options());
  T* pd = packed.data_ptr<T>();
  at::parallel_for(0, B * H * nch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nch, j0 = (t % nch) * CH;
      const T* src = kd + (bh / H) * ksB + (bh % H) * ksH;
      T* dst = pd + bh * NkP * D;
      for (int64_t j = j0; j < j0 + CH; ++j) {
        const bool ok = j < Nk;
        for (int64_t d2 = 0; d2 < D / 2; ++d2) {
          dst[(d2 * NkP + j) * 2] = ok ? src[j * ksN + 2 * d2] : T(0);
          dst[(d2 * NkP + j) * 2 + 1] = ok ? src[j * ksN + 2 * d2 + 1] : T(0);
        }
      }
    }
  });
  const int64_t halves = n > 1 ? 2 : 1, tasks = B * H * G * halves;
  // partial sums per task: [tasks, 2, Nk] (vert, slash in u coordinates)
  std::vector<float> part(static_cast<size_t>(tasks * 2 * Nk));
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(static_cast<size_t>(n * CH)), mx(n), sm(n);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t half = t % halves, head = t / halves, bh = head / G, g = head % G;
      const int64_t t0 = half * (n / 2), t1 = half + 1 == halves ? n : (n / 2) * (half + 1), rows = t1 - t0;
      const T* A = qd + (bh / H) * qsB + (bh % H) * qsH + (g * n + t0) * qsN;
      const T* Bk = pd + bh * NkP * D;
      float* pv = part.data() + t * 2 * Nk;
      float* ps = pv + Nk;
      std::fill(pv, pv + 2 * Nk, 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        mx[r] = NEG_INF;
        sm[r] = 0.f;
      }
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t c = 0; c < nch; ++c) {
          const int64_t j0 = c * CH;
          if (j0 > Nk - n + t1 - 1) break;  // no row of this task sees these keys
          at::native::cpublas::brgemm(rows, CH, D, qsN, NkP, CH, false, A, Bk + j0 * 2, S.data(), true);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = Nk - n + t0 + r;  // the row's query position: keys <= i
            const int64_t nv = std::min<int64_t>(CH, i - j0 + 1);
            if (nv <= 0) continue;
            float* row = S.data() + r * CH;
            if (pass == 0) {
              const int64_t nv16 = nv & ~int64_t(15);
              float m = nv16 ? row_max(row, nv16) : NEG_INF;
              for (int64_t x = nv16; x < nv; ++x) m = std::max(m, row[x]);
              const float m_new = std::max(mx[r], m * scale);
              Vec acc(0.f);
              int64_t x = 0;
              for (; x + 16 <= nv; x += 16) acc = acc + (Vec::loadu(row + x) * Vec(scale) - Vec(m_new)).exp_u20();
              float s = _mm512_reduce_add_ps(__m512(acc));
              for (; x < nv; ++x) s += std::exp(row[x] * scale - m_new);
              sm[r] = sm[r] * std::exp(mx[r] - m_new) + s;
              mx[r] = m_new;
            } else {
              const float inv = 1.f / sm[r], m = mx[r];
              float* vo = pv + j0;
              float* so = ps + j0 + (n - 1 - (t0 + r));  // slash in u = j + n - 1 - t
              int64_t x = 0;
              for (; x + 16 <= nv; x += 16) {
                Vec e = (Vec::loadu(row + x) * Vec(scale) - Vec(m)).exp_u20() * Vec(inv);
                (Vec::loadu(vo + x) + e).store(vo + x);
                (Vec::loadu(so + x) + e).store(so + x);
              }
              for (; x < nv; ++x) {
                const float e = std::exp(row[x] * scale - m) * inv;
                vo[x] += e;
                so[x] += e;
              }
            }
          }
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  float* vd = vert.data_ptr<float>();
  float* sd = slash.data_ptr<float>();
  at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      float* vo = vd + head * Nk;
      float* so = sd + head * Nk;
      for (int64_t j = 0; j < Nk; ++j) {
        float v = 0.f, u = 0.f;
        for (int64_t h = 0; h < halves; ++h) {
          const float* pv = part.data() + (head * halves + h) * 2 * Nk;
          v += pv[j];
          u += pv[Nk + Nk - 1 - j];  // slash[d] = slash_u[Nk - 1 - d]
        }
        vo[j] = v;
        so[j] = u;
      }
    }
  });
}

}  // namespace

// The estimate's block choice (dam.runtime.estimate.select_blocks), per (batch entry, head):
// tau[a, b] = the least negated score among block (a, b)'s verticals (keys of KV block b up to
// the query block's last position i1: a block-prefix minimum) and slashes (offsets
// [max(i0 - bB - B + 1, 0), i1 - bB]: a sliding minimum of width i1 - i0 + B ending at i1 - bB);
// cut = the (budget + 1)-th least tau among the free blocks (causal, not in cur), +inf when fewer;
// out = (tau < cut) & causal. Host work of O(Nk + nqb * nkb) per head.
void select_impl(const at::Tensor& vert, const at::Tensor& slash, const at::Tensor& cur, const at::Tensor& budget,
                 int64_t Nq, int64_t B, at::Tensor& out) {
  const int64_t BH = vert.size(0) * vert.size(1), Nk = vert.size(2);
  const int64_t nqb = cur.size(2), nkb = cur.size(3), off = Nk - Nq;
  const float* vd = vert.data_ptr<float>();
  const float* sd = slash.data_ptr<float>();
  const bool* cd = cur.data_ptr<bool>();
  const int64_t* bd = budget.data_ptr<int64_t>();
  bool* od = out.data_ptr<bool>();
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vpre(Nk), pre(Nk), suf(Nk), smin_full(Nk), smin_last(Nk), tau(nqb * nkb), fr;
    fr.reserve(nqb * nkb);
    // sliding minima of width w of x = -slash: min(x[max(e - w + 1, 0) .. e]) (blocks of w:
    // prefix and suffix minima, a window spans at most two)
    auto sliding = [&](const float* s, int64_t w, float* o) {
      for (int64_t j = 0; j < Nk; ++j) pre[j] = (j % w == 0) ? -s[j] : std::min(pre[j - 1], -s[j]);
      for (int64_t j = Nk - 1; j >= 0; --j)
        suf[j] = (j % w == w - 1 || j == Nk - 1) ? -s[j] : std::min(suf[j + 1], -s[j]);
      for (int64_t e = 0; e < Nk; ++e) {
        const int64_t st = e - w + 1;
        o[e] = (st <= 0 || st % w == 0) ? pre[e] : std::min(suf[st], pre[e]);
      }
    };
    for (int64_t t = begin; t < end; ++t) {
      const float* v = vd + t * Nk;
      const float* s = sd + t * Nk;
      for (int64_t j = 0; j < Nk; ++j) vpre[j] = (j % B == 0) ? -v[j] : std::min(vpre[j - 1], -v[j]);
      const int64_t rows_last = Nq - (nqb - 1) * B;  // the last query block's rows
      sliding(s, 2 * B - 1, smin_full.data());
      if (rows_last != B) sliding(s, rows_last + B - 1, smin_last.data());
      const bool* c = cd + t * nqb * nkb;
      fr.clear();
      for (int64_t a = 0; a < nqb; ++a) {
        const int64_t i1 = off + std::min((a + 1) * B, Nq) - 1;
        const float* sm = (a == nqb - 1 && rows_last != B) ? smin_last.data() : smin_full.data();
        for (int64_t b = 0; b < nkb; ++b) {
          const int64_t b0 = b * B;
          if (b0 > i1) {
            tau[a * nkb + b] = inf;  // not causal: never chosen
            continue;
          }
          const float x = std::min(vpre[b0 + std::min(i1 - b0, B - 1)], sm[std::min(i1 - b0, Nk - 1)]);
          tau[a * nkb + b] = x;
          if (!c[a * nkb + b]) fr.push_back(x);
        }
      }
      const int64_t k = bd[t];
      float cut = inf;
      if (k >= 0 && k < static_cast<int64_t>(fr.size())) {
        std::nth_element(fr.begin(), fr.begin() + k, fr.end());
        cut = fr[k];
      }
      bool* o = od + t * nqb * nkb;
      for (int64_t a = 0; a < nqb; ++a) {
        const int64_t i1 = off + std::min((a + 1) * B, Nq) - 1;
        for (int64_t b = 0; b < nkb; ++b) o[a * nkb + b] = b * B <= i1 && tau[a * nkb + b] < cut;
      }
    }
  });
}

// A bool mask [R, nkb] (contiguous) -> the first W kept blocks of each row, ascending and -1
// padded (idx int32 [R, W]), and min(kept, W) (cnt int32 [R]).
void mask_layout_impl(const at::Tensor& mask, at::Tensor& idx, at::Tensor& cnt) {
  const int64_t R = idx.size(0), W = idx.size(1), nkb = mask.size(1);
  const bool* md = mask.data_ptr<bool>();
  int32_t* id = idx.data_ptr<int32_t>();
  int32_t* cd = cnt.data_ptr<int32_t>();
  at::parallel_for(0, R, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bool* m = md + r * nkb;
      int32_t* o = id + r * W;
      int64_t n = 0;
      for (int64_t j = 0; j < nkb && n < W; ++j)
        if (m[j]) o[n++] = static_cast<int32_t>(j);
      cd[r] = static_cast<int32_t>(n);
      for (int64_t j = n; j < W; ++j) o[j] = -1;
    }
  });
}

// qc [B, H, G * n, D] bf16 (the last n queries of each head, head-major within a KV head), k
// [B, H, Nk, D] bf16, the softmax scale -> vert, slash float32 contiguous [B, H, G, Nk].
void last_query(at::Tensor qc, at::Tensor k, int64_t n, double scale, at::Tensor vert, at::Tensor slash) {
  TORCH_CHECK(qc.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16, "bf16 inputs only");
  TORCH_CHECK(qc.stride(3) == 1 && k.stride(3) == 1 && k.size(3) % 2 == 0, "contiguous even last dim");
  TORCH_CHECK(vert.is_contiguous() && slash.is_contiguous() && vert.scalar_type() == at::kFloat &&
                  slash.scalar_type() == at::kFloat, "outputs must be contiguous float32");
  TORCH_CHECK(n >= 1 && n <= k.size(2) && qc.size(2) % n == 0, "bad n");
  last_query_impl(qc, k, n, static_cast<float>(scale), vert, slash);
}

// k [B, H, Nk, D] and cols [B, H, C, D] bf16 (last dim contiguous), last int64 [C / per] (the
// last key block each query block sees, ascending) -> out float32 contiguous [B, H, nkb, C].
void block_lse(at::Tensor k, at::Tensor cols, at::Tensor last, int64_t per, int64_t bn, at::Tensor out) {
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && cols.scalar_type() == at::kBFloat16, "bf16 inputs only");
  TORCH_CHECK(k.stride(3) == 1 && cols.stride(3) == 1 && k.size(3) % 2 == 0, "contiguous even last dim");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat, "out must be contiguous float32");
  TORCH_CHECK(last.is_contiguous() && last.scalar_type() == at::kLong && cols.size(2) % per == 0, "bad last");
  block_lse_impl(k, cols, last, per, bn, out);
}

// q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (last dim contiguous, same 16-bit dtype), idx int32
// [Bl, Hl, nqb, W] (ascending, -1 padded), cnt int32 [Bl, Hl, nqb], out like q, lse float32
// contiguous [B, Hq, Nq] or None.
void attend(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor idx, at::Tensor cnt, at::Tensor out,
            std::optional<at::Tensor> lse, int64_t bm, int64_t bn, double scale, bool causal, bool stack) {
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && out.stride(3) == 1,
              "the last dim must be contiguous");
  TORCH_CHECK(q.size(3) % 2 == 0 && bn % 2 == 0, "head dim and block_n must be even");
  TORCH_CHECK(idx.scalar_type() == at::kInt && cnt.scalar_type() == at::kInt, "layout must be int32");
  float* lp = nullptr;
  if (lse.has_value()) {
    TORCH_CHECK(lse->is_contiguous() && lse->scalar_type() == at::kFloat, "lse must be contiguous float32");
    lp = lse->data_ptr<float>();
  }
  if (q.scalar_type() == at::kBFloat16) {
    attend_impl<at::BFloat16>(q, k, v, idx, cnt, out, lp, bm, bn, static_cast<float>(scale), causal, stack);
  } else {
    TORCH_CHECK(false, "bf16 inputs only");
  }
}

// vert, slash float32 contiguous [Bt, He, Nk], cur bool contiguous [Bt, He, nqb, nkb], budget
// int64 contiguous [Bt, He] -> out bool contiguous [Bt, He, nqb, nkb].
void select_blocks(at::Tensor vert, at::Tensor slash, at::Tensor cur, at::Tensor budget, int64_t q_len,
                   int64_t block, at::Tensor out) {
  TORCH_CHECK(vert.is_contiguous() && slash.is_contiguous() && vert.scalar_type() == at::kFloat &&
                  slash.scalar_type() == at::kFloat && vert.sizes() == slash.sizes() && vert.dim() == 3,
              "vert/slash must be contiguous float32 [Bt, He, Nk] alike");
  TORCH_CHECK(cur.is_contiguous() && cur.scalar_type() == at::kBool && cur.dim() == 4 &&
                  cur.size(0) == vert.size(0) && cur.size(1) == vert.size(1), "cur must be contiguous bool [Bt, He, nqb, nkb]");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kBool && out.sizes() == cur.sizes(), "bad out");
  TORCH_CHECK(budget.is_contiguous() && budget.scalar_type() == at::kLong && budget.numel() == vert.size(0) * vert.size(1),
              "budget must be contiguous int64 [Bt, He]");
  TORCH_CHECK(block >= 1 && q_len >= 1 && q_len <= vert.size(2) && cur.size(2) == (q_len + block - 1) / block &&
                  cur.size(3) == (vert.size(2) + block - 1) / block, "lengths do not match the block grid");
  select_impl(vert, slash, cur, budget, q_len, block, out);
}

// mask bool contiguous [R, nkb] -> idx int32 contiguous [R, W], cnt int32 contiguous [R].
void mask_layout(at::Tensor mask, at::Tensor idx, at::Tensor cnt) {
  TORCH_CHECK(mask.is_contiguous() && mask.scalar_type() == at::kBool && mask.dim() == 2, "mask must be contiguous bool [R, nkb]");
  TORCH_CHECK(idx.is_contiguous() && idx.scalar_type() == at::kInt && idx.dim() == 2 && idx.size(0) == mask.size(0),
              "idx must be contiguous int32 [R, W]");
  TORCH_CHECK(cnt.is_contiguous() && cnt.scalar_type() == at::kInt && cnt.numel() == mask.size(0), "cnt must be contiguous int32 [R]");
  mask_layout_impl(mask, idx, cnt);
}

bool available(at::ScalarType dt) { return at::native::cpublas::could_pack(dt); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "DAM block-sparse prefill (CPU, 16-bit, AMX)");
  m.def("available", &available, "whether brgemm can pack this dtype here");
  m.def("block_lse", &block_lse, "the planner's fused dynamic block score (CPU, bf16, AMX)");
  m.def("last_query", &last_query, "the planner's last-query element scores (CPU, bf16, AMX)");
  m.def("select_blocks", &select_blocks, "the estimate's block choice from its element scores (CPU)");
  m.def("mask_layout", &mask_layout, "a block mask's first W kept blocks per row (CPU)");
}
