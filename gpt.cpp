// gpt.cpp: a small GPT you can read in one sitting. Tokenizer, autograd, a Llama-style transformer,
// training with AdamW, safetensors checkpoints and sampling, in one C++20 file with no dependencies
// beyond the standard library. The math and the file format are fixed in DESIGN.md.
//
// Build and run:   make && ./gpt            (trains on data/names.txt, then samples 20 names)
// Help:            ./gpt --help, ./gpt train --help, ...
//
// Notation (DESIGN.md): B sequences in a batch, T tokens in a window, D model width, L layers,
// H query heads, G key/value heads (G divides H), hd = D / H head size, V vocabulary size,
// F MLP hidden size. Shapes are written outermost first, row-major: x [B*T, D] is B*T rows of D floats.

#include <algorithm>
#include <atomic>
#include <array>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numbers>
#include <numeric>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <unistd.h>  // isatty: the only non-standard call, used to choose a live progress line
#include <utility>
#include <variant>
#include <vector>

// ==== 1. Foundations ====
// One error type, one check, our own random numbers (a seed must give the same model with every compiler,
// DESIGN.md §4), a timer, and a small pool of worker threads. Parallel loops split outer loops only: every
// output element is computed by one thread in one fixed order, so results do not depend on the thread count.

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

void check(const bool condition, const std::string& message) {
    if (!condition) throw Error(message);
}

// splitmix64 turns any seed into well-mixed 64-bit values; we use it to seed xoshiro256**.
uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// xoshiro256** (Blackman and Vigna): fast, small state, good statistical quality.
// normal() uses Box-Muller and keeps the second value of each pair for the next call.
struct Rng {
    std::array<uint64_t, 4> state{};
    bool has_spare = false;
    float spare = 0.0f;

    explicit Rng(uint64_t seed) {
        for (uint64_t& word : state) word = splitmix64(seed);
    }
    uint64_t next_u64() {
        const auto rotl = [](uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
        const uint64_t result = rotl(state[1] * 5, 7) * 9;
        const uint64_t t = state[1] << 17;
        state[2] ^= state[0];
        state[3] ^= state[1];
        state[1] ^= state[2];
        state[0] ^= state[3];
        state[2] ^= t;
        state[3] = rotl(state[3], 45);
        return result;
    }
    // Uniform in [0, 1): the top 24 bits, exactly representable as a float.
    float uniform() { return static_cast<float>(next_u64() >> 40) * 0x1.0p-24f; }
    double uniform_double() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
    // Uniform integer in [0, n) by rejection, so that no value is favoured.
    uint64_t below(const uint64_t n) {
        const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % n;
        uint64_t x = next_u64();
        while (x >= limit) x = next_u64();
        return x % n;
    }
    float normal() {
        if (has_spare) {
            has_spare = false;
            return spare;
        }
        const double u1 = 1.0 - uniform_double();  // in (0, 1], so log(u1) is finite
        const double u2 = uniform_double();
        const double radius = std::sqrt(-2.0 * std::log(u1));
        const double angle = 2.0 * std::numbers::pi * u2;
        spare = static_cast<float>(radius * std::sin(angle));
        has_spare = true;
        return static_cast<float>(radius * std::cos(angle));
    }
};

struct Timer {
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    double seconds() const {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
};

// A fixed pool of worker threads. parallel_for(count, body) runs body(0..count-1), each index exactly once,
// on the pool and the calling thread; it returns when all are done. Loops inside a task run serially.
struct WorkerPool {
    std::vector<std::jthread> threads;
    std::mutex mutex;
    std::condition_variable wake, finished;
    const std::function<void(int)>* task = nullptr;
    int task_count = 0;
    std::atomic<int> next_task{0}, tasks_done{0};
    int busy_workers = 0;
    uint64_t generation = 0;
    bool stopping = false;

    void run_tasks() {
        for (int i = next_task.fetch_add(1); i < task_count; i = next_task.fetch_add(1)) {
            (*task)(i);
            tasks_done.fetch_add(1);
        }
    }
    void worker_loop() {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock lock(mutex);
                wake.wait(lock, [&] { return stopping || generation != seen; });
                if (stopping) return;
                seen = generation;
                ++busy_workers;
            }
            run_tasks();
            std::lock_guard lock(mutex);
            --busy_workers;
            finished.notify_all();
        }
    }
    ~WorkerPool() {
        {
            std::lock_guard lock(mutex);
            stopping = true;
        }
        wake.notify_all();
    }
};

std::unique_ptr<WorkerPool> worker_pool;
int thread_count = 1;
thread_local bool inside_parallel_task = false;

void set_thread_count(const int n) {
    check(n >= 1, "thread count must be at least 1, got " + std::to_string(n));
    worker_pool.reset();
    thread_count = n;
    if (n == 1) return;
    worker_pool = std::make_unique<WorkerPool>();
    for (int i = 0; i + 1 < n; ++i) worker_pool->threads.emplace_back([pool = worker_pool.get()] { pool->worker_loop(); });
}

// Loops whose total work is below parallel_min_flops run inline: waking the pool costs more than they do.
constexpr double parallel_min_flops = 65536.0;

void parallel_for(const int count, const double total_flops, const std::function<void(int)>& body) {
    if (!worker_pool || count <= 1 || inside_parallel_task || total_flops < parallel_min_flops) {
        for (int i = 0; i < count; ++i) body(i);
        return;
    }
    WorkerPool& pool = *worker_pool;
    const std::function<void(int)> task = [&body](int i) {
        inside_parallel_task = true;
        body(i);
        inside_parallel_task = false;
    };
    {
        std::unique_lock lock(pool.mutex);
        pool.finished.wait(lock, [&] { return pool.busy_workers == 0; });
        pool.task = &task;
        pool.task_count = count;
        pool.next_task = 0;
        pool.tasks_done = 0;
        ++pool.generation;
    }
    pool.wake.notify_all();
    pool.run_tasks();
    std::unique_lock lock(pool.mutex);
    pool.finished.wait(lock, [&] { return pool.tasks_done.load() == count && pool.busy_workers == 0; });
}

