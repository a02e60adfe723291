// The PagedAttention primitive: argument checks, ISA choice, and the task split: (row, kv head,
// tile of queries), heaviest tiles (latest queries: most keys) first, claimed dynamically.
#include "attention.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "vec_kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "native_util.h"

namespace loom {

namespace {

using TaskFn = void (*)(const AttnArgs&, int, int, int, int);
using SparseFn = void (*)(const SparseArgs&, int, int);

TaskFn pick_task_fn() {
#if defined(__x86_64__) || defined(_M_X64)
  if (use_vec_avx2()) return avx2::attend_task;
#endif
  return generic::attend_task;
}

using ProbsFn = void (*)(const ProbsArgs&, int);

ProbsFn pick_probs_fn() {
#if defined(__x86_64__) || defined(_M_X64)
  if (use_vec_avx2()) return avx2::probs_task;
#endif
  return generic::probs_task;
}

SparseFn pick_sparse_fn() {
#if defined(__x86_64__) || defined(_M_X64)
  if (use_vec_avx2()) return avx2::sparse_task;
#endif
  return generic::sparse_task;
}

[[noreturn]] void fail(const std::string& what, const mx::array& a) {
  std::ostringstream s;
  s << "[paged_attention] " << what << ", got " << a.shape() << " " << a.dtype();
  throw std::invalid_argument(s.str());
}

// Keep every index inside the tables and the pool (the kernel reads raw pointers).
void clamp_indices(std::vector<int>& pos, std::vector<int>& tables, int max_pos, int nb) {
  for (int& p : pos) p = std::clamp(p, 0, max_pos);
  for (int& t : tables) t = std::clamp(t, 0, nb - 1);
}

}  // namespace

mx::array paged_attention(
    const mx::array& q,
    const mx::array& k_pool,
    const mx::array& v_pool,
    const mx::array& block_tables,
    const mx::array& q_pos,
    float scale,
    mx::StreamOrDevice s) {
  if (q.dtype() != mx::float32 || q.ndim() != 4) fail("q must be float32 [B, LQ, H, D]", q);
  if (k_pool.dtype() != mx::float32 || k_pool.ndim() != 4) fail("k_pool must be float32 [HKV, NB, BS, D]", k_pool);
  if (v_pool.shape() != k_pool.shape() || v_pool.dtype() != mx::float32) fail("v_pool must match k_pool", v_pool);
  const int B = q.shape(0), LQ = q.shape(1), H = q.shape(2), D = q.shape(3), HKV = k_pool.shape(0);
  if (D % 16 != 0 || k_pool.shape(3) != D) fail("head_dim must be a multiple of 16, equal in q and pools", k_pool);
  if (HKV <= 0 || H % HKV != 0) fail("query heads must be a multiple of kv heads", q);
  if (block_tables.dtype() != mx::int32 || block_tables.ndim() != 2 || block_tables.shape(0) != B ||
      block_tables.shape(1) < 1)
    fail("block_tables must be int32 [B, MB >= 1]", block_tables);
  if (q_pos.dtype() != mx::int32 || q_pos.ndim() != 2 || q_pos.shape(0) != B || q_pos.shape(1) != LQ)
    fail("q_pos must be int32 [B, LQ]", q_pos);
  return mx::array(q.shape(), mx::float32, std::make_shared<PagedAttention>(mx::to_stream(s), scale),
                   {q, k_pool, v_pool, block_tables, q_pos});
}

void PagedAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[paged_attention] CPU only: GPU backends run the reference (fused SDPA)");
}

void PagedAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  const auto& kp = inputs[1];
  AttnArgs a{};
  a.B = inputs[0].shape(0);
  a.LQ = inputs[0].shape(1);
  a.H = inputs[0].shape(2);
  a.D = inputs[0].shape(3);
  a.HKV = kp.shape(0);
  a.NB = kp.shape(1);
  a.BS = kp.shape(2);
  a.MB = inputs[3].shape(1);
  a.scale = scale_;
  a.out = out.data<float>();
  std::vector<Input> views;
  for (const auto& in : inputs) views.push_back(input(in));
  encoder.dispatch([a, views = std::move(views)]() mutable {
    std::vector<float> qs, ks, vs;
    std::vector<int> ts, ps;
    a.q = dense_ptr<float>(views[0], qs);
    a.k_pool = dense_ptr<float>(views[1], ks);
    a.v_pool = dense_ptr<float>(views[2], vs);
    const int* t = dense_ptr<int>(views[3], ts);
    const int* p = dense_ptr<int>(views[4], ps);
    std::vector<int> tables(t, t + (size_t)a.B * a.MB), positions(p, p + (size_t)a.B * a.LQ);
    clamp_indices(positions, tables, a.MB * a.BS - 1, a.NB);
    a.tables = tables.data();
    a.q_pos = positions.data();
    if ((size_t)a.B * a.LQ == 0) return;
    static const TaskFn task = pick_task_fn();
    // ~128 (query, head) rows per task: big enough to amortize each K/V tile read, small enough for
    // a chunk to split across cores; later query tiles see more keys, so they are claimed first.
    const int rep = a.H / a.HKV, qt = std::max(1, std::min(a.LQ, 128 / rep)), tiles = (a.LQ + qt - 1) / qt;
    parallel_tasks(a.B * a.HKV * tiles, [&](int t) {
      const int tile = tiles - 1 - t / (a.B * a.HKV), bg = t % (a.B * a.HKV);
      const int q0 = tile * qt, q1 = std::min(a.LQ, q0 + qt);
      task(a, bg / a.HKV, bg % a.HKV, q0, q1);
    });
  });
}

