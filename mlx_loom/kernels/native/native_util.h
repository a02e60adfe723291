// Helpers shared by the native primitives: input views (dense or strided) and the worker pool.
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

#include "mlx/array.h"
#include "qmm_kernels.h"

namespace loom {

namespace mx = mlx::core;

// fn(i) for i in [0, n), spread over the parked worker pool (the calling thread included).
void parallel_for(int n, const std::function<void(int)>& fn);

// fn(i) for i in [0, n), each index claimed dynamically by whichever thread is free (uneven tasks).
void parallel_tasks(int n, const std::function<void(int)>& fn);

// A whole affine product on the pool (computes the direct path's group sums itself).
void qmm_run(QmmArgs a);
// count products in one pool call (one meeting of the threads instead of count).
void qmm_run_many(QmmArgs* as, int count);

// Strided -> dense row-major copy (rare: inputs are almost always row-contiguous).
template <typename T>
inline void gather_dense(const T* src, const mx::Shape& shape, const mx::Strides& strides, T* dst) {
  const int nd = static_cast<int>(shape.size());
  size_t total = 1;
  for (int d : shape) total *= d;
  std::vector<int> idx(nd, 0);
  for (size_t i = 0; i < total; ++i) {
    long long off = 0;
    for (int d = 0; d < nd; ++d) off += idx[d] * strides[d];
    dst[i] = src[off];
    for (int d = nd - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
}

struct Input {
  const void* ptr;
  bool dense;
  mx::Shape shape;
  mx::Strides strides;
};

inline Input input(const mx::array& a) {
  return {a.data<char>(), a.flags().row_contiguous, a.shape(), a.strides()};
}

template <typename T>
inline const T* dense_ptr(const Input& in, std::vector<T>& storage) {
  if (in.dense) return static_cast<const T*>(in.ptr);
  size_t total = 1;
  for (int d : in.shape) total *= d;
  storage.resize(total);
  gather_dense(static_cast<const T*>(in.ptr), in.shape, in.strides, storage.data());
  return storage.data();
}

}  // namespace loom
