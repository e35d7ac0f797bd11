// Exact top-k search on the CPU for memlayers' optional native build (see CMakeLists.txt).
//
// score(i, j) = scale * <q_i, k_j> + key_bias[j]   (key_bias optional: -||k||^2 for the l2 metric)
//
// Queries are processed in blocks against cache-sized blocks of keys; each query keeps a bounded
// min-heap of its k best (the root is the worst kept entry, so most candidates cost one compare).
// With fewer query blocks than threads (decode), the keys are split over threads instead and the
// per-split heaps are merged at the end. Plain C ABI so Python loads it with ctypes, no torch headers.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct Entry {
  float score;
  int64_t idx;
};

// Heap order: the root is the smallest score (ties: the larger slot id is dropped first).
inline bool better(const Entry& a, const Entry& b) {
  return a.score > b.score || (a.score == b.score && a.idx < b.idx);
}

inline void offer(std::vector<Entry>& heap, int64_t k, float score, int64_t idx) {
  if (static_cast<int64_t>(heap.size()) < k) {
    heap.push_back({score, idx});
    std::push_heap(heap.begin(), heap.end(), better);
  } else if (better(Entry{score, idx}, heap.front())) {
    std::pop_heap(heap.begin(), heap.end(), better);
    heap.back() = {score, idx};
    std::push_heap(heap.begin(), heap.end(), better);
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t t = 0; t < d; ++t) acc += a[t] * b[t];
  return acc;
}

constexpr int64_t kQueryBlock = 8;
constexpr int64_t kKeyBlock = 512;

}  // namespace

extern "C" int memlayers_knn_topk_f32(const float* q, int64_t nq, const float* keys, int64_t m, int64_t d,
                                      const float* key_bias, float scale, int64_t k, float* out_scores,
                                      int64_t* out_idx) {
  if (nq < 0 || m < 0 || d <= 0 || k <= 0) return 1;
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  const int64_t q_blocks = (nq + kQueryBlock - 1) / kQueryBlock;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(q_blocks < threads ? threads : 1,
                                                                 (m + kKeyBlock - 1) / kKeyBlock));
  const int64_t split_len = (m + splits - 1) / splits;
  std::vector<std::vector<Entry>> heaps(static_cast<size_t>(splits * nq));
  for (auto& h : heaps) h.reserve(static_cast<size_t>(k));

#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t s = 0; s < splits; ++s) {
    for (int64_t qb = 0; qb < q_blocks; ++qb) {
      const int64_t q0 = qb * kQueryBlock, q1 = std::min(nq, q0 + kQueryBlock);
      const int64_t m0 = s * split_len, m1 = std::min(m, m0 + split_len);
      for (int64_t kb = m0; kb < m1; kb += kKeyBlock) {
        const int64_t kb1 = std::min(m1, kb + kKeyBlock);
        for (int64_t i = q0; i < q1; ++i) {
          std::vector<Entry>& heap = heaps[static_cast<size_t>(s * nq + i)];
          const float* qi = q + i * d;
          for (int64_t j = kb; j < kb1; ++j) {
            float score = scale * dot(qi, keys + j * d, d);
            if (key_bias) score += key_bias[j];
            if (score != score) continue;  // NaN: no match (memlayers' rule; it would break the heap order)
            offer(heap, k, score, j);
          }
        }
      }
    }
  }

#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<Entry> merged;
    for (int64_t s = 0; s < splits; ++s) {
      const auto& h = heaps[static_cast<size_t>(s * nq + i)];
      merged.insert(merged.end(), h.begin(), h.end());
    }
    const int64_t kept = std::min<int64_t>(k, static_cast<int64_t>(merged.size()));
    std::partial_sort(merged.begin(), merged.begin() + kept, merged.end(), better);
    for (int64_t r = 0; r < k; ++r) {
      out_scores[i * k + r] = r < kept ? merged[r].score : -std::numeric_limits<float>::infinity();
      out_idx[i * k + r] = r < kept ? merged[r].idx : -1;
    }
  }
  return 0;
}