mx::array last_tile_probs(const mx::array& q, const mx::array& k, const mx::array& kv, int shift, int first_row,
                          float scale, mx::StreamOrDevice s) {
  if (q.dtype() != mx::float32 || q.ndim() != 3 || q.shape(1) != kTile || q.shape(2) % 16 != 0)
    fail("q must be float32 [Hs, 64, D], D a multiple of 16", q);
  if (k.dtype() != mx::float32 || k.ndim() != 3 || k.shape(1) % kTile != 0 || k.shape(1) == 0 || k.shape(2) != q.shape(2))
    fail("k must be float32 [HKV, NK*64, D]", k);
  if (kv.dtype() != mx::int32 || kv.ndim() != 1 || kv.shape(0) != q.shape(0)) fail("kv must be int32 [Hs]", kv);
  return mx::array({q.shape(0), kTile, k.shape(1)}, mx::float32,
                   std::make_shared<LastTileProbs>(mx::to_stream(s), shift, first_row, scale), {q, k, kv});
}

void LastTileProbs::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[last_tile_probs] CPU only: GPU backends run the MLX estimate");
}

void LastTileProbs::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  ProbsArgs a{};
  a.Hs = inputs[0].shape(0);
  a.D = inputs[0].shape(2);
  a.NK = inputs[1].shape(1) / kTile;
  a.shift = std::clamp(shift_, 0, a.NK * kTile);
  a.first_row = first_row_;
  a.scale = scale_;
  a.out = out.data<float>();
  const int HKV = inputs[1].shape(0);
  std::vector<Input> views;
  for (const auto& in : inputs) views.push_back(input(in));
  encoder.dispatch([a, HKV, views = std::move(views)]() mutable {
    std::vector<float> qs, ks;
    std::vector<int> kvs;
    a.q = dense_ptr<float>(views[0], qs);
    a.k = dense_ptr<float>(views[1], ks);
    const int* kv = dense_ptr<int>(views[2], kvs);
    std::vector<int> heads(kv, kv + a.Hs);
    for (int& g : heads) g = std::clamp(g, 0, HKV - 1);
    a.kv = heads.data();
    static const ProbsFn task = pick_probs_fn();
    parallel_tasks(a.Hs, [&](int h) { task(a, h); });
  });
}

mx::array sparse_tile_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const mx::array& kv,
    const mx::array& blocks,
    const mx::array& block_ok,
    const mx::array& columns,
    int shift,
    int base,
    float scale,
    mx::StreamOrDevice s) {
  if (q.dtype() != mx::float32 || q.ndim() != 3 || q.shape(1) % kTile != 0 || q.shape(2) % 16 != 0)
    fail("q must be float32 [Hs, NQ*64, D], D a multiple of 16", q);
  if (k.dtype() != mx::float32 || k.ndim() != 3 || k.shape(1) % kTile != 0 || k.shape(2) != q.shape(2) ||
      v.shape() != k.shape() || v.dtype() != mx::float32)
    fail("k and v must be float32 [HKV, NK*64, D]", k);
  const int Hs = q.shape(0), NQ = q.shape(1) / kTile;
  if (kv.dtype() != mx::int32 || kv.ndim() != 1 || kv.shape(0) != Hs) fail("kv must be int32 [Hs]", kv);
  if (blocks.dtype() != mx::int32 || blocks.ndim() != 3 || blocks.shape(0) != Hs || blocks.shape(1) != NQ)
    fail("blocks must be int32 [Hs, NQ, NB]", blocks);
  if (block_ok.dtype() != mx::bool_ || block_ok.shape() != blocks.shape()) fail("block_ok must be bool like blocks", block_ok);
  if (columns.dtype() != mx::int32 || columns.ndim() != 2 || columns.shape(0) != Hs) fail("columns must be int32 [Hs, NC]", columns);
  return mx::array(q.shape(), mx::float32, std::make_shared<SparseTileAttention>(mx::to_stream(s), shift, base, scale),
                   {q, k, v, kv, blocks, block_ok, columns});
}

void SparseTileAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[sparse_tile_attention] CPU only: GPU backends run the MLX tiles");
}

void SparseTileAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  SparseArgs a{};
  a.Hs = inputs[0].shape(0);
  a.NQ = inputs[0].shape(1) / kTile;
  a.D = inputs[0].shape(2);
  a.NK = inputs[1].shape(1) / kTile;
  a.NB = inputs[4].shape(2);
  a.NC = inputs[6].shape(1);
  a.shift = shift_;
  a.base = base_;
  a.scale = scale_;
  a.out = out.data<float>();
  const int HKV = inputs[1].shape(0);
  std::vector<Input> views;
  for (const auto& in : inputs) views.push_back(input(in));
  encoder.dispatch([a, HKV, views = std::move(views)]() mutable {
    std::vector<float> qs, ks, vs;
    std::vector<int> kvs, bs, cs;
    std::vector<uint8_t> oks;
    a.q = dense_ptr<float>(views[0], qs);
    a.k = dense_ptr<float>(views[1], ks);
    a.v = dense_ptr<float>(views[2], vs);
    const int* kv = dense_ptr<int>(views[3], kvs);
    std::vector<int> heads(kv, kv + a.Hs);
    for (int& g : heads) g = std::clamp(g, 0, HKV - 1);
    a.kv = heads.data();
    a.blocks = dense_ptr<int>(views[4], bs);
    a.block_ok = dense_ptr<uint8_t>(views[5], oks);
    a.columns = dense_ptr<int>(views[6], cs);
    static const SparseFn task = pick_sparse_fn();
    // Later query tiles select more keys (columns apply to every earlier tile): claimed first.
    parallel_tasks(a.Hs * a.NQ, [&](int i) { task(a, i % a.Hs, a.NQ - 1 - i / a.Hs); });
  });
}

}  // namespace loom