// Splits rows 0..n-1 into about 4 chunks per thread (enough to balance, few enough to keep overhead low)
// and calls body(begin, end) for each chunk.
void parallel_rows(const int n, const double flops_per_row, const std::function<void(int, int)>& body) {
    const int chunks = std::max(1, std::min(n, 4 * thread_count));
    parallel_for(chunks, n * flops_per_row, [&](int c) {
        body(static_cast<int>(int64_t(n) * c / chunks), static_cast<int>(int64_t(n) * (c + 1) / chunks));
    });
}

// ==== 2. Configuration ====
// What a model is (saved in every checkpoint) and how a run trains and samples. Defaults are the names model.

struct ModelConfig {
    int vocab_size = 0;     // V, including EOT
    int dim = 64;           // D
    int n_layers = 4;       // L
    int n_heads = 4;        // H
    int n_kv_heads = 4;     // G
    int ffn_dim = 256;      // F
    int context = 32;       // T, the longest window the model is trained on
    bool tie_embeddings = false;
    float rope_theta = 10000.0f;
    float norm_eps = 1e-5f;

    int head_dim() const { return dim / n_heads; }
};

void validate_model_config(const ModelConfig& c) {
    check(c.vocab_size >= 2, "vocab size must be at least 2, got " + std::to_string(c.vocab_size));
    check(c.dim >= 1, "--dim must be positive, got " + std::to_string(c.dim));
    check(c.n_layers >= 1, "--layers must be positive, got " + std::to_string(c.n_layers));
    check(c.n_heads >= 1, "--heads must be positive, got " + std::to_string(c.n_heads));
    check(c.n_kv_heads >= 1, "--kv-heads must be positive, got " + std::to_string(c.n_kv_heads));
    check(c.ffn_dim >= 1, "--ffn must be positive, got " + std::to_string(c.ffn_dim));
    check(c.context >= 1, "--ctx must be positive, got " + std::to_string(c.context));
    check(c.dim % c.n_heads == 0, "--dim " + std::to_string(c.dim) + " is not divisible by --heads " + std::to_string(c.n_heads));
    check(c.n_heads % c.n_kv_heads == 0,
          "--heads " + std::to_string(c.n_heads) + " is not divisible by --kv-heads " + std::to_string(c.n_kv_heads));
    check(c.head_dim() % 2 == 0, "head size " + std::to_string(c.head_dim()) + " is odd; RoPE rotates pairs, so D / H must be even");
    check(c.rope_theta > 0 && c.norm_eps > 0, "rope_theta and rms_norm_eps must be positive");
}

struct TrainConfig {
    std::string data_path = "data/names.txt";
    std::string out_path = "out/names.safetensors";
    std::string resume_path;  // empty: start from scratch
    int steps = 3000;         // length of the learning-rate schedule
    int stop_after = 0;       // 0: run to the end; otherwise stop after this many steps of this run
    int batch = 32;           // B
    float lr = 3e-3f;
    int warmup = 100;
    uint64_t seed = 1337;
    int eval_every = 250;
};

struct SampleConfig {
    int count = 20;           // documents to sample
    std::string prompt;
    float temperature = 1.0f; // 0 = greedy
    int top_k = 0;            // 0 = keep all
    float top_p = 1.0f;       // 1 = keep all
    uint64_t seed = 1337;
    int max_tokens = 0;       // 0 = until EOT or the context is full
};

// ==== 3. Data: documents and the train/validation split ====
// A data file holds one document per line (DESIGN.md §1): split on '\n', drop a trailing '\r', skip empty
// lines. Document i (counting non-empty lines from 0) is validation when i % 10 == 9, training otherwise.

std::vector<std::string> read_documents(const std::string& path) {
    check(std::filesystem::is_regular_file(path), "data file '" + path + "' does not exist or is not a file");
    std::ifstream file(path, std::ios::binary);
    check(file.good(), "data file '" + path + "' cannot be read");
    std::vector<std::string> documents;
    for (std::string line; std::getline(file, line);) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (!line.empty()) documents.push_back(std::move(line));
    }
    check(!file.bad(), "data file '" + path + "': read error");
    check(!documents.empty(), "data file '" + path + "' has no documents (it is empty or only has empty lines)");
    return documents;
}

bool is_validation_document(const size_t index) { return index % 10 == 9; }

struct DocumentSplit {
    std::vector<std::string> train, validation;
};

DocumentSplit split_documents(const std::vector<std::string>& documents) {
    DocumentSplit split;
    for (size_t i = 0; i < documents.size(); ++i)
        (is_validation_document(i) ? split.validation : split.train).push_back(documents[i]);
    return split;
}

// ==== 4. Tokenizer: characters ====
// The char tokenizer (DESIGN.md §2): the vocabulary is the sorted set of Unicode code points in the whole
// data file, ids 0..n-1, and EOT = n. Text is UTF-8; invalid UTF-8 is an error, not a guess.

std::vector<char32_t> utf8_decode(const std::string_view text) {
    std::vector<char32_t> code_points;
    for (size_t i = 0; i < text.size();) {
        const auto byte = [&](size_t j) { return static_cast<unsigned char>(text[j]); };
        const unsigned char lead = byte(i);
        const int length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 0;
        check(length > 0 && i + length <= text.size(), "invalid UTF-8 at byte " + std::to_string(i));
        char32_t c = length == 1 ? lead : lead & (0x7F >> length);
        for (int j = 1; j < length; ++j) {
            check((byte(i + j) & 0xC0) == 0x80, "invalid UTF-8 at byte " + std::to_string(i + j));
            c = (c << 6) | (byte(i + j) & 0x3F);
        }
        constexpr char32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
        check(c >= smallest[length] && c <= 0x10FFFF && !(c >= 0xD800 && c <= 0xDFFF),
              "invalid UTF-8 (overlong or out of range) at byte " + std::to_string(i));
        code_points.push_back(c);
        i += length;
    }
    return code_points;
}

std::string utf8_encode(const char32_t c) {
    std::string out;
    if (c < 0x80) {
        out += static_cast<char>(c);
    } else if (c < 0x800) {
        out += static_cast<char>(0xC0 | (c >> 6));
        out += static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        out += static_cast<char>(0xE0 | (c >> 12));
        out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (c & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (c >> 18));
        out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (c & 0x3F));
    }
    return out;
}

std::string describe_code_point(const char32_t c) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "U+%04X", static_cast<unsigned>(c));
    return (c >= 0x20 && c != 0x7F ? "'" + utf8_encode(c) + "' " : std::string()) + "(" + hex + ")";
}

