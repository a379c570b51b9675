// oneDNN convolutions and matrix products for JAX on CPUs, called through XLA's FFI.
//
// XLA:CPU's own bf16 products run far below what the CPU's AVX512-BF16 and
// AMX units give through oneDNN, so cnn/kernels/onednn.py sends nn.Conv and
// nn.Dense here. Activations are NHWC and kernels HWIO, as Flax keeps them;
// oneDNN picks its own blocked kernel layout, reached by a reorder per call
// (kernels are small). Primitives are built once per shape and kept, since
// building one costs far more than running it at these sizes. A float32 3x3
// convolution may take cnn's own Winograd kernels (winograd.h) instead, where
// they run faster than oneDNN's implementations for its shape.

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "winograd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace norm {
// Defined with the batch-norm loops below; the Winograd convolutions share it.
template <typename F>
void parallel_chunks(ffi::ThreadPool& pool, int64_t chunks, F body);
}  // namespace norm

// How winograd.h's kernels run their tasks: on XLA's own threads, as the extension's loops do.
auto on_threads(ffi::ThreadPool& pool) {
  return [&pool](int64_t tasks, auto body) { norm::parallel_chunks(pool, tasks, body); };
}
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& cpu_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

memory::data_type dnnl_type(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return memory::data_type::f32;
    case ffi::DataType::BF16: return memory::data_type::bf16;
    default: return memory::data_type::undef;
  }
}

// Each primitive gets its own scratchpad: oneDNN's default one is shared by all primitives, and XLA may run two
// of these calls at once on different threads.
dnnl::primitive_attr own_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

memory scratchpad(const memory::desc& desc) {
  return desc.get_size() ? memory(desc, cpu_engine()) : memory();
}

// One cached primitive, the kernel layout it wants and the buffers it runs with; `lock` serialises runs of it.
struct Entry {
  dnnl::primitive prim;
  memory scratch;
  memory::desc weights;  // the primitive's (diff_)weights layout
  memory::desc user_weights;
  memory blocked;  // the kernel in `weights`' layout, when that is not the user's
  dnnl::primitive reorder;  // between `blocked` and the user's kernel
  memory reorder_scratch;
  memory::desc workspace;  // batch norm with a fused relu: which outputs were positive
  bool own = false;  // cnn's Winograd convolution (winograd.h) in place of `prim`
  std::vector<float> transformed;  // its kernel in the transformed domain, made afresh at each call
  std::mutex lock;

  // Builds the buffers for `prim` (scratchpad `scratch_md`), with a reorder into `weights` or, for a weight
  // gradient (`to_user`), out of it.
  void prepare(const memory::desc& scratch_md, bool to_user) {
    scratch = scratchpad(scratch_md);
    if (weights == user_weights) return;
    blocked = memory(weights, cpu_engine());
    auto from = to_user ? weights : user_weights, to = to_user ? user_weights : weights;
    dnnl::reorder::primitive_desc pd(cpu_engine(), from, cpu_engine(), to, own_scratchpad());
    reorder = dnnl::reorder(pd);
    reorder_scratch = scratchpad(pd.scratchpad_desc());
  }
  void adopt(const Entry& other) {
    prim = other.prim, scratch = other.scratch, weights = other.weights, blocked = other.blocked;
    reorder = other.reorder, reorder_scratch = other.reorder_scratch, own = other.own;
  }
};

void add_scratch(std::unordered_map<int, memory>& args, const memory& scratch) {
  if (scratch) args[DNNL_ARG_SCRATCHPAD] = scratch;
}

template <typename Build>
Entry& cached(const std::string& key, Build build) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::unique_ptr<Entry>> cache;
  std::lock_guard<std::mutex> guard(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return *found->second;
  auto entry = std::make_unique<Entry>();
  build(*entry);
  return *cache.emplace(key, std::move(entry)).first->second;
}

// The shapes of one 2-D convolution, NHWC / HWIO, with oneDNN's logical (N, C, H, W) dims. The kernel's input
// channels are the input's divided by the groups (Flax's feature_group_count: a depthwise convolution has one
// group per channel), so the groups follow from the shapes.
struct ConvShape {
  int64_t n, ih, iw, ic, kh, kw, oc, oh, ow, sh, sw, pt, pl, pb, pr, g;
  memory::data_type type;

  ConvShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y, int64_t sh_,
            int64_t sw_, int64_t pt_, int64_t pl_, memory::data_type t)
      : n(x[0]), ih(x[1]), iw(x[2]), ic(x[3]), kh(w[0]), kw(w[1]), oc(w[3]), oh(y[1]), ow(y[2]), sh(sh_), sw(sw_),
        pt(pt_), pl(pl_), g(w[2] > 0 && x[3] % w[2] == 0 ? x[3] / w[2] : 0), type(t) {
    pb = (oh - 1) * sh + kh - ih - pt;
    pr = (ow - 1) * sw + kw - iw - pl;
  }
  std::string key(const char* kind) const {
    std::ostringstream s;
    s << kind << ' ' << int(type);
    for (int64_t v : {n, ih, iw, ic, kh, kw, oc, oh, ow, sh, sw, pt, pl, pb, pr}) s << ' ' << v;
    if (g != 1) s << " groups " << g;
    return s.str();
  }
  memory::desc src(memory::data_type t) const { return {{n, ic, ih, iw}, t, tag::nhwc}; }
  memory::desc dst(memory::data_type t) const { return {{n, oc, oh, ow}, t, tag::nhwc}; }
  memory::dims weight_dims() const {
    return g == 1 ? memory::dims{oc, ic, kh, kw} : memory::dims{g, oc / g, ic / g, kh, kw};
  }
  // The layout the primitive chooses.
  memory::desc weights(memory::data_type t) const { return {weight_dims(), t, tag::any}; }
  // Flax's HWIO kernel (its O axis is the groups' outputs one after another).
  memory::desc user_weights(memory::data_type t) const { return {weight_dims(), t, g == 1 ? tag::hwio : tag::hwigo}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
  bool valid() const {
    return type != memory::data_type::undef && pb >= 0 && pr >= 0 && g > 0 && oc % g == 0;
  }
  // The convolution as winograd.h takes it, and the input gradient's (dy to dx: the pads become 2 - pt, 2 - pl).
  winograd::Shape winograd() const { return {n, ih, iw, ic, oh, ow, oc, pt, pl}; }
  winograd::Shape winograd_backward() const { return {n, oh, ow, oc, ih, iw, ic, 2 - pt, 2 - pl}; }
  // Whether cnn's Winograd convolution is a candidate: float32, 3x3, stride 1, one group, on an AVX2 + FMA CPU.
  bool winograd_suits() const {
    return type == memory::data_type::f32 && kh == 3 && kw == 3 && sh == 1 && sw == 1 && g == 1 &&
           winograd::available() && winograd::suits(winograd()) && winograd::suits(winograd_backward());
  }
};

// Runs a primitive without a kernel layout of its own (matmul, pooling, batch norm), holding its lock.
void run_locked(Entry& e, std::unordered_map<int, memory>& args) {
  std::lock_guard<std::mutex> guard(e.lock);
  add_scratch(args, e.scratch);
  dnnl::stream& stream = cpu_stream();
  e.prim.execute(stream, args);
  stream.wait();
}

// `relu`: relu applied to the output in the convolution's own pass (a oneDNN post-op), not in one more pass over it.
// `add`: a tensor of the output's shape added to it, in the same pass (a binary post-op).
dnnl::convolution_forward::primitive_desc conv_forward_pd(const ConvShape& s, bool relu = false, bool add = false) {
  memory::desc bias({s.oc}, memory::data_type::f32, tag::a);
  dnnl::primitive_attr attr = own_scratchpad();
  dnnl::post_ops ops;
  if (add) ops.append_binary(dnnl::algorithm::binary_add, s.dst(s.type));
  if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (add || relu) attr.set_post_ops(ops);
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, s.src(s.type),
      s.weights(s.type), bias, s.dst(s.type), s.strides(), s.pad_l(), s.pad_r(), attr);
}