struct Tokenizer {
    std::vector<char32_t> chars;        // id -> code point, sorted
    std::map<char32_t, int> ids;        // code point -> id

    int eot() const { return static_cast<int>(chars.size()); }
    int vocab_size() const { return eot() + 1; }
};

Tokenizer make_char_tokenizer(std::vector<char32_t> chars) {
    std::sort(chars.begin(), chars.end());
    chars.erase(std::unique(chars.begin(), chars.end()), chars.end());
    Tokenizer tokenizer;
    tokenizer.chars = std::move(chars);
    for (int id = 0; id < tokenizer.eot(); ++id) tokenizer.ids[tokenizer.chars[id]] = id;
    return tokenizer;
}

Tokenizer build_char_tokenizer(const std::vector<std::string>& documents) {
    std::set<char32_t> seen;
    for (const std::string& document : documents)
        for (const char32_t c : utf8_decode(document)) seen.insert(c);
    return make_char_tokenizer({seen.begin(), seen.end()});
}

std::vector<int> encode(const Tokenizer& tokenizer, const std::string_view text) {
    std::vector<int> tokens;
    for (const char32_t c : utf8_decode(text)) {
        const auto found = tokenizer.ids.find(c);
        check(found != tokenizer.ids.end(), "character " + describe_code_point(c) + " is not in the tokenizer's vocabulary");
        tokens.push_back(found->second);
    }
    return tokens;
}

// EOT decodes to nothing: it is a boundary, not text.
std::string decode(const Tokenizer& tokenizer, const std::span<const int> tokens) {
    std::string text;
    for (const int token : tokens) {
        check(token >= 0 && token <= tokenizer.eot(), "token id " + std::to_string(token) + " is out of range");
        if (token != tokenizer.eot()) text += utf8_encode(tokenizer.chars[token]);
    }
    return text;
}

// ==== 5. Token streams and batches ====
// stream = [EOT] + tokens(doc_0) + [EOT] + tokens(doc_1) + [EOT] + ...   (DESIGN.md §1)
// Training draws B random windows of T+1 tokens: inputs are the first T, targets the last T.

std::vector<int> make_stream(const Tokenizer& tokenizer, const std::vector<std::string>& documents) {
    std::vector<int> stream{tokenizer.eot()};
    for (const std::string& document : documents) {
        const std::vector<int> tokens = encode(tokenizer, document);
        stream.insert(stream.end(), tokens.begin(), tokens.end());
        stream.push_back(tokenizer.eot());
    }
    return stream;
}

struct Batch {
    std::vector<int> inputs;   // [B, T]
    std::vector<int> targets;  // [B, T]
};

// Window starts are uniform over every start that leaves room for T+1 tokens.
void sample_batch(Batch& batch, const std::vector<int>& stream, const int B, const int T, Rng& rng) {
    check(stream.size() >= size_t(T) + 1, "the training stream has " + std::to_string(stream.size()) +
                                               " tokens, fewer than one window of T+1 = " + std::to_string(T + 1));
    batch.inputs.resize(size_t(B) * T);
    batch.targets.resize(size_t(B) * T);
    for (int b = 0; b < B; ++b) {
        const size_t start = rng.below(stream.size() - T);
        std::copy_n(stream.begin() + start, T, batch.inputs.begin() + size_t(b) * T);
        std::copy_n(stream.begin() + start + 1, T, batch.targets.begin() + size_t(b) * T);
    }
}

// ==== 6. Tensors and autograd ====
// A Tensor owns its values and, when gradients are needed, a same-sized gradient buffer. The Tape records,
// for every op of the forward pass, a closure that runs that op's backward; backward() replays them in
// reverse order (reverse-mode automatic differentiation). Gradients accumulate with +=, so a tensor used
// twice (the tied embedding, the residual stream) receives the sum of both contributions.

struct Tensor {
    std::vector<int> shape;
    std::vector<float> data;
    std::vector<float> grad;  // empty when no gradient is kept

    size_t numel() const { return data.size(); }
};

size_t shape_numel(const std::vector<int>& shape) {
    size_t n = 1;
    for (const int d : shape) n *= static_cast<size_t>(d);
    return n;
}

Tensor make_tensor(std::vector<int> shape, const bool with_grad) {
    Tensor t;
    t.data.assign(shape_numel(shape), 0.0f);
    if (with_grad) t.grad.assign(t.data.size(), 0.0f);
    t.shape = std::move(shape);
    return t;
}

struct Tape {
    bool record = true;                              // false for evaluation and sampling: no gradients kept
    std::deque<Tensor> values;                       // activations; a deque keeps their addresses stable
    std::vector<std::function<void()>> backward_steps;

    Tensor& make(std::vector<int> shape) { return values.emplace_back(make_tensor(std::move(shape), record)); }
    void on_backward(std::function<void()> step) {
        if (record) backward_steps.push_back(std::move(step));
    }
    void clear() {
        values.clear();
        backward_steps.clear();
    }
};

// Seeds d loss / d loss = 1 and runs the recorded backward steps, last op first.
void backward(Tape& tape, Tensor& loss) {
    check(loss.numel() == 1 && loss.grad.size() == 1, "backward needs a scalar loss recorded on the tape");
    loss.grad[0] = 1.0f;
    for (auto step = tape.backward_steps.rbegin(); step != tape.backward_steps.rend(); ++step) (*step)();
}

// ==== 7. Core ops ====
// Each op is a forward function and its backward function side by side, working on plain spans (outputs
// first, then inputs, weights and sizes), followed by the small tape wrapper that the model calls.
// Rows are the B*T token positions, written N.

// ---- Matrix multiplication ----
// gemm: C[n, m] (+)= A[n, p] @ B[p, m], where A(i, k) = a[i*a_row + k*a_col] and B(k, j) = b[k*b_row + j*b_col],
// so one routine serves x @ W^T, dout @ W and dout^T @ x without transposing anything in memory.
// How it is fast: C is cut into micro-tiles of gemm_tile_rows x gemm_tile_cols kept in registers; a
// column panel of B is first packed into a contiguous [p, gemm_tile_cols] buffer (zero-padded at the edge),
// so the inner loop is a broadcast of one A value times a contiguous row of the panel: a vector FMA the
// compiler emits. Tasks are (column panel, block of rows) pairs. Each C element is summed over k in
// increasing order by one thread, so results do not depend on the thread count.
constexpr int gemm_tile_rows = 4;
constexpr int gemm_tile_cols = 32;
constexpr int gemm_block_rows = 64;

template <int R>
void gemm_micro_tile(float* c, const size_t c_row, const int cols, const float* a, const size_t a_row,
                     const size_t a_col, const float* panel, const int p, const bool accumulate) {
    float acc[R][gemm_tile_cols] = {};
    for (int k = 0; k < p; ++k) {
        const float* b = panel + size_t(k) * gemm_tile_cols;
        for (int r = 0; r < R; ++r) {
            const float a_rk = a[r * a_row + k * a_col];
            for (int j = 0; j < gemm_tile_cols; ++j) acc[r][j] += a_rk * b[j];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < cols; ++j) c[r * c_row + j] = accumulate ? c[r * c_row + j] + acc[r][j] : acc[r][j];
}

void gemm(float* c, const float* a, const size_t a_row, const size_t a_col, const float* b, const size_t b_row,
          const size_t b_col, const int n, const int p, const int m, const bool accumulate) {
    const int col_panels = (m + gemm_tile_cols - 1) / gemm_tile_cols;
    const int row_blocks = (n + gemm_block_rows - 1) / gemm_block_rows;
    parallel_for(col_panels * row_blocks, 2.0 * n * p * m, [&](const int task) {
        const int j0 = (task % col_panels) * gemm_tile_cols;
        const int i0 = (task / col_panels) * gemm_block_rows;
        const int cols = std::min(gemm_tile_cols, m - j0);
        const int i_end = std::min(n, i0 + gemm_block_rows);
        thread_local std::vector<float> panel;
        panel.resize(size_t(p) * gemm_tile_cols);
        for (int k = 0; k < p; ++k)
            for (int j = 0; j < gemm_tile_cols; ++j)
                panel[size_t(k) * gemm_tile_cols + j] = j < cols ? b[k * b_row + (j0 + j) * b_col] : 0.0f;
        int i = i0;
        for (; i + gemm_tile_rows <= i_end; i += gemm_tile_rows)
            gemm_micro_tile<gemm_tile_rows>(c + size_t(i) * m + j0, m, cols, a + i * a_row, a_row, a_col, panel.data(), p, accumulate);
        for (; i < i_end; ++i)
            gemm_micro_tile<1>(c + size_t(i) * m + j0, m, cols, a + i * a_row, a_row, a_col, panel.data(), p, accumulate);
    });
}

// Linear layer: out = x @ w^T   (w is [out, in], as in PyTorch and the checkpoint)
// x: [N, K], w: [M, K] -> out: [N, M]
void matmul_forward(std::span<float> out, std::span<const float> x, std::span<const float> w, const int N, const int K, const int M) {
    gemm(out.data(), x.data(), K, 1, w.data(), 1, K, N, K, M, false);
}
// dx += dout @ w,  dw += dout^T @ x
void matmul_backward(std::span<float> dx, std::span<float> dw, std::span<const float> dout, std::span<const float> x,
                     std::span<const float> w, const int N, const int K, const int M) {
    if (!dx.empty()) gemm(dx.data(), dout.data(), M, 1, w.data(), K, 1, N, M, K, true);
    if (!dw.empty()) gemm(dw.data(), dout.data(), 1, M, x.data(), K, 1, M, N, K, true);
}

Tensor& matmul(Tape& tape, Tensor& x, Tensor& w) {
    const int N = x.shape[0], K = x.shape[1], M = w.shape[0];
    check(w.shape[1] == K, "matmul: inner sizes differ");
    Tensor& out = tape.make({N, M});
    matmul_forward(out.data, x.data, w.data, N, K, M);
    tape.on_backward([&out, &x, &w, N, K, M] { matmul_backward(x.grad, w.grad, out.grad, x.data, w.data, N, K, M); });
    return out;
}

// ---- Residual add ----
// out = a + b;  da += dout, db += dout
void add_forward(std::span<float> out, std::span<const float> a, std::span<const float> b) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = a[i] + b[i];
}
void add_backward(std::span<float> da, std::span<float> db, std::span<const float> dout) {
    for (size_t i = 0; i < dout.size(); ++i) {
        da[i] += dout[i];
        db[i] += dout[i];
    }
}

Tensor& add(Tape& tape, Tensor& a, Tensor& b) {
    Tensor& out = tape.make(a.shape);
    add_forward(out.data, a.data, b.data);
    tape.on_backward([&out, &a, &b] { add_backward(a.grad, b.grad, out.grad); });
    return out;
}

// ---- Elementwise multiply ----
// out = a * b;  da += dout * b, db += dout * a
void mul_forward(std::span<float> out, std::span<const float> a, std::span<const float> b) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = a[i] * b[i];
}
void mul_backward(std::span<float> da, std::span<float> db, std::span<const float> dout, std::span<const float> a,
                  std::span<const float> b) {
    for (size_t i = 0; i < dout.size(); ++i) {
        da[i] += dout[i] * b[i];
        db[i] += dout[i] * a[i];
    }
}

Tensor& mul(Tape& tape, Tensor& a, Tensor& b) {
    Tensor& out = tape.make(a.shape);
    mul_forward(out.data, a.data, b.data);
    tape.on_backward([&out, &a, &b] { mul_backward(a.grad, b.grad, out.grad, a.data, b.data); });
    return out;
}

// ---- SiLU ----
// silu(z) = z * sigmoid(z);  silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
float sigmoid(const float z) { return 1.0f / (1.0f + std::exp(-z)); }

void silu_forward(std::span<float> out, std::span<const float> x) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = x[i] * sigmoid(x[i]);
}
void silu_backward(std::span<float> dx, std::span<const float> dout, std::span<const float> x) {
    for (size_t i = 0; i < dout.size(); ++i) {
        const float s = sigmoid(x[i]);
        dx[i] += dout[i] * s * (1.0f + x[i] * (1.0f - s));
    }
}

Tensor& silu(Tape& tape, Tensor& x) {
    Tensor& out = tape.make(x.shape);
    silu_forward(out.data, x.data);
    tape.on_backward([&out, &x] { silu_backward(x.grad, out.grad, x.data); });
    return out;
}