// Runs `e.prim` with the user's HWIO kernel at `user`, reordered into (or, for a gradient, out of) the primitive's
// layout if needed.
void run_with_weights(Entry& e, void* user, int weights_arg, std::unordered_map<int, memory> args) {
  dnnl::stream& stream = cpu_stream();
  memory user_mem(e.user_weights, cpu_engine(), user);
  add_scratch(args, e.scratch);
  if (!e.blocked) {
    args[weights_arg] = user_mem;
    e.prim.execute(stream, args);
    stream.wait();
    return;
  }
  bool to_user = weights_arg == DNNL_ARG_DIFF_WEIGHTS;
  std::unordered_map<int, memory> reorder_args{{DNNL_ARG_FROM, to_user ? e.blocked : user_mem},
                                               {DNNL_ARG_TO, to_user ? user_mem : e.blocked}};
  add_scratch(reorder_args, e.reorder_scratch);
  args[weights_arg] = e.blocked;
  if (!to_user) e.reorder.execute(stream, reorder_args);
  e.prim.execute(stream, args);
  if (to_user) e.reorder.execute(stream, reorder_args);
  stream.wait();
}

// Where each shape's chosen implementation is recorded ("" until onednn.py sets it; then no record is kept).
std::string& choices_path() {
  static std::string path;
  return path;
}

// The record of chosen implementations, one "key<TAB>implementation" line per primitive, locked (flock) for as
// long as this lives, so processes sharing the file (a run and its resume, test workers) each take what the first
// one chose: timing alone chose differently in different processes, and two implementations round differently,
// which broke bitwise resume. It also spares a rerun the timing in its first step.
class ChoiceRecord {
 public:
  explicit ChoiceRecord(const std::string& key) : key_(key) {
    if (choices_path().empty()) return;
    fd_ = open(choices_path().c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) return;
    if (flock(fd_, LOCK_EX) != 0) {
      close(fd_);
      fd_ = -1;
      return;
    }
    std::string text;
    char buffer[4096];
    ssize_t got;
    while ((got = read(fd_, buffer, sizeof buffer)) > 0) text.append(buffer, got);
    std::istringstream lines(text);
    for (std::string line; std::getline(lines, line);) {
      auto tab = line.find('\t');
      if (tab != std::string::npos && line.compare(0, tab, key_) == 0 && tab == key_.size()) chosen_ = line.substr(tab + 1);
    }
  }
  ~ChoiceRecord() {
    if (fd_ >= 0) close(fd_);  // releases the lock
  }
  const std::string& chosen() const { return chosen_; }
  void keep(const std::string& impl) {
    if (fd_ < 0 || impl == chosen_) return;
    std::string line = key_ + '\t' + impl + '\n';
    if (lseek(fd_, 0, SEEK_END) >= 0 && write(fd_, line.data(), line.size()) == ssize_t(line.size())) chosen_ = impl;
  }

 private:
  std::string key_, chosen_;
  int fd_ = -1;
};

// Fills `e` with the implementation recorded for `key`, else with the fastest of oneDNN's implementations for the
// primitive (reference ones aside), timing each on the call's own buffers through `run(e)`, and records it: several
// may take a shape and the first oneDNN lists is not always the fastest (its brgemm weight gradients, for one,
// lose to its plain JIT ones on small images). `make_pd()` builds the descriptor; its impls are tried in oneDNN's
// order, each name once (oneDNN lists some many times over). The candidates are timed in turns, round after round,
// each keeping its fastest round, so that a burst of other work on the machine slows them alike: timed one after
// another, such a burst during one candidate's runs could make it lose, and the record keeps a choice for good.
// `winograd`: cnn's own Winograd convolution (winograd.h) is a candidate too; `run` runs it for an Entry with `own`.
template <typename Prim, typename MakePD, typename Weights, typename Run>
void fastest(Entry& e, const std::string& key, MakePD make_pd, Weights weights_of, bool to_user, Run run,
             bool winograd = false) {
  if (winograd && winograd::forced()) {
    if (std::getenv("CNN_ONEDNN_LOG")) std::fprintf(stderr, "cnn oneDNN: %s %s (CNN_WINOGRAD=1)\n", key.c_str(), winograd::kName);
    e.own = true;
    return;
  }
  ChoiceRecord record(key);
  std::vector<std::unique_ptr<Entry>> candidates;
  std::vector<std::string> names;
  // Only the recorded implementation, if this oneDNN has it; else all of them.
  for (const std::string& only : {record.chosen(), std::string()}) {
    std::set<std::string> tried;
    auto pd = make_pd();
    do {
      std::string impl = pd.impl_info_str();
      if (!tried.insert(impl).second || (impl.rfind("ref", 0) == 0 && !names.empty())) continue;
      if (!only.empty() && impl != only) continue;
      auto candidate = std::make_unique<Entry>();
      candidate->prim = Prim(pd);
      candidate->weights = weights_of(pd);
      candidate->user_weights = e.user_weights;
      candidate->prepare(pd.scratchpad_desc(), to_user);
      candidates.push_back(std::move(candidate));
      names.push_back(impl);
    } while (pd.next_impl());
    if (winograd && (only.empty() || only == winograd::kName)) {
      candidates.push_back(std::make_unique<Entry>());
      candidates.back()->own = true;
      names.push_back(winograd::kName);
    }
    if (!candidates.empty()) break;
  }
  // Rounds 0-1 warm up (oneDNN generates code in round 0). After round 1 a candidate more than kBehind times slower
  // than the fastest is timed no further: the timing took most of a first step (ResNet-50's float32 one: ~54 of ~80 s,
  // much of it on SSE4.1 and AVX2 kernels an AVX-512 CPU also lists), and no later round brings such a one level.
  constexpr double kBehind = 3.0;
  std::vector<double> seconds(candidates.size(), 1e30), took(candidates.size(), 0.0);
  std::vector<bool> timed(candidates.size(), true);
  for (int round = 0; candidates.size() > 1 && round < 6; ++round) {
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (!timed[i]) continue;
      auto start = std::chrono::steady_clock::now();
      run(*candidates[i]);
      took[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (round >= 2) seconds[i] = std::min(seconds[i], took[i]);
    }
    if (round == 1) {
      double fastest_warm = *std::min_element(took.begin(), took.end());
      for (size_t i = 0; i < candidates.size(); ++i) timed[i] = took[i] <= kBehind * fastest_warm;
    }
  }
  size_t best = std::min_element(seconds.begin(), seconds.end()) - seconds.begin();
  if (std::getenv("CNN_ONEDNN_LOG") && candidates.size() > 1) {  // what was timed
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (timed[i]) {
        std::fprintf(stderr, "cnn oneDNN: %s %.3f ms\n", names[i].c_str(), seconds[i] * 1e3);
      } else {
        std::fprintf(stderr, "cnn oneDNN: %s %.3f ms warm, dropped\n", names[i].c_str(), took[i] * 1e3);
      }
    }
  }
  e.adopt(*candidates[best]);
  record.keep(names[best]);  // a no-op when it is the recorded one
}

ffi::Error bad_shape(const char* what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string("cnn oneDNN: unsupported ") + what);
}