// ---- Embedding ----
// out[n] = table[token[n]]: a row gather.  dtable[token[n]] += dout[n], rows in order (a token may repeat).
// table: [V, D], tokens: [N] -> out: [N, D]
void embedding_forward(std::span<float> out, std::span<const float> table, std::span<const int> tokens, const int D) {
    for (size_t n = 0; n < tokens.size(); ++n)
        std::copy_n(table.begin() + size_t(tokens[n]) * D, D, out.begin() + n * D);
}
void embedding_backward(std::span<float> dtable, std::span<const float> dout, std::span<const int> tokens, const int D) {
    for (size_t n = 0; n < tokens.size(); ++n)
        for (int i = 0; i < D; ++i) dtable[size_t(tokens[n]) * D + i] += dout[n * D + i];
}

Tensor& embedding(Tape& tape, Tensor& table, std::span<const int> tokens) {
    const int V = table.shape[0], D = table.shape[1];
    for (const int token : tokens) check(token >= 0 && token < V, "token id " + std::to_string(token) + " is outside the vocabulary");
    Tensor& out = tape.make({static_cast<int>(tokens.size()), D});
    embedding_forward(out.data, table.data, tokens, D);
    tape.on_backward([&out, &table, tokens, D] { embedding_backward(table.grad, out.grad, tokens, D); });
    return out;
}

// ---- RMSNorm (DESIGN.md §3) ----
// y = x * r * w with r = 1 / sqrt(mean(x^2) + eps), per row.  x: [N, D], w: [D] -> y: [N, D]; saves r: [N].
// Backward: dx_i = r * w_i * dy_i - x_i * r^3 / D * sum_j (dy_j * w_j * x_j);  dw_i += sum_n dy_i * x_i * r.
void rms_norm_forward(std::span<float> out, std::span<float> inv_rms, std::span<const float> x, std::span<const float> w,
                      const int N, const int D, const float eps) {
    parallel_rows(N, 4.0 * D, [&](int begin, int end) {
        for (int n = begin; n < end; ++n) {
            const float* row = &x[size_t(n) * D];
            float sum_squares = 0.0f;
            for (int i = 0; i < D; ++i) sum_squares += row[i] * row[i];
            const float r = 1.0f / std::sqrt(sum_squares / D + eps);
            inv_rms[n] = r;
            for (int i = 0; i < D; ++i) out[size_t(n) * D + i] = row[i] * r * w[i];
        }
    });
}
void rms_norm_backward(std::span<float> dx, std::span<float> dw, std::span<const float> dout, std::span<const float> x,
                       std::span<const float> w, std::span<const float> inv_rms, const int N, const int D) {
    parallel_rows(N, 8.0 * D, [&](int begin, int end) {
        for (int n = begin; n < end; ++n) {
            const float* row = &x[size_t(n) * D];
            const float* drow = &dout[size_t(n) * D];
            const float r = inv_rms[n];
            float dot = 0.0f;
            for (int i = 0; i < D; ++i) dot += drow[i] * w[i] * row[i];
            const float coefficient = r * r * r * dot / D;
            for (int i = 0; i < D; ++i) dx[size_t(n) * D + i] += r * w[i] * drow[i] - row[i] * coefficient;
        }
    });
    for (int n = 0; n < N; ++n)
        for (int i = 0; i < D; ++i) dw[i] += dout[size_t(n) * D + i] * x[size_t(n) * D + i] * inv_rms[n];
}

Tensor& rms_norm(Tape& tape, Tensor& x, Tensor& w, const float eps) {
    const int N = x.shape[0], D = x.shape[1];
    Tensor& out = tape.make({N, D});
    Tensor& inv_rms = tape.make({N});
    rms_norm_forward(out.data, inv_rms.data, x.data, w.data, N, D, eps);
    tape.on_backward([&out, &inv_rms, &x, &w, N, D] {
        rms_norm_backward(x.grad, w.grad, out.grad, x.data, w.data, inv_rms.data, N, D);
    });
    return out;
}

// ---- Cross-entropy ----
// loss = mean_n ( logsumexp(logits[n]) - logits[n][target[n]] );  logits: [N, V], targets: [N] -> loss: [1].
// Saves lse: [N]. Backward: dlogits[n][v] += dloss * (softmax(logits[n])[v] - [v == target[n]]) / N.
float cross_entropy_forward(std::span<float> lse, std::span<const float> logits, std::span<const int> targets, const int N, const int V) {
    parallel_rows(N, 4.0 * V, [&](int begin, int end) {
        for (int n = begin; n < end; ++n) {
            const float* row = &logits[size_t(n) * V];
            const float max = *std::max_element(row, row + V);
            double sum = 0.0;
            for (int v = 0; v < V; ++v) sum += std::exp(double(row[v]) - max);
            lse[n] = max + static_cast<float>(std::log(sum));
        }
    });
    double total = 0.0;
    for (int n = 0; n < N; ++n) total += double(lse[n]) - logits[size_t(n) * V + targets[n]];
    return static_cast<float>(total / N);
}
void cross_entropy_backward(std::span<float> dlogits, const float dloss, std::span<const float> logits,
                            std::span<const float> lse, std::span<const int> targets, const int N, const int V) {
    parallel_rows(N, 4.0 * V, [&](int begin, int end) {
        for (int n = begin; n < end; ++n)
            for (int v = 0; v < V; ++v) {
                const float p = std::exp(logits[size_t(n) * V + v] - lse[n]);
                dlogits[size_t(n) * V + v] += dloss * (p - (v == targets[n] ? 1.0f : 0.0f)) / N;
            }
    });
}

Tensor& cross_entropy(Tape& tape, Tensor& logits, std::span<const int> targets) {
    const int N = logits.shape[0], V = logits.shape[1];
    check(targets.size() == size_t(N), "cross_entropy: one target per row is needed");
    for (const int t : targets) check(t >= 0 && t < V, "target id " + std::to_string(t) + " is outside the vocabulary");
    Tensor& loss = tape.make({1});
    Tensor& lse = tape.make({N});
    loss.data[0] = cross_entropy_forward(lse.data, logits.data, targets, N, V);
    tape.on_backward([&loss, &lse, &logits, targets, N, V] {
        cross_entropy_backward(logits.grad, loss.grad[0], logits.data, lse.data, targets, N, V);
    });
    return loss;
}

// Softmax of each row, max subtracted first so large logits cannot overflow.  x, out: [rows, cols]
void softmax_rows(std::span<float> out, std::span<const float> x, const int rows, const int cols) {
    for (int r = 0; r < rows; ++r) {
        const float* row = &x[size_t(r) * cols];
        const float max = *std::max_element(row, row + cols);
        double sum = 0.0;
        for (int c = 0; c < cols; ++c) sum += std::exp(double(row[c]) - max);
        for (int c = 0; c < cols; ++c) out[size_t(r) * cols + c] = static_cast<float>(std::exp(double(row[c]) - max) / sum);
    }
}

// ==== 8. Attention ====
// Heads are split out of the rows ([B*T, n*hd] -> [B, n, T, hd], "head-major", the layout of the KV cache
// and of the GPU kernels), rotated by RoPE, attended causally with grouped KV heads, and merged back.

// ---- Splitting and merging heads ----
// split: out[b, h, t, :] = x[b*T + t, h*hd : (h+1)*hd];  merge is its inverse. Each one's backward is the other.
void heads_split_forward(std::span<float> out, std::span<const float> x, const int B, const int T, const int n_heads, const int hd) {
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < n_heads; ++h)
            for (int t = 0; t < T; ++t)
                std::copy_n(&x[(size_t(b) * T + t) * n_heads * hd + size_t(h) * hd], hd, &out[((size_t(b) * n_heads + h) * T + t) * hd]);
}
void heads_merge_forward(std::span<float> out, std::span<const float> x, const int B, const int T, const int n_heads, const int hd) {
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < n_heads; ++h)
            for (int t = 0; t < T; ++t)
                std::copy_n(&x[((size_t(b) * n_heads + h) * T + t) * hd], hd, &out[(size_t(b) * T + t) * n_heads * hd + size_t(h) * hd]);
}

Tensor& heads_split(Tape& tape, Tensor& x, const int B, const int T, const int n_heads) {
    const int hd = x.shape[1] / n_heads;
    Tensor& out = tape.make({B, n_heads, T, hd});
    heads_split_forward(out.data, x.data, B, T, n_heads, hd);
    tape.on_backward([&out, &x, B, T, n_heads, hd] {
        std::vector<float> dx(x.numel());
        heads_merge_forward(dx, out.grad, B, T, n_heads, hd);
        add_forward(x.grad, x.grad, dx);
    });
    return out;
}
Tensor& heads_merge(Tape& tape, Tensor& x) {
    const int B = x.shape[0], n_heads = x.shape[1], T = x.shape[2], hd = x.shape[3];
    Tensor& out = tape.make({B * T, n_heads * hd});
    heads_merge_forward(out.data, x.data, B, T, n_heads, hd);
    tape.on_backward([&out, &x, B, T, n_heads, hd] {
        std::vector<float> dx(x.numel());
        heads_split_forward(dx, out.grad, B, T, n_heads, hd);
        add_forward(x.grad, x.grad, dx);
    });
    return out;
}

// ---- RoPE, rotate-half layout (DESIGN.md §3) ----
// In each head vector, element i pairs with i + hd/2. With a = pos * theta^(-2i/hd):
//   x'_i = x_i cos a - x_{i+hd/2} sin a,   x'_{i+hd/2} = x_{i+hd/2} cos a + x_i sin a.
// x: [S, T, hd] (S = B * heads), the token at t has position pos0 + t. Backward rotates by -a.
void rope_rotate(std::span<float> out, std::span<const float> x, const int S, const int T, const int hd, const int pos0,
                 const float theta, const float direction) {
    const int half = hd / 2;
    std::vector<float> cos_table(size_t(T) * half), sin_table(size_t(T) * half);
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < half; ++i) {
            const double angle = double(pos0 + t) * std::pow(double(theta), -2.0 * i / hd);
            cos_table[size_t(t) * half + i] = static_cast<float>(std::cos(angle));
            sin_table[size_t(t) * half + i] = static_cast<float>(direction * std::sin(angle));
        }
    for (int s = 0; s < S; ++s)
        for (int t = 0; t < T; ++t) {
            const float* in = &x[(size_t(s) * T + t) * hd];
            float* o = &out[(size_t(s) * T + t) * hd];
            for (int i = 0; i < half; ++i) {
                const float c = cos_table[size_t(t) * half + i], sn = sin_table[size_t(t) * half + i];
                const float first = in[i], second = in[i + half];
                o[i] = first * c - second * sn;
                o[i + half] = second * c + first * sn;
            }
        }
}
void rope_forward(std::span<float> out, std::span<const float> x, const int S, const int T, const int hd, const int pos0, const float theta) {
    rope_rotate(out, x, S, T, hd, pos0, theta, 1.0f);
}
void rope_backward(std::span<float> dx, std::span<const float> dout, const int S, const int T, const int hd, const int pos0, const float theta) {
    std::vector<float> rotated(dout.size());
    rope_rotate(rotated, dout, S, T, hd, pos0, theta, -1.0f);
    add_forward(dx, dx, rotated);
}

Tensor& rope(Tape& tape, Tensor& x, const int pos0, const float theta) {
    const int S = x.shape[0] * x.shape[1], T = x.shape[2], hd = x.shape[3];
    Tensor& out = tape.make(x.shape);
    rope_forward(out.data, x.data, S, T, hd, pos0, theta);
    tape.on_backward([&out, &x, S, T, hd, pos0, theta] { rope_backward(x.grad, out.grad, S, T, hd, pos0, theta); });
    return out;
}

// ---- Causal grouped-query attention (DESIGN.md §3, §7) ----
// One sequence: q [H, Nq, hd]; k, v [G, Nk, hd] -> out [H, Nq, hd], lse [H, Nq]. Query head h reads KV head
// h / (H/G). s_ij = q_i . k_j / sqrt(hd); causal rows see keys j <= i + Nk - Nq (the ends aligned, so a
// prompt of Nq new tokens after Nk - Nq cached ones sees everything before it); p = softmax(s); o_i = sum_j p_ij v_j.
// lse_i = log sum_j e^{s_ij} is saved instead of p: backward recomputes p_ij = e^{s_ij - lse_i}, as flash
// attention does. A row that sees no key gives o = 0 and lse = -inf.
int attention_last_key(const int i, const int Nq, const int Nk, const bool causal) {
    return causal ? std::min(Nk - 1, i + Nk - Nq) : Nk - 1;
}