// y = conv(x, w) + bias (+ addend, if given), then relu(y) if `relu`; x, w, y and the addend share a dtype (f32 or
// bf16), bias is f32.
ffi::Error conv_forward(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> bias,
                        const ffi::AnyBuffer* addend, ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw,
                        int64_t pt, int64_t pl, int64_t relu) {
  ConvShape s(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pl, dnnl_type(x.element_type()));
  if (!s.valid() || (addend && (addend->element_type() != x.element_type() ||
                                addend->element_count() != y->element_count()))) {
    return bad_shape("convolution");
  }
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, memory(s.src(s.type), cpu_engine(), x.untyped_data())},
      {DNNL_ARG_BIAS, memory({{s.oc}, memory::data_type::f32, tag::a}, cpu_engine(), bias.typed_data())},
      {DNNL_ARG_DST, memory(s.dst(s.type), cpu_engine(), y->untyped_data())}};
  if (addend) {
    args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] = memory(s.dst(s.type), cpu_engine(),
                                                                      addend->untyped_data());
  }
  auto run = [&](Entry& c) {
    if (!c.own) return run_with_weights(c, w.untyped_data(), DNNL_ARG_WEIGHTS, args);
    c.transformed.resize(16 * s.ic * s.oc);
    winograd::FlushDenormals flush;
    winograd::transform_kernel(w.typed_data<float>(), s.ic, s.oc, false, c.transformed.data());
    winograd::forward(s.winograd(), x.typed_data<float>(), c.transformed.data(), bias.typed_data(),
                      addend ? addend->typed_data<float>() : nullptr, relu, y->typed_data<float>(),
                      on_threads(pool));
  };
  // With a post-op, the implementation recorded for the plain convolution of this shape (the same sums, so the same
  // values up to the relu), or the fastest with the post-op, recorded for both.
  std::string kind = std::string("fwd") + (addend ? "_add" : "") + (relu ? "_relu" : "");
  Entry& e = cached(s.key(kind.c_str()), [&](Entry& e) {
    e.user_weights = s.user_weights(s.type);
    fastest<dnnl::convolution_forward>(e, s.key("fwd"), [&] { return conv_forward_pd(s, relu, addend != nullptr); },
                                       [](auto& pd) { return pd.weights_desc(); }, false, run, s.winograd_suits());
  });
  std::lock_guard<std::mutex> guard(e.lock);
  run(e);
  return ffi::Error::Success();
}

ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> bias,
                           ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                           int64_t relu) {
  return conv_forward(pool, x, w, bias, nullptr, y, sh, sw, pt, pl, relu);
}

ffi::Error ConvForwardAddImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> bias, ffi::AnyBuffer addend,
                              ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                              int64_t relu) {
  return conv_forward(pool, x, w, bias, &addend, y, sh, sw, pt, pl, relu);
}

// dx from dy and w (all one dtype); dx's shape is the convolution's input shape.
ffi::Error ConvBackwardDataImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx, int64_t sh,
                                int64_t sw, int64_t pt, int64_t pl) {
  ConvShape s(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pl, dnnl_type(dy.element_type()));
  if (!s.valid()) return bad_shape("convolution");
  std::unordered_map<int, memory> args{{DNNL_ARG_DIFF_DST, memory(s.dst(s.type), cpu_engine(), dy.untyped_data())},
                                       {DNNL_ARG_DIFF_SRC, memory(s.src(s.type), cpu_engine(), dx->untyped_data())}};
  auto run = [&](Entry& c) {
    if (!c.own) return run_with_weights(c, w.untyped_data(), DNNL_ARG_WEIGHTS, args);
    c.transformed.resize(16 * s.ic * s.oc);  // dx is dy convolved with the kernel turned half a circle
    winograd::FlushDenormals flush;
    winograd::transform_kernel(w.typed_data<float>(), s.ic, s.oc, true, c.transformed.data());
    winograd::forward(s.winograd_backward(), dy.typed_data<float>(), c.transformed.data(), nullptr, nullptr, false,
                      dx->typed_data<float>(), on_threads(pool));
  };
  Entry& e = cached(s.key("bwd_data"), [&](Entry& e) {
    auto hint = conv_forward_pd(s);  // must outlive the descriptors made from it: next_impl() reads it
    auto make_pd = [&] {
      return dnnl::convolution_backward_data::primitive_desc(
          cpu_engine(), dnnl::algorithm::convolution_direct, s.src(s.type), s.weights(s.type),
          s.dst(s.type), s.strides(), s.pad_l(), s.pad_r(), hint, own_scratchpad());
    };
    e.user_weights = s.user_weights(s.type);
    fastest<dnnl::convolution_backward_data>(e, s.key("bwd_data"), make_pd, [](auto& pd) { return pd.weights_desc(); },
                                             false, run, s.winograd_suits());
  });
  std::lock_guard<std::mutex> guard(e.lock);
  run(e);
  return ffi::Error::Success();
}

// dw (f32, HWIO) and d_bias (f32) from x and dy (one dtype).
ffi::Error ConvBackwardWeightsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::Buffer<ffi::F32>> dw,
                                   ffi::Result<ffi::Buffer<ffi::F32>> dbias, int64_t sh, int64_t sw, int64_t pt,
                                   int64_t pl) {
  ConvShape s(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pl, dnnl_type(x.element_type()));
  if (!s.valid()) return bad_shape("convolution");
  const auto f32 = memory::data_type::f32;
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, memory(s.src(s.type), cpu_engine(), x.untyped_data())},
      {DNNL_ARG_DIFF_DST, memory(s.dst(s.type), cpu_engine(), dy.untyped_data())},
      {DNNL_ARG_DIFF_BIAS, memory({{s.oc}, f32, tag::a}, cpu_engine(), dbias->typed_data())}};
  auto run = [&](Entry& c) {
    if (!c.own) return run_with_weights(c, dw->typed_data(), DNNL_ARG_DIFF_WEIGHTS, args);
    winograd::backward_weights(s.winograd(), x.typed_data<float>(), dy.typed_data<float>(), dw->typed_data(),
                               dbias->typed_data(), on_threads(pool));
  };
  Entry& e = cached(s.key("bwd_weights"), [&](Entry& e) {
    auto hint = conv_forward_pd(s);
    auto make_pd = [&] {
      return dnnl::convolution_backward_weights::primitive_desc(
          cpu_engine(), dnnl::algorithm::convolution_direct, s.src(s.type), s.weights(f32),
          memory::desc({s.oc}, f32, tag::a), s.dst(s.type), s.strides(), s.pad_l(), s.pad_r(), hint, own_scratchpad());
    };
    e.user_weights = s.user_weights(f32);
    fastest<dnnl::convolution_backward_weights>(e, s.key("bwd_weights"), make_pd,
                                                [](auto& pd) { return pd.diff_weights_desc(); }, true, run,
                                                s.winograd_suits());
  });
  std::lock_guard<std::mutex> guard(e.lock);
  run(e);
  return ffi::Error::Success();
}

// c = op(a) @ op(b) [+ bias]: a is (M, K) or, with trans_a, stored (K, M); b is (K, N) or stored (N, K).
// a and b share a dtype; c is f32 or that dtype; bias (N,) is f32.
ffi::Error MatmulImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::F32>* bias, ffi::Result<ffi::AnyBuffer> c,
                      int64_t trans_a, int64_t trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) return bad_shape("matmul rank");
  int64_t m = cd[0], n = cd[1], k = trans_a ? ad[0] : ad[1];
  auto in_type = dnnl_type(a.element_type()), out_type = dnnl_type(c->element_type());
  if (in_type == memory::data_type::undef || out_type == memory::data_type::undef) return bad_shape("dtype");
  memory::desc a_md({m, k}, in_type, trans_a ? memory::dims{1, m} : memory::dims{k, 1});
  memory::desc b_md({k, n}, in_type, trans_b ? memory::dims{1, k} : memory::dims{n, 1});
  memory::desc c_md({m, n}, out_type, memory::dims{n, 1});
  memory::desc bias_md({1, n}, memory::data_type::f32, memory::dims{n, 1});
  std::ostringstream key;
  key << "matmul " << int(in_type) << ' ' << int(out_type) << ' ' << m << ' ' << n << ' ' << k << ' ' << trans_a
      << ' ' << trans_b << ' ' << (bias != nullptr);
  Entry& e = cached(key.str(), [&](Entry& e) {
    auto pd = bias ? dnnl::matmul::primitive_desc(cpu_engine(), a_md, b_md, bias_md, c_md, own_scratchpad())
                   : dnnl::matmul::primitive_desc(cpu_engine(), a_md, b_md, c_md, own_scratchpad());
    e.prim = dnnl::matmul(pd);
    e.scratch = scratchpad(pd.scratchpad_desc());
  });
  std::unordered_map<int, memory> args{{DNNL_ARG_SRC, memory(a_md, cpu_engine(), a.untyped_data())},
                                       {DNNL_ARG_WEIGHTS, memory(b_md, cpu_engine(), b.untyped_data())},
                                       {DNNL_ARG_DST, memory(c_md, cpu_engine(), c->untyped_data())}};
  if (bias) args[DNNL_ARG_BIAS] = memory(bias_md, cpu_engine(), bias->typed_data());
  run_locked(e, args);
  return ffi::Error::Success();
}

ffi::Error MatmulPlainImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c, int64_t trans_a,
                           int64_t trans_b) {
  return MatmulImpl(a, b, nullptr, c, trans_a, trans_b);
}

ffi::Error MatmulBiasImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::F32> bias,
                          ffi::Result<ffi::AnyBuffer> c, int64_t trans_a, int64_t trans_b) {
  return MatmulImpl(a, b, &bias, c, trans_a, trans_b);
}

// Average pooling over windows that tile the input (no padding): y from x, or dx from dy; NHWC, f32 or bf16.
// XLA:CPU runs these reductions and their broadcasts several times slower than oneDNN's JIT kernels.
ffi::Error PoolImpl(ffi::AnyBuffer in, ffi::Result<ffi::AnyBuffer> out, int64_t backward) {
  auto id = in.dimensions(), od = out->dimensions();
  if (id.size() != 4 || od.size() != 4) return bad_shape("pooling rank");
  auto type = dnnl_type(in.element_type());
  if (type == memory::data_type::undef) return bad_shape("dtype");
  auto xd = backward ? od : id, yd = backward ? id : od;  // the forward pass's input and output shapes
  memory::desc x_md({xd[0], xd[3], xd[1], xd[2]}, type, tag::nhwc), y_md({yd[0], yd[3], yd[1], yd[2]}, type, tag::nhwc);
  memory::dims window{xd[1] / yd[1], xd[2] / yd[2]}, none{0, 0};
  std::ostringstream key;
  key << "pool " << backward << ' ' << int(type);
  for (auto v : xd) key << ' ' << v;
  for (auto v : yd) key << ' ' << v;
  Entry& e = cached(key.str(), [&](Entry& e) {
    dnnl::pooling_forward::primitive_desc fwd(cpu_engine(), dnnl::prop_kind::forward_training,
                                              dnnl::algorithm::pooling_avg_exclude_padding, x_md, y_md, window,
                                              window, none, none, none, own_scratchpad());
    if (backward) {
      dnnl::pooling_backward::primitive_desc pd(cpu_engine(), dnnl::algorithm::pooling_avg_exclude_padding, x_md,
                                                y_md, window, window, none, none, none, fwd, own_scratchpad());
      e.prim = dnnl::pooling_backward(pd);
      e.scratch = scratchpad(pd.scratchpad_desc());
    } else {
      e.prim = dnnl::pooling_forward(fwd);
      e.scratch = scratchpad(fwd.scratchpad_desc());
    }
  });
  std::unordered_map<int, memory> args;
  if (backward) {
    args = {{DNNL_ARG_DIFF_DST, memory(y_md, cpu_engine(), in.untyped_data())},
            {DNNL_ARG_DIFF_SRC, memory(x_md, cpu_engine(), out->untyped_data())}};
  } else {
    args = {{DNNL_ARG_SRC, memory(x_md, cpu_engine(), in.untyped_data())},
            {DNNL_ARG_DST, memory(y_md, cpu_engine(), out->untyped_data())}};
  }
  run_locked(e, args);
  return ffi::Error::Success();
}

// Batch norm in training over the last axis: x (rows..., C) seen as oneDNN's (N, C, S, 1) in nhwc, f32 or bf16;
// scale, shift and the statistics are f32. XLA:CPU runs the per-channel sums, the normalisation and their
// gradients as single-threaded loops (and the sums as products with a row of ones in cnn/kernels/cpu.py);
// oneDNN's JIT kernels do each pass over the activations once, on every core.
struct NormShape {
  int64_t n, c, s;
  memory::data_type type;
  float epsilon;

  NormShape(ffi::Span<const int64_t> x, memory::data_type t, float eps) : n(x[0]), c(x[x.size() - 1]), s(1), type(t),
                                                                       epsilon(eps) {
    for (size_t i = 1; i + 1 < x.size(); ++i) s *= x[i];
  }
  memory::desc data() const { return {{n * s, c}, type, tag::nc}; }
  memory::desc channels() const { return {{c}, memory::data_type::f32, tag::a}; }
  std::string key(const char* kind) const {
    std::ostringstream k;
    k << kind << ' ' << int(type) << ' ' << n << ' ' << c << ' ' << s << ' ' << epsilon;
    return k.str();
  }
  bool valid() const { return type != memory::data_type::undef && n > 0 && c > 0; }
};

const auto kNormFlags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
// With `relu`, oneDNN applies max(y, 0) in the same pass (fuse_norm_relu) and keeps which outputs were positive in a
// workspace (a bit each) for the backward pass, which then zeroes those gradients itself: two passes over the
// activations fewer than batch norm followed by a separate relu.
dnnl::normalization_flags norm_flags(bool relu) {
  return relu ? kNormFlags | dnnl::normalization_flags::fuse_norm_relu : kNormFlags;
}

dnnl::batch_normalization_forward::primitive_desc norm_forward_pd(const NormShape& s, bool relu = false) {
  return dnnl::batch_normalization_forward::primitive_desc(cpu_engine(), dnnl::prop_kind::forward_training, s.data(),
                                                           s.data(), s.epsilon, norm_flags(relu), own_scratchpad());
}

// y = (x - mean) / sqrt(var + epsilon) * scale + shift (then max(y, 0) with `ws`), with the batch's mean and
// (biased) variance returned.
ffi::Error norm_forward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                        ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                        ffi::Result<ffi::Buffer<ffi::F32>> var, ffi::Result<ffi::AnyBuffer>* ws, float epsilon) {
  NormShape s(x.dimensions(), dnnl_type(x.element_type()), epsilon);
  if (!s.valid() || y->element_type() != x.element_type()) return bad_shape("batch norm");
  const bool relu = ws != nullptr;
  Entry& e = cached(s.key(relu ? "norm_relu_fwd" : "norm_fwd"), [&](Entry& e) {
    auto pd = norm_forward_pd(s, relu);
    e.prim = dnnl::batch_normalization_forward(pd);
    e.scratch = scratchpad(pd.scratchpad_desc());
    e.workspace = pd.workspace_desc();
  });
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, memory(s.data(), cpu_engine(), x.untyped_data())},
      {DNNL_ARG_DST, memory(s.data(), cpu_engine(), y->untyped_data())},
      {DNNL_ARG_SCALE, memory(s.channels(), cpu_engine(), scale.typed_data())},
      {DNNL_ARG_SHIFT, memory(s.channels(), cpu_engine(), shift.typed_data())},
      {DNNL_ARG_MEAN, memory(s.channels(), cpu_engine(), mean->typed_data())},
      {DNNL_ARG_VARIANCE, memory(s.channels(), cpu_engine(), var->typed_data())}};
  if (relu) {
    if ((*ws)->size_bytes() < e.workspace.get_size()) return bad_shape("batch norm workspace");
    args[DNNL_ARG_WORKSPACE] = memory(e.workspace, cpu_engine(), (*ws)->untyped_data());
  }
  run_locked(e, args);
  return ffi::Error::Success();
}

ffi::Error NormForwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                           ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                           ffi::Result<ffi::Buffer<ffi::F32>> var, float epsilon) {
  return norm_forward(x, scale, shift, y, mean, var, nullptr, epsilon);
}

ffi::Error NormReluForwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                               ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                               ffi::Result<ffi::Buffer<ffi::F32>> var, ffi::Result<ffi::AnyBuffer> ws,
                               float epsilon) {
  return norm_forward(x, scale, shift, y, mean, var, &ws, epsilon);
}