void attention_forward(std::span<float> out, std::span<float> lse, std::span<const float> q, std::span<const float> k,
                       std::span<const float> v, const int H, const int G, const int Nq, const int Nk, const int hd, const bool causal) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    parallel_for(H, 4.0 * Nq * Nk * hd, [&](const int h) {
        const int g = h / (H / G);
        std::vector<float> scores(Nk);
        for (int i = 0; i < Nq; ++i) {
            const float* qi = &q[(size_t(h) * Nq + i) * hd];
            float* oi = &out[(size_t(h) * Nq + i) * hd];
            const int last = attention_last_key(i, Nq, Nk, causal);
            std::fill_n(oi, hd, 0.0f);
            if (last < 0) {
                lse[size_t(h) * Nq + i] = -std::numeric_limits<float>::infinity();
                continue;
            }
            float max = -std::numeric_limits<float>::infinity();
            for (int j = 0; j <= last; ++j) {
                const float* kj = &k[(size_t(g) * Nk + j) * hd];
                float dot = 0.0f;
                for (int d = 0; d < hd; ++d) dot += qi[d] * kj[d];
                scores[j] = dot * scale;
                max = std::max(max, scores[j]);
            }
            float sum = 0.0f;
            for (int j = 0; j <= last; ++j) {
                scores[j] = std::exp(scores[j] - max);
                sum += scores[j];
            }
            for (int j = 0; j <= last; ++j) {
                const float p = scores[j] / sum;
                const float* vj = &v[(size_t(g) * Nk + j) * hd];
                for (int d = 0; d < hd; ++d) oi[d] += p * vj[d];
            }
            lse[size_t(h) * Nq + i] = max + std::log(sum);
        }
    });
}

// Backward, with dp_ij = dout_i . v_j and delta_i = dout_i . o_i:
//   ds_ij = p_ij (dp_ij - delta_i);  dq_i += scale sum_j ds_ij k_j;  dk_j += scale ds_ij q_i;  dv_j += p_ij dout_i.
// One task per KV head g handles all query heads that read it, in order, so dk and dv have a single writer.
void attention_backward(std::span<float> dq, std::span<float> dk, std::span<float> dv, std::span<const float> dout,
                        std::span<const float> q, std::span<const float> k, std::span<const float> v, std::span<const float> out,
                        std::span<const float> lse, const int H, const int G, const int Nq, const int Nk, const int hd, const bool causal) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const int heads_per_group = H / G;
    parallel_for(G, 10.0 * heads_per_group * Nq * Nk * hd, [&](const int g) {
        for (int h = g * heads_per_group; h < (g + 1) * heads_per_group; ++h)
            for (int i = 0; i < Nq; ++i) {
                const int last = attention_last_key(i, Nq, Nk, causal);
                const float row_lse = lse[size_t(h) * Nq + i];
                if (last < 0) continue;
                const float* qi = &q[(size_t(h) * Nq + i) * hd];
                const float* doi = &dout[(size_t(h) * Nq + i) * hd];
                const float* oi = &out[(size_t(h) * Nq + i) * hd];
                float* dqi = &dq[(size_t(h) * Nq + i) * hd];
                float delta = 0.0f;
                for (int d = 0; d < hd; ++d) delta += doi[d] * oi[d];
                for (int j = 0; j <= last; ++j) {
                    const float* kj = &k[(size_t(g) * Nk + j) * hd];
                    const float* vj = &v[(size_t(g) * Nk + j) * hd];
                    float score = 0.0f, dp = 0.0f;
                    for (int d = 0; d < hd; ++d) {
                        score += qi[d] * kj[d];
                        dp += doi[d] * vj[d];
                    }
                    const float p = std::exp(score * scale - row_lse);
                    const float ds = p * (dp - delta) * scale;
                    float* dkj = &dk[(size_t(g) * Nk + j) * hd];
                    float* dvj = &dv[(size_t(g) * Nk + j) * hd];
                    for (int d = 0; d < hd; ++d) {
                        dqi[d] += ds * kj[d];
                        dkj[d] += ds * qi[d];
                        dvj[d] += p * doi[d];
                    }
                }
            }
    });
}

// Batched over B sequences of equal length: q [B, H, Nq, hd], k, v [B, G, Nk, hd] -> [B, H, Nq, hd].
Tensor& attention(Tape& tape, Tensor& q, Tensor& k, Tensor& v) {
    const int B = q.shape[0], H = q.shape[1], Nq = q.shape[2], hd = q.shape[3], G = k.shape[1], Nk = k.shape[2];
    Tensor& out = tape.make(q.shape);
    Tensor& lse = tape.make({B, H, Nq});
    const size_t q_size = size_t(H) * Nq * hd, kv_size = size_t(G) * Nk * hd;
    const auto sequence = [](std::vector<float>& t, size_t b, size_t size) { return std::span<float>(t).subspan(b * size, size); };
    parallel_for(B, 4.0 * B * H * Nq * Nk * hd, [&, B](const int b) {
        attention_forward(sequence(out.data, b, q_size), sequence(lse.data, b, size_t(H) * Nq), sequence(q.data, b, q_size),
                          sequence(k.data, b, kv_size), sequence(v.data, b, kv_size), H, G, Nq, Nk, hd, true);
    });
    tape.on_backward([&, B, H, G, Nq, Nk, hd, q_size, kv_size, sequence] {
        parallel_for(B, 10.0 * B * H * Nq * Nk * hd, [&](const int b) {
            attention_backward(sequence(q.grad, b, q_size), sequence(k.grad, b, kv_size), sequence(v.grad, b, kv_size),
                               sequence(out.grad, b, q_size), sequence(q.data, b, q_size), sequence(k.data, b, kv_size),
                               sequence(v.data, b, kv_size), sequence(out.data, b, q_size), sequence(lse.data, b, size_t(H) * Nq),
                               H, G, Nq, Nk, hd, true);
        });
    });
    return out;
}

// ==== 9. Model ====
// The dense GPT of DESIGN.md §3, a pre-norm decoder in the Llama style without biases:
//   x = embed[tokens]
//   x = x + attention(rms_norm(x)),  x = x + mlp(rms_norm(x))     for each layer
//   logits = rms_norm(x) @ W_lm_head^T                              (W_lm_head = embed when tied)
// Initialisation (§4): matrices ~ N(0, 0.02), the two projections that write into the residual stream
// (o_proj, down_proj) ~ N(0, 0.02 / sqrt(2L)), norm weights 1, drawn in the order of model_parameters().