// dx, d_scale and d_shift from x, the forward pass's statistics, scale and dy (and, after a fused relu, its
// workspace `ws`).
ffi::Error norm_backward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                         ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer dy, ffi::AnyBuffer* ws,
                         ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> d_scale,
                         ffi::Result<ffi::Buffer<ffi::F32>> d_shift, float epsilon) {
  NormShape s(x.dimensions(), dnnl_type(x.element_type()), epsilon);
  if (!s.valid() || dy.element_type() != x.element_type()) return bad_shape("batch norm");
  const bool relu = ws != nullptr;
  Entry& e = cached(s.key(relu ? "norm_relu_bwd" : "norm_bwd"), [&](Entry& e) {
    auto hint = norm_forward_pd(s, relu);
    dnnl::batch_normalization_backward::primitive_desc pd(cpu_engine(), dnnl::prop_kind::backward, s.data(),
                                                          s.data(), s.data(), s.epsilon, norm_flags(relu), hint,
                                                          own_scratchpad());
    e.prim = dnnl::batch_normalization_backward(pd);
    e.scratch = scratchpad(pd.scratchpad_desc());
    e.workspace = pd.workspace_desc();
  });
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, memory(s.data(), cpu_engine(), x.untyped_data())},
      {DNNL_ARG_MEAN, memory(s.channels(), cpu_engine(), mean.typed_data())},
      {DNNL_ARG_VARIANCE, memory(s.channels(), cpu_engine(), var.typed_data())},
      {DNNL_ARG_SCALE, memory(s.channels(), cpu_engine(), scale.typed_data())},
      {DNNL_ARG_DIFF_DST, memory(s.data(), cpu_engine(), dy.untyped_data())},
      {DNNL_ARG_DIFF_SRC, memory(s.data(), cpu_engine(), dx->untyped_data())},
      {DNNL_ARG_DIFF_SCALE, memory(s.channels(), cpu_engine(), d_scale->typed_data())},
      {DNNL_ARG_DIFF_SHIFT, memory(s.channels(), cpu_engine(), d_shift->typed_data())}};
  if (relu) {
    if (ws->size_bytes() < e.workspace.get_size()) return bad_shape("batch norm workspace");
    args[DNNL_ARG_WORKSPACE] = memory(e.workspace, cpu_engine(), ws->untyped_data());
  }
  run_locked(e, args);
  return ffi::Error::Success();
}

ffi::Error NormBackwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                            ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                            ffi::Result<ffi::Buffer<ffi::F32>> d_scale, ffi::Result<ffi::Buffer<ffi::F32>> d_shift,
                            float epsilon) {
  return norm_backward(x, mean, var, scale, dy, nullptr, dx, d_scale, d_shift, epsilon);
}

ffi::Error NormReluBackwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                                ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer dy, ffi::AnyBuffer ws,
                                ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> d_scale,
                                ffi::Result<ffi::Buffer<ffi::F32>> d_shift, float epsilon) {
  return norm_backward(x, mean, var, scale, dy, &ws, dx, d_scale, d_shift, epsilon);
}

}  // namespace

// Sets the file recording each shape's chosen implementation (ChoiceRecord); "" keeps no record.
extern "C" void cnn_onednn_record_choices(const char* path) { choices_path() = path ? path : ""; }

// 1 when oneDNN normalises `channels` channels of this type (0 float32, 1 bf16) with JIT kernels in both passes;
// else 0. Where they lack a vector width's worth of channels (bf16 with 8 or 24 channels, say), oneDNN falls back
// to its generic C++ loops ("nspc_bnorm:any"), 20x slower than XLA's own batch norm, so cnn leaves those to XLA.
extern "C" int cnn_onednn_norm_jit(int64_t channels, int bf16) {
  try {
    const std::vector<int64_t> dims{64, 4, 4, channels};
    NormShape s(dims, bf16 ? memory::data_type::bf16 : memory::data_type::f32, 1e-3f);
    auto fwd = norm_forward_pd(s);
    dnnl::batch_normalization_backward::primitive_desc bwd(cpu_engine(), dnnl::prop_kind::backward, s.data(),
                                                           s.data(), s.data(), s.epsilon, kNormFlags, fwd);
    for (const std::string impl : {fwd.impl_info_str(), bwd.impl_info_str()}) {
      if (impl.find("jit") == std::string::npos) return 0;
    }
    return 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}

// The bytes of the workspace batch norm with a fused relu keeps for `rows` x `channels` of this type (0 float32, 1
// bf16), or 0 when oneDNN has no JIT kernels for it; onednn.py sizes the FFI call's workspace output with it.
extern "C" int64_t cnn_onednn_norm_relu_workspace(int64_t rows, int64_t channels, int bf16) {
  try {
    const std::vector<int64_t> dims{rows, channels};
    NormShape s(dims, bf16 ? memory::data_type::bf16 : memory::data_type::f32, 1e-3f);
    auto fwd = norm_forward_pd(s, true);
    dnnl::batch_normalization_backward::primitive_desc bwd(cpu_engine(), dnnl::prop_kind::backward, s.data(),
                                                           s.data(), s.data(), s.epsilon, norm_flags(true), fwd);
    for (const std::string impl : {fwd.impl_info_str(), bwd.impl_info_str()}) {
      if (impl.find("jit") == std::string::npos) return 0;
    }
    return int64_t(std::max(fwd.workspace_desc().get_size(), bwd.workspace_desc().get_size()));
  } catch (const dnnl::error&) {
    return 0;
  }
}

// 1 when oneDNN can create, with an implementation of its own that is not the slow reference one, each bf16
// primitive cnn's layers use (convolution forward and both backward passes, matmul, average pooling); else 0. An
// AVX2-only CPU has no bf16 convolution at all: asking oneDNN is surer than reading instruction-set flags, and it
// also honours ONEDNN_MAX_CPU_ISA.
extern "C" int cnn_onednn_bf16_supported() {
  try {
    const auto bf16 = memory::data_type::bf16, f32 = memory::data_type::f32;
    const memory::dims strides{1, 1}, pads{1, 1};
    memory::desc src({2, 8, 8, 8}, bf16, tag::nhwc), dst({2, 8, 8, 8}, bf16, tag::nhwc);
    memory::desc bias({8}, f32, tag::a);
    dnnl::convolution_forward::primitive_desc fwd(
        cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
        memory::desc({8, 8, 3, 3}, bf16, tag::any), bias, dst, strides, pads, pads);
    dnnl::convolution_backward_data::primitive_desc data(
        cpu_engine(), dnnl::algorithm::convolution_direct, src, memory::desc({8, 8, 3, 3}, bf16, tag::any), dst,
        strides, pads, pads, fwd);
    dnnl::convolution_backward_weights::primitive_desc weights(
        cpu_engine(), dnnl::algorithm::convolution_direct, src, memory::desc({8, 8, 3, 3}, f32, tag::any), bias,
        dst, strides, pads, pads, fwd);
    dnnl::matmul::primitive_desc matmul(cpu_engine(), memory::desc({4, 8}, bf16, tag::ab),
                                        memory::desc({8, 8}, bf16, tag::ab), memory::desc({4, 8}, bf16, tag::ab));
    dnnl::pooling_forward::primitive_desc pool(
        cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_avg_exclude_padding, src,
        memory::desc({2, 8, 4, 4}, bf16, tag::nhwc), {2, 2}, {2, 2}, {0, 0}, {0, 0}, {0, 0});
    for (const std::string impl : {fwd.impl_info_str(), data.impl_info_str(), weights.impl_info_str(),
                                   matmul.impl_info_str(), pool.impl_info_str()}) {
      if (impl.rfind("ref", 0) == 0) return 0;
    }
    return 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}

#define CONV_ATTRS Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pl")
#define CONV_FORWARD_ARGS Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>()  // x, w, bias

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().CONV_FORWARD_ARGS.Ret<ffi::AnyBuffer>()
                                  .CONV_ATTRS.Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForwardAdd, ConvForwardAddImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().CONV_FORWARD_ARGS.Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  .CONV_ATTRS.Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBackwardData, ConvBackwardDataImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  .CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBackwardWeights, ConvBackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Matmul, MatmulPlainImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatmulBias, MatmulBiasImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AvgPool, PoolImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Attr<int64_t>("backward"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormForward, NormForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormBackward, NormBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormReluForward, NormReluForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormReluBackward, NormReluBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

// --- Batch norm in training with cnn's own loops -------------------------------------------------------------
//
// oneDNN's batch norm makes three passes forward (mean, variance, normalisation) and, on 16 to 64 channels in
// bf16, ran at half the speed of these. They make two each way: the per-channel sums (of x and x*x forward; of dy and
// dy*(x - mean) backward), then one elementwise pass, each in chunks of rows whose sums are joined in chunk order, so
// a result does not depend on the thread count. An activation after the normalisation (relu or relu6) is applied in
// its pass. Its gradient mask (y > 0; relu6: 0 < y < 6) the backward pass recomputes from x, as the forward pass
// rounded it, rather than reading y: one tensor less to stream through each backward pass, which memory bounds. With
// a residual, the output is relu(batch_norm(x) + residual), and the mask comes from reading the output.
namespace norm {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t u = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {  // round to nearest even, as XLA converts
  uint32_t u;
  std::memcpy(&u, &v, 4);
  p[i] = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40) : uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

// Each loop compiled for AVX-512 (with BW and VL), AVX2 + FMA and the baseline, the processor choosing at load.
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// `v` as a T holds it (bf16 rounds), so a sum after it rounds as XLA's would after a separate batch norm.
inline float as_stored(const float*, float v) { return v; }
inline float as_stored(const uint16_t*, float v) {
  uint16_t b;
  store(&b, 0, v);
  return load(&b, 0);
}

// The largest value that T stores as 0 or less (bf16: rounding to nearest even takes 2^-134 to 0), and the smallest it
// stores as 6 or more (bf16: the half-way point below 6, 6 - 2^-6, goes to 6, whose last bit is even); comparisons
// against them are those against the stored value, without rounding.
inline float stored_above_zero(const float*) { return 0.f; }
inline float stored_above_zero(const uint16_t*) {
  const uint32_t u = 0x8000u;  // 2^-134, a float subnormal
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float stored_below_six(const float*) { return 6.f; }
inline float stored_below_six(const uint16_t*) { return 6.f - 1.f / 64; }

// The activation RELU names: 0 none, 1 relu, 6 relu6 (min(max(v, 0), 6)). Both commute with rounding to bf16.
template <int RELU>
inline float activate(float v) {
  return RELU == 6 ? std::min(std::max(v, 0.f), 6.f) : RELU ? std::max(v, 0.f) : v;
}
// Whether the activation passes the gradient at output y: a select, as cnn's relu and relu6 take their gradients.
template <int RELU>
inline float passed(float g, float y) {
  return (RELU == 6 ? y > 0.f && y < 6.f : y > 0.f) ? g : 0.f;
}

// y = x * a + b: a and b from the float statistics, the same in both directions, so the backward pass's recomputed
// activation mask is the forward pass's.
inline void affine(const float* scale, const float* shift, const float* mean, const float* var, float epsilon,
                   int64_t k, float* a, float* b) {
  a[k] = float(scale[k] / std::sqrt(double(var[k]) + epsilon));
  b[k] = float(shift[k] - double(mean[k]) * a[k]);
}

constexpr int64_t kBlock = 64;  // rows summed in float before joining the chunk's double totals
constexpr int64_t kChunk = 1024;  // rows per task; the sums are joined chunk by chunk, in order

// Runs body(i) for every chunk i < chunks, on this thread and on XLA's own intra-op threads, which take chunks as they
// come free (OpenMP's teams waited on threads XLA's kept busy: 3x the loops' time in a ResNet-20 step). A helper that
// starts after the last chunk was taken returns without touching `body`'s data.
template <typename F>
void parallel_chunks(ffi::ThreadPool& pool, int64_t chunks, F body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks;
    F* body;
  };
  auto state = std::make_shared<State>();
  state->chunks = chunks;
  state->body = &body;
  auto work = [state] {
    for (int64_t i; (i = state->next.fetch_add(1)) < state->chunks;) {
      (*state->body)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

inline int64_t chunk_count(int64_t rows) { return (rows + kChunk - 1) / kChunk; }

// A chunk's per-channel sums of x and x*x (forward), into out[0, c) and out[c, 2c), in float blocks of kBlock rows.
// (The loops sit in the cloned functions themselves: a lambda inside one would be compiled for the baseline only.)
template <typename T, int C>
CLONES void forward_sums(const T* x, int64_t begin, int64_t end, int64_t c_, double* out) {
  const int64_t c = C ? C : c_;
  std::vector<float> s(c), q(c);
  for (int64_t r0 = begin; r0 < end; r0 += kBlock) {
    std::fill(s.begin(), s.end(), 0.f);
    std::fill(q.begin(), q.end(), 0.f);
    for (int64_t r = r0; r < std::min(end, r0 + kBlock); ++r) {
      const T* row = x + r * c;
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) {
        float v = load(row, k);
        s[k] += v;
        q[k] += v * v;
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      out[k] += s[k];
      out[c + k] += q[k];
    }
  }
}

template <typename T, int C, int RELU, bool ADD>
CLONES void forward_rows(const T* x, const float* a, const float* b, const T* residual, T* y, int64_t begin,
                         int64_t end, int64_t c_) {
  const int64_t c = C ? C : c_;
  for (int64_t r = begin; r < end; ++r) {
    const T* row = x + r * c;
    T* out = y + r * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      float v = load(row, k) * a[k] + b[k];
      if (ADD) v = as_stored(out, v) + load(residual + r * c, k);
      store(out, k, activate<RELU>(v));
    }
  }
}

template <typename T, int C, int RELU, bool ADD>
void forward(ffi::ThreadPool& pool, const T* x, const float* scale, const float* shift, const T* residual, T* y,
             float* mean, float* var, int64_t rows, int64_t c, float epsilon) {
  int64_t chunks = chunk_count(rows);
  std::vector<double> partial(size_t(chunks) * 2 * c, 0.0);
  parallel_chunks(pool, chunks, [&](int64_t i) {
    forward_sums<T, C>(x, i * kChunk, std::min(rows, (i + 1) * kChunk), c, &partial[size_t(i) * 2 * c]);
  });
  std::vector<float> a(c), b(c);
  for (int64_t k = 0; k < c; ++k) {
    double sum = 0, sq = 0;
    for (int64_t i = 0; i < chunks; ++i) {
      sum += partial[size_t(i) * 2 * c + k];
      sq += partial[size_t(i) * 2 * c + c + k];
    }
    double m = sum / rows;
    mean[k] = float(m);
    var[k] = float(std::max(sq / rows - m * m, 0.0));
    affine(scale, shift, mean, var, epsilon, k, a.data(), b.data());
  }
  parallel_chunks(pool, chunks, [&](int64_t i) {
    forward_rows<T, C, RELU, ADD>(x, a.data(), b.data(), residual, y, i * kChunk, std::min(rows, (i + 1) * kChunk),
                                  c);
  });
}

// The gradient at the activation's output passed back through it: the mask from y (with a residual add), else from x
// normalised as the forward pass stored it (a, b: `affine`).
template <typename T, int RELU, bool ADD>
inline float through(float g, const T* xr, const T* yr, const float* a, const float* b, int64_t k) {
  if (!RELU) return g;
  if (ADD) return passed<RELU>(g, load(yr, k));
  float v = load(xr, k) * a[k] + b[k];  // y before it was stored: y > 0 where v > lo, and y < 6 where v < hi
  const float lo = stored_above_zero(xr), hi = stored_below_six(xr);
  return (RELU == 6 ? v > lo && v < hi : v > lo) ? g : 0.f;
}

// A chunk's per-channel sums of the gradient (after the activation's, with RELU) and of its product with x - mean.
template <typename T, int C, int RELU, bool ADD>
CLONES void backward_sums(const T* x, const float* mean, const T* dy, const T* y, const float* a, const float* b,
                          int64_t begin, int64_t end, int64_t c_, double* out) {
  const int64_t c = C ? C : c_;
  std::vector<float> s(c), p(c);
  for (int64_t r0 = begin; r0 < end; r0 += kBlock) {
    std::fill(s.begin(), s.end(), 0.f);
    std::fill(p.begin(), p.end(), 0.f);
    for (int64_t r = r0; r < std::min(end, r0 + kBlock); ++r) {
      const T *xr = x + r * c, *gr = dy + r * c, *yr = y + r * c;
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) {
        float g = through<T, RELU, ADD>(load(gr, k), xr, yr, a, b, k);
        s[k] += g;
        p[k] += g * (load(xr, k) - mean[k]);
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      out[k] += s[k];
      out[c + k] += p[k];
    }
  }
}

// ADD: also the residual's gradient, the relu's (dy where y > 0).
template <typename T, int C, int RELU, bool ADD>
CLONES void backward_rows(const T* x, const float* mean, const T* dy, const T* y, const float* a, const float* b,
                          const float* k1, const float* k2, const float* k0, T* dx, T* d_residual, int64_t begin,
                          int64_t end, int64_t c_) {
  const int64_t c = C ? C : c_;
  for (int64_t r = begin; r < end; ++r) {
    const T *xr = x + r * c, *gr = dy + r * c, *yr = y + r * c;
    T* out = dx + r * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      float g = through<T, RELU, ADD>(load(gr, k), xr, yr, a, b, k);
      if (ADD) store(d_residual + r * c, k, g);
      store(out, k, k1[k] * g + k2[k] * (load(xr, k) - mean[k]) + k0[k]);
    }
  }
}

// One backward pass's buffers: x, its statistics and the parameters; the output's gradient dy (and the output y, read
// with a residual add); the gradients written.
template <typename T>
struct Backward {
  const T *x, *dy, *y;
  const float *mean, *var, *scale, *shift;
  T *dx, *d_residual;
  float *d_scale, *d_shift;
  int64_t rows, c;
  float epsilon;
};

template <typename T, int C, int RELU, bool ADD>
void backward(ffi::ThreadPool& pool, const Backward<T>& p) {
  const int64_t rows = p.rows, c = p.c, chunks = chunk_count(rows);
  std::vector<float> a(c), b(c);
  for (int64_t k = 0; k < c; ++k) affine(p.scale, p.shift, p.mean, p.var, p.epsilon, k, a.data(), b.data());
  std::vector<double> partial(size_t(chunks) * 2 * c, 0.0);
  parallel_chunks(pool, chunks, [&](int64_t i) {
    backward_sums<T, C, RELU, ADD>(p.x, p.mean, p.dy, p.y, a.data(), b.data(), i * kChunk,
                                   std::min(rows, (i + 1) * kChunk), c, &partial[size_t(i) * 2 * c]);
  });
  std::vector<float> k1(c), k2(c), k0(c);
  for (int64_t k = 0; k < c; ++k) {
    double sum = 0, prod = 0;
    for (int64_t i = 0; i < chunks; ++i) {
      sum += partial[size_t(i) * 2 * c + k];
      prod += partial[size_t(i) * 2 * c + c + k];
    }
    double rstd = 1.0 / std::sqrt(double(p.var[k]) + p.epsilon), scale = p.scale[k];
    p.d_shift[k] = float(sum);
    p.d_scale[k] = float(prod * rstd);
    k1[k] = float(scale * rstd);
    k2[k] = float(-scale * rstd * rstd * rstd * prod / rows);
    k0[k] = float(-scale * rstd * sum / rows);
  }
  parallel_chunks(pool, chunks, [&](int64_t i) {
    backward_rows<T, C, RELU, ADD>(p.x, p.mean, p.dy, p.y, a.data(), b.data(), k1.data(), k2.data(), k0.data(), p.dx,
                                   p.d_residual, i * kChunk, std::min(rows, (i + 1) * kChunk), c);
  });
}

// The loops for this channel count (compiled for 16, 32 and 64, else the general ones), activation (relu: 0, 1 or 6,
// as RELU) and residual add (with relu 1).
template <typename T, int C>
void forward_with(ffi::ThreadPool& pool, const T* x, const float* scale, const float* shift, const T* residual, T* y, float* mean,
                  float* var, int64_t rows, int64_t c, float epsilon, int relu, bool add) {
  auto run = [&](auto kernel) { kernel(pool, x, scale, shift, residual, y, mean, var, rows, c, epsilon); };
  if (add) return run(forward<T, C, 1, true>);
  if (relu == 6) return run(forward<T, C, 6, false>);
  return relu ? run(forward<T, C, 1, false>) : run(forward<T, C, 0, false>);
}

template <typename T>
void forward_any(ffi::ThreadPool& pool, const T* x, const float* scale, const float* shift, const T* residual, T* y, float* mean,
                 float* var, int64_t rows, int64_t c, float epsilon, int relu, bool add) {
  switch (c) {
    case 16: return forward_with<T, 16>(pool, x, scale, shift, residual, y, mean, var, rows, c, epsilon, relu, add);
    case 32: return forward_with<T, 32>(pool, x, scale, shift, residual, y, mean, var, rows, c, epsilon, relu, add);
    case 64: return forward_with<T, 64>(pool, x, scale, shift, residual, y, mean, var, rows, c, epsilon, relu, add);
    default: return forward_with<T, 0>(pool, x, scale, shift, residual, y, mean, var, rows, c, epsilon, relu, add);
  }
}

template <typename T, int C>
void backward_with(ffi::ThreadPool& pool, const Backward<T>& p, int relu, bool add) {
  auto run = [&](auto kernel) { kernel(pool, p); };
  if (add) return run(backward<T, C, 1, true>);
  if (relu == 6) return run(backward<T, C, 6, false>);
  return relu ? run(backward<T, C, 1, false>) : run(backward<T, C, 0, false>);
}

template <typename T>
void backward_any(ffi::ThreadPool& pool, const Backward<T>& p, int relu, bool add) {
  switch (p.c) {
    case 16: return backward_with<T, 16>(pool, p, relu, add);
    case 32: return backward_with<T, 32>(pool, p, relu, add);
    case 64: return backward_with<T, 64>(pool, p, relu, add);
    default: return backward_with<T, 0>(pool, p, relu, add);
  }
}

int64_t channels(ffi::AnyBuffer x) { return x.dimensions().size() ? x.dimensions().back() : 0; }

template <typename T>
const T* data(ffi::AnyBuffer b) { return static_cast<const T*>(b.untyped_data()); }
template <typename T>
T* data(ffi::Result<ffi::AnyBuffer>& b) { return static_cast<T*>(b->untyped_data()); }

// relu: 0, 1 (max(y, 0)) or 6 (relu6); add (with relu 1): relu(y + residual), `residual` shaped as x (else unread).
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                       ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                       ffi::Result<ffi::Buffer<ffi::F32>> var, float epsilon, int64_t relu, int64_t add) {
  int64_t c = channels(x), rows = c ? int64_t(x.element_count()) / c : 0;
  if (!rows || y->element_type() != x.element_type() || (relu != 0 && relu != 1 && relu != 6) ||
      (add && (relu != 1 || residual.element_type() != x.element_type() ||
               residual.element_count() != x.element_count()))) {
    return bad_shape("batch norm");
  }
  if (x.element_type() == ffi::DataType::BF16) {
    forward_any(pool, data<uint16_t>(x), scale.typed_data(), shift.typed_data(), data<uint16_t>(residual), data<uint16_t>(y),
                mean->typed_data(), var->typed_data(), rows, c, epsilon, relu, add);
  } else if (x.element_type() == ffi::DataType::F32) {
    forward_any(pool, data<float>(x), scale.typed_data(), shift.typed_data(), data<float>(residual), data<float>(y),
                mean->typed_data(), var->typed_data(), rows, c, epsilon, relu, add);
  } else {
    return bad_shape("batch norm");
  }
  return ffi::Error::Success();
}

// y: the forward output, read with add (the relu's mask; else unread); d_residual, with add, the residual's gradient
// (else unwritten).
ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift, ffi::AnyBuffer dy, ffi::AnyBuffer y,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> d_residual,
                        ffi::Result<ffi::Buffer<ffi::F32>> d_scale, ffi::Result<ffi::Buffer<ffi::F32>> d_shift,
                        float epsilon, int64_t relu, int64_t add) {
  int64_t c = channels(x), rows = c ? int64_t(x.element_count()) / c : 0;
  if (!rows || dy.element_type() != x.element_type() || y.element_type() != x.element_type() ||
      (relu != 0 && relu != 1 && relu != 6) ||
      (add && (relu != 1 || d_residual->element_count() != x.element_count()))) {
    return bad_shape("batch norm");
  }
  auto run = [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    Backward<T> p{data<T>(x), data<T>(dy), data<T>(y), mean.typed_data(), var.typed_data(), scale.typed_data(),
                  shift.typed_data(), data<T>(dx), data<T>(d_residual), d_scale->typed_data(),
                  d_shift->typed_data(), rows, c, epsilon};
    backward_any(pool, p, int(relu), bool(add));
  };
  if (x.element_type() == ffi::DataType::BF16) {
    run(static_cast<uint16_t*>(nullptr));
  } else if (x.element_type() == ffi::DataType::F32) {
    run(static_cast<float*>(nullptr));
  } else {
    return bad_shape("batch norm");
  }
  return ffi::Error::Success();
}

}  // namespace norm

// Max pooling, NHWC, f32 or bf16, forward and backward, an image per task. Backward, each window's output gradient
// goes to the first input (in row-major window order) that equals the window's maximum, as XLA's select-and-scatter
// gives it, summed in float where windows overlap. XLA:CPU's passes (in bf16 a reduce-window forward; backward, a
// reduce-window over value and index pairs, then a scatter) took 14% of ResNet-50's bf16 step for its one pool.
namespace maxpool {

using norm::load;
using norm::store;

struct Window {
  int64_t ih, iw, oh, ow, c, wh, ww, sh, sw, pt, pl;
};

// The window of output (oh, ow) in the input: rows [i0, i1), columns [j0, j1).
struct Span {
  int64_t i0, i1, j0, j1;
};
inline Span window_at(const Window& w, int64_t oh, int64_t ow) {
  return {std::max<int64_t>(0, oh * w.sh - w.pt), std::min(w.ih, oh * w.sh - w.pt + w.wh),
          std::max<int64_t>(0, ow * w.sw - w.pl), std::min(w.iw, ow * w.sw - w.pl + w.ww)};
}

// One image: each window's maximum, NaN if any input is NaN (as XLA's max); `m` has c floats.
template <typename T>
CLONES void image_forward(const T* x, T* y, float* __restrict m, const Window& w) {
  for (int64_t oh = 0; oh < w.oh; ++oh) {
    for (int64_t ow = 0; ow < w.ow; ++ow) {
      Span s = window_at(w, oh, ow);
      std::fill(m, m + w.c, -INFINITY);
      for (int64_t i = s.i0; i < s.i1; ++i) {
        for (int64_t j = s.j0; j < s.j1; ++j) {
          const T* __restrict xr = x + (i * w.iw + j) * w.c;
#pragma omp simd
          for (int64_t k = 0; k < w.c; ++k) {
            float v = load(xr, k);
            m[k] = (v > m[k] || v != v) ? v : m[k];
          }
        }
      }
      T* __restrict yr = y + (oh * w.ow + ow) * w.c;
#pragma omp simd
      for (int64_t k = 0; k < w.c; ++k) store(yr, k, m[k]);
    }
  }
}

// One image: dy (oh, ow, c) summed into acc (ih, iw, c), then stored as dx; `taken` has c flags.
template <typename T>
CLONES void image_backward(const T* x, const T* y, const T* dy, T* dx, float* __restrict acc,
                           float* __restrict taken, const Window& w) {
  std::fill(acc, acc + w.ih * w.iw * w.c, 0.0f);
  for (int64_t oh = 0; oh < w.oh; ++oh) {
    for (int64_t ow = 0; ow < w.ow; ++ow) {
      Span s = window_at(w, oh, ow);
      const T* __restrict yr = y + (oh * w.ow + ow) * w.c;
      const T* __restrict dr = dy + (oh * w.ow + ow) * w.c;
      std::fill(taken, taken + w.c, 0.0f);
      for (int64_t i = s.i0; i < s.i1; ++i) {
        for (int64_t j = s.j0; j < s.j1; ++j) {
          const T* __restrict xr = x + (i * w.iw + j) * w.c;
          float* __restrict ar = acc + (i * w.iw + j) * w.c;
#pragma omp simd
          for (int64_t k = 0; k < w.c; ++k) {
            bool hit = taken[k] == 0.0f && load(xr, k) == load(yr, k);
            ar[k] += hit ? load(dr, k) : 0.0f;
            taken[k] = hit ? 1.0f : taken[k];
          }
        }
      }
    }
  }
#pragma omp simd
  for (int64_t k = 0; k < w.ih * w.iw * w.c; ++k) store(dx, k, acc[k]);
}

template <typename T>
void backward(ffi::ThreadPool& pool, const T* x, const T* y, const T* dy, T* dx, int64_t n, const Window& w) {
  int64_t in_size = w.ih * w.iw * w.c, out_size = w.oh * w.ow * w.c;
  norm::parallel_chunks(pool, n, [&](int64_t b) {
    std::vector<float> acc(in_size), taken(w.c);
    image_backward(x + b * in_size, y + b * out_size, dy + b * out_size, dx + b * in_size, acc.data(), taken.data(),
                   w);
  });
}

template <typename T>
void forward(ffi::ThreadPool& pool, const T* x, T* y, int64_t n, const Window& w) {
  int64_t in_size = w.ih * w.iw * w.c, out_size = w.oh * w.ow * w.c;
  norm::parallel_chunks(pool, n, [&](int64_t b) {
    std::vector<float> m(w.c);
    image_forward(x + b * in_size, y + b * out_size, m.data(), w);
  });
}

bool valid(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> yd, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  return xd.size() == 4 && yd.size() == 4 && xd[0] == yd[0] && xd[3] == yd[3] && wh >= 1 && ww >= 1 && sh >= 1 &&
         sw >= 1;
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t wh, int64_t ww,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (!valid(xd, yd, wh, ww, sh, sw) || y->element_type() != x.element_type()) return bad_shape("max pool");
  Window w{xd[1], xd[2], yd[1], yd[2], xd[3], wh, ww, sh, sw, pt, pl};
  if (x.element_type() == ffi::DataType::BF16) {
    forward(pool, norm::data<uint16_t>(x), norm::data<uint16_t>(y), xd[0], w);
  } else if (x.element_type() == ffi::DataType::F32) {
    forward(pool, norm::data<float>(x), norm::data<float>(y), xd[0], w);
  } else {
    return bad_shape("max pool");
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer y, ffi::AnyBuffer dy,
                        ffi::Result<ffi::AnyBuffer> dx, int64_t wh, int64_t ww, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pl) {
  auto xd = x.dimensions(), yd = y.dimensions();
  if (!valid(xd, yd, wh, ww, sh, sw) || dy.element_count() != y.element_count() ||
      dx->element_count() != x.element_count() || y.element_type() != x.element_type() ||
      dy.element_type() != x.element_type() || dx->element_type() != x.element_type()) {
    return bad_shape("max pool");
  }
  Window w{xd[1], xd[2], yd[1], yd[2], xd[3], wh, ww, sh, sw, pt, pl};
  if (x.element_type() == ffi::DataType::BF16) {
    using T = uint16_t;
    backward(pool, norm::data<T>(x), norm::data<T>(y), norm::data<T>(dy), norm::data<T>(dx), xd[0], w);
  } else if (x.element_type() == ffi::DataType::F32) {
    backward(pool, norm::data<float>(x), norm::data<float>(y), norm::data<float>(dy), norm::data<float>(dx), xd[0], w);
  } else {
    return bad_shape("max pool");
  }
  return ffi::Error::Success();
}

}  // namespace maxpool

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopsNormForward, norm::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("add"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopsNormBackward, norm::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("add"));

#define POOL_ATTRS \
  Attr<int64_t>("wh").Attr<int64_t>("ww").Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt") \
      .Attr<int64_t>("pl")

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopsMaxPoolForward, maxpool::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .POOL_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopsMaxPoolBackward, maxpool::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .POOL_ATTRS);