constexpr float init_std = 0.02f;

struct Layer {
    Tensor attn_norm;  // [D]          input_layernorm
    Tensor wq;         // [H*hd, D]    q_proj
    Tensor wk;         // [G*hd, D]    k_proj
    Tensor wv;         // [G*hd, D]    v_proj
    Tensor wo;         // [D, H*hd]    o_proj
    Tensor ffn_norm;   // [D]          post_attention_layernorm
    Tensor w_gate;     // [F, D]       mlp.gate_proj
    Tensor w_up;       // [F, D]       mlp.up_proj
    Tensor w_down;     // [D, F]       mlp.down_proj
};

struct Model {
    ModelConfig config;
    Tensor embed;              // [V, D]
    std::vector<Layer> layers;
    Tensor final_norm;         // [D]
    Tensor lm_head;            // [V, D], unused (empty) when tied
};

struct Parameter {
    std::string name;          // the safetensors tensor name (DESIGN.md §6)
    Tensor* tensor;
    bool is_matrix;            // matrices get weight decay, norm weights do not
};

// Every parameter with its checkpoint name, in one fixed order (init, optimizer and checkpoint all use it).
std::vector<Parameter> model_parameters(Model& model) {
    std::vector<Parameter> params{{"model.embed_tokens.weight", &model.embed, true}};
    for (size_t l = 0; l < model.layers.size(); ++l) {
        Layer& layer = model.layers[l];
        const std::string prefix = "model.layers." + std::to_string(l) + ".";
        params.push_back({prefix + "input_layernorm.weight", &layer.attn_norm, false});
        params.push_back({prefix + "self_attn.q_proj.weight", &layer.wq, true});
        params.push_back({prefix + "self_attn.k_proj.weight", &layer.wk, true});
        params.push_back({prefix + "self_attn.v_proj.weight", &layer.wv, true});
        params.push_back({prefix + "self_attn.o_proj.weight", &layer.wo, true});
        params.push_back({prefix + "post_attention_layernorm.weight", &layer.ffn_norm, false});
        params.push_back({prefix + "mlp.gate_proj.weight", &layer.w_gate, true});
        params.push_back({prefix + "mlp.up_proj.weight", &layer.w_up, true});
        params.push_back({prefix + "mlp.down_proj.weight", &layer.w_down, true});
    }
    params.push_back({"model.norm.weight", &model.final_norm, false});
    if (!model.config.tie_embeddings) params.push_back({"lm_head.weight", &model.lm_head, true});
    return params;
}

// Allocates every parameter (values zero, gradients zero) with the shapes of §6.
Model make_model(const ModelConfig& config) {
    validate_model_config(config);
    const int V = config.vocab_size, D = config.dim, F = config.ffn_dim, hd = config.head_dim();
    const int q_dim = config.n_heads * hd, kv_dim = config.n_kv_heads * hd;
    Model model;
    model.config = config;
    model.embed = make_tensor({V, D}, true);
    for (int l = 0; l < config.n_layers; ++l)
        model.layers.push_back({make_tensor({D}, true), make_tensor({q_dim, D}, true), make_tensor({kv_dim, D}, true),
                                make_tensor({kv_dim, D}, true), make_tensor({D, q_dim}, true), make_tensor({D}, true),
                                make_tensor({F, D}, true), make_tensor({F, D}, true), make_tensor({D, F}, true)});
    model.final_norm = make_tensor({D}, true);
    if (!config.tie_embeddings) model.lm_head = make_tensor({V, D}, true);
    return model;
}

bool is_residual_projection(const std::string& name) {
    return name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight");
}

void init_model(Model& model, const uint64_t seed) {
    Rng rng(seed);
    const float residual_std = init_std / std::sqrt(2.0f * model.config.n_layers);
    for (const Parameter& p : model_parameters(model)) {
        const float std = is_residual_projection(p.name) ? residual_std : init_std;
        for (float& value : p.tensor->data) value = p.is_matrix ? std * rng.normal() : 1.0f;
    }
}

// tokens: [B*T] -> logits: [B*T, V]. Every step is an op recorded on the tape (when it records), so the
// same function serves training (with backward) and evaluation and sampling (without).
Tensor& model_forward(Tape& tape, Model& model, std::span<const int> tokens, const int B, const int T) {
    const ModelConfig& c = model.config;
    check(tokens.size() == size_t(B) * T, "model_forward: expected B*T tokens");
    check(T <= c.context, "a window of " + std::to_string(T) + " tokens is longer than the model's context " + std::to_string(c.context));
    Tensor* x = &embedding(tape, model.embed, tokens);
    for (Layer& layer : model.layers) {
        // attention block: x = x + o_proj(attention(rope(q), rope(k), v))
        Tensor& h = rms_norm(tape, *x, layer.attn_norm, c.norm_eps);
        Tensor& q = rope(tape, heads_split(tape, matmul(tape, h, layer.wq), B, T, c.n_heads), 0, c.rope_theta);
        Tensor& k = rope(tape, heads_split(tape, matmul(tape, h, layer.wk), B, T, c.n_kv_heads), 0, c.rope_theta);
        Tensor& v = heads_split(tape, matmul(tape, h, layer.wv), B, T, c.n_kv_heads);
        Tensor& attended = heads_merge(tape, attention(tape, q, k, v));
        x = &add(tape, *x, matmul(tape, attended, layer.wo));
        // feed-forward block: x = x + down_proj(silu(gate_proj(h)) * up_proj(h))
        Tensor& h2 = rms_norm(tape, *x, layer.ffn_norm, c.norm_eps);
        Tensor& gate = silu(tape, matmul(tape, h2, layer.w_gate));
        Tensor& hidden = mul(tape, gate, matmul(tape, h2, layer.w_up));
        x = &add(tape, *x, matmul(tape, hidden, layer.w_down));
    }
    Tensor& final = rms_norm(tape, *x, model.final_norm, c.norm_eps);
    return matmul(tape, final, c.tie_embeddings ? model.embed : model.lm_head);
}

size_t count_parameters(Model& model) {
    size_t n = 0;
    for (const Parameter& p : model_parameters(model)) n += p.tensor->numel();
    return n;
}
