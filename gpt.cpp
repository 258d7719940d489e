// gpt.cpp: a small GPT you can read in one sitting. Tokenizers (characters, byte-level BPE), autograd, a
// Llama-style transformer, AdamW training, safetensors checkpoints, a KV cache for inference and sampling,
// in one C++20 file with no dependencies beyond the standard library. The math and the file format are
// fixed in DESIGN.md.
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
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numbers>
#include <numeric>
#include <optional>
#include <queue>
#include <set>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
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

// Files are written to a temporary name and renamed over the target, so a crash or a full disk never leaves
// a half-written checkpoint or log under the final name.
void write_file_atomically(const std::string& path, const std::string& bytes) {
    const std::filesystem::path target(path);
    if (target.has_parent_path()) std::filesystem::create_directories(target.parent_path());
    const std::string temporary = path + ".tmp";
    {
        std::ofstream file(temporary, std::ios::binary | std::ios::trunc);
        check(file.good(), "cannot write '" + temporary + "'");
        file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        file.flush();
        check(file.good(), "writing '" + temporary + "' failed (disk full?)");
    }
    std::filesystem::rename(temporary, path);
}

std::string read_file(const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    check(file.good(), "cannot read '" + path + "'");
    return std::string((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
}

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
        threads.clear();  // join the workers here, while the mutex and condition variables they wait on still exist
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

// Loops whose total work is below parallel_min_flops run inline: waking the pool (tens of microseconds)
// costs more than they do.
constexpr double parallel_min_flops = 1048576.0;

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
    // Mixture of experts (DESIGN.md §3); n_experts = 0 is the dense model.
    int n_experts = 0;             // E routed experts per MoE layer
    int top_k_experts = 0;         // K experts chosen per token
    int n_shared_experts = 0;      // S: the shared expert has hidden size S * Fe
    int expert_ffn_dim = 0;        // Fe, each expert's hidden size
    std::string scoring = "sigmoid";  // sigmoid (DeepSeek-V3) or softmax (Switch / Mixtral)
    int dense_layers = 0;          // the first k layers keep the dense MLP (first_k_dense_replace)

    int head_dim() const { return dim / n_heads; }
    bool is_moe_layer(const int l) const { return n_experts > 0 && l >= dense_layers; }
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
    check(c.scoring == "sigmoid" || c.scoring == "softmax", "--scoring must be sigmoid or softmax, got '" + c.scoring + "'");
    check(c.n_experts >= 0, "--experts must not be negative, got " + std::to_string(c.n_experts));
    if (c.n_experts == 0) {
        check(c.top_k_experts == 0 && c.n_shared_experts == 0 && c.expert_ffn_dim == 0 && c.dense_layers == 0,
              "--top-k-experts, --shared-experts, --expert-ffn and --dense-layers need --experts E > 0");
        return;
    }
    check(c.top_k_experts >= 1 && c.top_k_experts <= c.n_experts, "--top-k-experts must be between 1 and --experts " +
                                                                       std::to_string(c.n_experts) + ", got " + std::to_string(c.top_k_experts));
    check(c.n_shared_experts >= 0, "--shared-experts must not be negative, got " + std::to_string(c.n_shared_experts));
    check(c.expert_ffn_dim >= 1, "--expert-ffn must be positive, got " + std::to_string(c.expert_ffn_dim));
    check(c.dense_layers >= 0 && c.dense_layers < c.n_layers, "--dense-layers must be between 0 and --layers - 1 = " +
                                                                  std::to_string(c.n_layers - 1) + " (at least one MoE layer), got " +
                                                                  std::to_string(c.dense_layers));
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
    float bias_rate = 1e-3f;  // gamma, MoE sigmoid scoring: the routing bias moves by this much per step
    float aux_loss = 0.01f;   // alpha, MoE softmax scoring: the weight of the load-balancing loss
};

struct SampleConfig {
    int count = 20;           // documents to sample
    std::string prompt;
    float temperature = 1.0f; // 0 = greedy
    int top_k = 0;            // 0 = keep all
    double top_p = 1.0;       // 1 = keep all
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

// ==== 4. Tokenizers: characters and byte-level BPE ====
// Two tokenizers (DESIGN.md §2). char: the vocabulary is the sorted set of Unicode code points in the data
// file's documents, ids 0..n-1, EOT = n; text is UTF-8, and invalid UTF-8 or an unknown character is an error.
// bpe: ids 0..255 are bytes, merge r joins two ids into id 256 + r, EOT = 256 + #merges; any byte string
// can be encoded, and decode(encode(s)) == s.

// The UTF-8 character starting at byte i: its code point and length in bytes, or length 0 where the bytes
// are not valid UTF-8 (a stray continuation byte, a truncated sequence, an overlong form, a surrogate).
struct Utf8Char {
    char32_t code_point = 0;
    int length = 0;
};

Utf8Char utf8_next(const std::string_view text, const size_t i) {
    const auto byte = [&](size_t j) { return static_cast<unsigned char>(text[j]); };
    const unsigned char lead = byte(i);
    const int length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 0;
    if (length == 0 || i + length > text.size()) return {};
    char32_t c = length == 1 ? lead : lead & (0x7F >> length);
    for (int j = 1; j < length; ++j) {
        if ((byte(i + j) & 0xC0) != 0x80) return {};
        c = (c << 6) | (byte(i + j) & 0x3F);
    }
    constexpr char32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (c < smallest[length] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return {};
    return {c, length};
}

std::vector<char32_t> utf8_decode(const std::string_view text) {
    std::vector<char32_t> code_points;
    for (size_t i = 0; i < text.size();) {
        const Utf8Char c = utf8_next(text, i);
        check(c.length > 0, "invalid UTF-8 at byte " + std::to_string(i));
        code_points.push_back(c.code_point);
        i += c.length;
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
    bool is_bpe = false;
    // char: id -> code point (sorted) and code point -> id
    std::vector<char32_t> chars;
    std::map<char32_t, int> ids;
    // bpe: merge r joins (left, right) into id 256 + r; pieces[id] are the bytes a token stands for
    std::vector<std::pair<int, int>> merges;
    std::vector<std::string> pieces;
    std::unordered_map<uint64_t, int> merge_rank;                          // pair key -> r
    mutable std::unordered_map<std::string, std::vector<int>> chunk_cache;  // encode: chunk -> ids, filled as it goes

    int eot() const { return is_bpe ? 256 + static_cast<int>(merges.size()) : static_cast<int>(chars.size()); }
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

// ---- Byte-level BPE: chunks ----
// Merges never cross a chunk boundary. Chunks (GPT-2 style, read left to right, first rule that applies):
//   1. a contraction: ' followed by s, t, m, d, re, ve or ll;
//   2. an optional single space, then a run of letters, or a run of digits, or a run of symbols;
//   3. a run of whitespace; when non-space follows, the run's last character is left for the next chunk
//      (a space there joins the word after it, as in rule 2).
// Letters: A-Z, a-z and every non-ASCII character except U+0080-U+00BF, U+00D7, U+00F7, U+2000-U+2BFF and
// U+3000-U+303F (punctuation and symbols). Digits: 0-9. Whitespace: space, \t, \n, \v, \f, \r. Everything
// else, including each byte that is not valid UTF-8, is a symbol.
enum class CharClass { letter, digit, space, symbol };

struct ClassifiedChar {
    int length;
    CharClass kind;
};

ClassifiedChar classify_char(const std::string_view text, const size_t i) {
    const Utf8Char c = utf8_next(text, i);
    if (c.length == 0) return {1, CharClass::symbol};
    const char32_t x = c.code_point;
    if ((x >= 'a' && x <= 'z') || (x >= 'A' && x <= 'Z')) return {1, CharClass::letter};
    if (x >= '0' && x <= '9') return {1, CharClass::digit};
    if (x == ' ' || (x >= '\t' && x <= '\r')) return {1, CharClass::space};
    const bool symbol = x < 0xC0 || x == 0xD7 || x == 0xF7 || (x >= 0x2000 && x <= 0x2BFF) || (x >= 0x3000 && x <= 0x303F);
    return {c.length, symbol ? CharClass::symbol : CharClass::letter};
}

std::vector<std::string_view> split_chunks(const std::string_view text) {
    std::vector<std::string_view> chunks;
    const auto kind_at = [&](size_t i) { return classify_char(text, i).kind; };
    for (size_t i = 0; i < text.size();) {
        size_t end = i;
        if (text[i] == '\'') {  // 1. contractions
            for (const std::string_view suffix : {"re", "ve", "ll", "s", "t", "m", "d"})
                if (text.substr(i + 1, suffix.size()) == suffix) {
                    end = i + 1 + suffix.size();
                    break;
                }
        }
        if (end == i) {
            size_t j = i;
            if (text[j] == ' ' && j + 1 < text.size() && kind_at(j + 1) != CharClass::space) ++j;  // the space joins the word
            const CharClass kind = kind_at(j);
            if (kind != CharClass::space) {  // 2. a run of one class
                while (j < text.size() && kind_at(j) == kind) j += classify_char(text, j).length;
                end = j;
            } else {  // 3. whitespace
                while (j < text.size() && kind_at(j) == CharClass::space) ++j;
                end = (j < text.size() && j - i >= 2) ? j - 1 : j;
            }
        }
        chunks.push_back(text.substr(i, end - i));
        i = end;
    }
    return chunks;
}

// ---- Byte-level BPE: merges ----
uint64_t pair_key(const int left, const int right) { return uint64_t(uint32_t(left)) << 32 | uint32_t(right); }

// Replaces every (left, right) in ids, scanning left to right, by merged. Returns whether anything changed.
bool replace_pair(std::vector<int>& ids, const int left, const int right, const int merged) {
    size_t out = 0;
    bool changed = false;
    for (size_t i = 0; i < ids.size(); ++i) {
        if (i + 1 < ids.size() && ids[i] == left && ids[i + 1] == right) {
            ids[out++] = merged;
            ++i;
            changed = true;
        } else {
            ids[out++] = ids[i];
        }
    }
    ids.resize(out);
    return changed;
}

// A BPE tokenizer from its merge list; each merge may only use ids that exist before it.
Tokenizer make_bpe_tokenizer(std::vector<std::pair<int, int>> merges) {
    Tokenizer tokenizer;
    tokenizer.is_bpe = true;
    for (int byte = 0; byte < 256; ++byte) tokenizer.pieces.push_back(std::string(1, static_cast<char>(byte)));
    for (size_t r = 0; r < merges.size(); ++r) {
        const auto [left, right] = merges[r];
        const int next = 256 + static_cast<int>(r);
        check(left >= 0 && left < next && right >= 0 && right < next, "merge " + std::to_string(r) + " (" + std::to_string(left) + ", " +
                                                                          std::to_string(right) + ") uses an id that does not exist yet");
        check(tokenizer.merge_rank.emplace(pair_key(left, right), static_cast<int>(r)).second, "merge " + std::to_string(r) + " repeats an earlier one");
        tokenizer.pieces.push_back(tokenizer.pieces[left] + tokenizer.pieces[right]);
    }
    tokenizer.merges = std::move(merges);
    return tokenizer;
}

// Training (DESIGN.md §2): count adjacent pairs over all chunks (a distinct chunk weighted by how often it
// occurs), merge the most frequent pair (ties: the smallest (left, right)), repeat. Recounting everything
// after each merge costs a pass over the corpus per merge; instead the counts are kept up to date: only
// the chunks that contain the merged pair change, so only their pairs are re-counted, and a priority queue
// with lazy deletion (an entry is skipped if its count is no longer current) yields the best pair.
// Learns vocab_size - 257 merges (256 bytes and EOT take the rest).
Tokenizer train_bpe(const std::vector<std::string>& documents, const int vocab_size) {
    check(vocab_size > 256, "--vocab must be larger than 256 (the byte tokens), got " + std::to_string(vocab_size));
    std::unordered_map<std::string_view, int64_t> chunk_counts;
    for (const std::string& document : documents)
        for (const std::string_view chunk : split_chunks(document)) ++chunk_counts[chunk];
    struct Word {
        std::vector<int> ids;
        int64_t count;
    };
    std::vector<Word> words;
    for (const auto& [chunk, count] : chunk_counts) words.push_back({std::vector<int>(chunk.begin(), chunk.end()), count});
    for (Word& word : words)
        for (int& id : word.ids) id = static_cast<unsigned char>(id);

    std::unordered_map<uint64_t, int64_t> pair_count;
    std::unordered_map<uint64_t, std::vector<int>> pair_words;  // which words contain the pair (may repeat)
    const auto add_pairs = [&](const int w, const int64_t sign, std::vector<uint64_t>& touched) {
        const std::vector<int>& ids = words[w].ids;
        for (size_t i = 0; i + 1 < ids.size(); ++i) {
            const uint64_t key = pair_key(ids[i], ids[i + 1]);
            pair_count[key] += sign * words[w].count;
            if (sign > 0) pair_words[key].push_back(w);
            touched.push_back(key);
        }
    };
    struct Candidate {
        int64_t count;
        uint64_t key;
        bool operator<(const Candidate& other) const {  // the queue's top: highest count, then smallest pair
            return count != other.count ? count < other.count : key > other.key;
        }
    };
    std::priority_queue<Candidate> queue;
    std::vector<uint64_t> touched;
    for (int w = 0; w < static_cast<int>(words.size()); ++w) add_pairs(w, +1, touched);
    for (const auto& [key, count] : pair_count) queue.push({count, key});

    std::vector<std::pair<int, int>> merges;
    std::vector<int> merged_at(words.size(), -1);
    const int wanted = vocab_size - 257;
    while (static_cast<int>(merges.size()) < wanted) {
        while (!queue.empty() && pair_count[queue.top().key] != queue.top().count) queue.pop();
        check(!queue.empty() && queue.top().count > 0, "the corpus has no pair left to merge after " + std::to_string(merges.size()) +
                                                           " merges; --vocab can be at most " + std::to_string(257 + merges.size()));
        const uint64_t key = queue.top().key;
        queue.pop();
        const int left = static_cast<int>(key >> 32), right = static_cast<int>(key & 0xFFFFFFFFu);
        const int merged = 256 + static_cast<int>(merges.size());
        merges.emplace_back(left, right);
        touched.clear();
        for (const int w : std::exchange(pair_words[key], {})) {
            if (merged_at[w] == merged) continue;  // listed twice
            merged_at[w] = merged;
            add_pairs(w, -1, touched);
            replace_pair(words[w].ids, left, right, merged);
            add_pairs(w, +1, touched);
        }
        std::sort(touched.begin(), touched.end());
        touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
        for (const uint64_t changed : touched)
            if (pair_count[changed] > 0) queue.push({pair_count[changed], changed});
    }
    return make_bpe_tokenizer(std::move(merges));
}

// Encoding a chunk: apply merges lowest rank first (the order they were learned) until none applies.
std::vector<int> bpe_encode_chunk(const Tokenizer& tokenizer, const std::string_view chunk) {
    std::vector<int> ids(chunk.begin(), chunk.end());
    for (int& id : ids) id = static_cast<unsigned char>(id);
    while (ids.size() >= 2) {
        int best = std::numeric_limits<int>::max();
        for (size_t i = 0; i + 1 < ids.size(); ++i)
            if (const auto found = tokenizer.merge_rank.find(pair_key(ids[i], ids[i + 1])); found != tokenizer.merge_rank.end())
                best = std::min(best, found->second);
        if (best == std::numeric_limits<int>::max()) break;
        replace_pair(ids, tokenizer.merges[best].first, tokenizer.merges[best].second, 256 + best);
    }
    return ids;
}

// ---- Encoding and decoding, either tokenizer ----
std::vector<int> encode(const Tokenizer& tokenizer, const std::string_view text) {
    std::vector<int> tokens;
    if (tokenizer.is_bpe) {
        for (const std::string_view chunk : split_chunks(text)) {
            auto cached = tokenizer.chunk_cache.find(std::string(chunk));
            if (cached == tokenizer.chunk_cache.end()) cached = tokenizer.chunk_cache.emplace(chunk, bpe_encode_chunk(tokenizer, chunk)).first;
            tokens.insert(tokens.end(), cached->second.begin(), cached->second.end());
        }
        return tokens;
    }
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
        if (token != tokenizer.eot()) text += tokenizer.is_bpe ? tokenizer.pieces[token] : utf8_encode(tokenizer.chars[token]);
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
    size_t used = 0;                                 // values[0 .. used) belong to the current pass
    std::vector<std::function<void()>> backward_steps;

    // A new tensor for an op's output: its values are not cleared (every op writes all of its output), its
    // gradient is zero; values an op only saves for its backward (saved = true) get no gradient. After clear()
    // the same buffers are handed out again, so a training loop does not return memory to the system and
    // fault it back in at every step.
    Tensor& make(std::vector<int> shape, const bool saved = false) {
        if (used == values.size()) values.emplace_back();
        Tensor& t = values[used++];
        t.data.resize(shape_numel(shape));
        if (record && !saved) t.grad.assign(t.data.size(), 0.0f);
        else t.grad.clear();
        t.shape = std::move(shape);
        return t;
    }
    void on_backward(std::function<void()> step) {
        if (record) backward_steps.push_back(std::move(step));
    }
    void clear() {
        used = 0;
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

// The width of one vector register in floats, which sizes the dot-product lanes and the matmul tiles so that
// the compiler can keep them in registers: 16 with AVX-512 (built with -mprefer-vector-width=512), else 8 (AVX2).
#if defined(__AVX512F__)
constexpr int simd_floats = 16;
#else
constexpr int simd_floats = 8;
#endif

// ---- Reductions: dot product, sum, maximum ----
// A reduction of n values is kept in reduction_lanes independent partial results, combined pairwise at the end.
// The lanes let the compiler use vector instructions (a single running sum would force one addition after
// another), and the order of the operations is fixed, so the result is the same on every run.
constexpr int reduction_lanes = simd_floats;

template <typename Value, typename Combine>
float reduce(const int n, const float identity, const Value& value, const Combine& combine) {
    float lanes[reduction_lanes];
    std::fill_n(lanes, reduction_lanes, identity);
    int i = 0;
    for (; i + reduction_lanes <= n; i += reduction_lanes)
        for (int l = 0; l < reduction_lanes; ++l) lanes[l] = combine(lanes[l], value(i + l));
    for (int l = 0; i < n; ++i, ++l) lanes[l] = combine(lanes[l], value(i));
    for (int width = reduction_lanes / 2; width > 0; width /= 2)  // combine the lanes pairwise: a tree, not a chain
        for (int l = 0; l < width; ++l) lanes[l] = combine(lanes[l], lanes[l + width]);
    return lanes[0];
}

float dot(const float* a, const float* b, const int n) {
    return reduce(n, 0.0f, [&](const int i) { return a[i] * b[i]; }, std::plus<float>());
}
float sum_of(const float* x, const int n) {
    return reduce(n, 0.0f, [&](const int i) { return x[i]; }, std::plus<float>());
}
float max_of(const float* x, const int n) {
    const auto larger = [](const float a, const float b) { return std::max(a, b); };
    return reduce(n, -std::numeric_limits<float>::infinity(), [&](const int i) { return x[i]; }, larger);
}

// ---- Matrix multiplication ----
// gemm: C[n, m] (+)= A[n, p] @ B[p, m], where A(i, k) = a[i*a_row + k*a_col] and B(k, j) = b[k*b_row + j*b_col],
// so one routine serves x @ W^T, dout @ W and dout^T @ x without transposing anything in memory.
// How it is fast: C is cut into micro-tiles of gemm_tile_rows x gemm_tile_cols kept in registers; a
// column panel of B is first packed into a contiguous [p, gemm_tile_cols] buffer (zero-padded at the edge),
// so the inner loop is a broadcast of one A value times a contiguous row of the panel: a vector FMA the
// compiler emits. All panels are packed first (reading B once), then tasks are (column panel, block of rows) pairs. Each C element is summed over k in
// increasing order by one thread, so results do not depend on the thread count.
constexpr int gemm_tile_rows = 8;
constexpr int gemm_tile_cols = 2 * simd_floats;  // 8 x 2 vector accumulators: 16 of the 32 AVX-512 registers
constexpr int gemm_block_rows = 64;
static_assert(gemm_block_rows % gemm_tile_rows == 0, "a block of rows must hold whole micro-tiles");

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
    const size_t panel_size = size_t(p) * gemm_tile_cols;
    // Pack every column panel of B once: panel[k][j] = B(k, j0 + j), zero beyond column m.
    // The calling thread's buffer, kept between calls (no allocation per call). The workers reach it through
    // this reference: naming a thread_local inside the lambdas would give each worker its own, empty one.
    thread_local std::vector<float> calling_thread_panels, calling_thread_tiles;
    std::vector<float>& panels = calling_thread_panels;
    panels.resize(col_panels * panel_size);
    // A read down its columns (a_col != 1, as dout^T in dw = dout^T x) would fetch a new cache line at every k
    // step. Then A is packed too, in tiles of gemm_tile_rows rows stored k-major: tiles[t][k][r] = A(8t + r, k).
    const bool pack_a = a_col != 1;
    const int row_tiles = (n + gemm_tile_rows - 1) / gemm_tile_rows;
    const size_t tile_size = size_t(p) * gemm_tile_rows;
    std::vector<float>& tiles = calling_thread_tiles;
    if (pack_a) {
        tiles.resize(row_tiles * tile_size);
        parallel_for(row_tiles, double(p) * n, [&](const int t) {
            const int i0 = t * gemm_tile_rows, rows = std::min(gemm_tile_rows, n - i0);
            float* out = tiles.data() + t * tile_size;
            if (rows < gemm_tile_rows) std::fill(out, out + tile_size, 0.0f);
            for (int k = 0; k < p; ++k)
                for (int r = 0; r < rows; ++r) out[k * gemm_tile_rows + r] = a[(i0 + r) * a_row + k * a_col];
        });
    }
    // Where row i of A starts, and A's strides as the micro-tiles read it.
    const auto a_row_start = [&](const int i) {
        return pack_a ? tiles.data() + (i / gemm_tile_rows) * tile_size + i % gemm_tile_rows : a + i * a_row;
    };
    const size_t tile_row = pack_a ? 1 : a_row, tile_col = pack_a ? gemm_tile_rows : a_col;
    parallel_for(col_panels, double(p) * m, [&](const int panel) {
        const int j0 = panel * gemm_tile_cols, cols = std::min(gemm_tile_cols, m - j0);
        float* out = panels.data() + panel * panel_size;
        if (cols < gemm_tile_cols) std::fill(out, out + panel_size, 0.0f);
        if (b_row == 1)  // B is W^T: walk down each column of B, which is a contiguous row of W
            for (int j = 0; j < cols; ++j)
                for (int k = 0; k < p; ++k) out[k * gemm_tile_cols + j] = b[k + (j0 + j) * b_col];
        else
            for (int k = 0; k < p; ++k)
                for (int j = 0; j < cols; ++j) out[k * gemm_tile_cols + j] = b[k * b_row + (j0 + j) * b_col];
    });
    parallel_for(col_panels * row_blocks, 2.0 * n * p * m, [&](const int task) {
        const int panel = task % col_panels, j0 = panel * gemm_tile_cols, cols = std::min(gemm_tile_cols, m - j0);
        const int i0 = (task / col_panels) * gemm_block_rows, i_end = std::min(n, i0 + gemm_block_rows);
        const float* packed_panel = panels.data() + panel * panel_size;
        int i = i0;
        for (; i + gemm_tile_rows <= i_end; i += gemm_tile_rows)
            gemm_micro_tile<gemm_tile_rows>(c + size_t(i) * m + j0, m, cols, a_row_start(i), tile_row, tile_col, packed_panel, p, accumulate);
        for (; i < i_end; ++i)  // the rows left over, one by one
            gemm_micro_tile<1>(c + size_t(i) * m + j0, m, cols, a_row_start(i), tile_row, tile_col, packed_panel, p, accumulate);
    });
}

// Linear layer: out = x @ w^T   (w is [out, in], as in PyTorch and the checkpoint)
// x: [N, K], w: [M, K] -> out: [N, M]. With fewer rows than a micro-tile (decoding one token), packing would
// copy all of w for a few rows of work: then each output is a dot product that reads its row of w directly.
void matmul_forward(std::span<float> out, std::span<const float> x, std::span<const float> w, const int N, const int K, const int M) {
    if (N >= gemm_tile_rows) {
        gemm(out.data(), x.data(), K, 1, w.data(), 1, K, N, K, M, false);
        return;
    }
    parallel_rows(M, 2.0 * N * K, [&](int begin, int end) {
        for (int j = begin; j < end; ++j)
            for (int i = 0; i < N; ++i) out[size_t(i) * M + j] = dot(&x[size_t(i) * K], &w[size_t(j) * K], K);
    });
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
    parallel_rows(static_cast<int>(out.size()), 1.0, [&](int begin, int end) {
        for (int i = begin; i < end; ++i) out[i] = a[i] + b[i];
    });
}
void add_backward(std::span<float> da, std::span<float> db, std::span<const float> dout) {
    parallel_rows(static_cast<int>(dout.size()), 2.0, [&](int begin, int end) {
        for (int i = begin; i < end; ++i) {
            da[i] += dout[i];
            db[i] += dout[i];
        }
    });
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
    parallel_rows(static_cast<int>(out.size()), 1.0, [&](int begin, int end) {
        for (int i = begin; i < end; ++i) out[i] = a[i] * b[i];
    });
}
void mul_backward(std::span<float> da, std::span<float> db, std::span<const float> dout, std::span<const float> a,
                  std::span<const float> b) {
    parallel_rows(static_cast<int>(dout.size()), 4.0, [&](int begin, int end) {
        for (int i = begin; i < end; ++i) {
            da[i] += dout[i] * b[i];
            db[i] += dout[i] * a[i];
        }
    });
}

Tensor& mul(Tape& tape, Tensor& a, Tensor& b) {
    Tensor& out = tape.make(a.shape);
    mul_forward(out.data, a.data, b.data);
    tape.on_backward([&out, &a, &b] { mul_backward(a.grad, b.grad, out.grad, a.data, b.data); });
    return out;
}

// ---- Exponential ----
// e^x for the ops' inner loops. std::exp is a library call per element, which the compiler cannot vectorise;
// this is plain arithmetic, which it can. With n = round(x / ln 2) and r = x - n ln 2 (|r| <= ln2 / 2, ln 2 in
// two parts so that r is exact), e^x = 2^n e^r: e^r is Cephes' degree-6 polynomial of expf and 2^n is written
// into a float's exponent bits. Relative error below 1e-7 (std::exp's float is 6e-8). x is clamped to [-87, 88],
// where e^x is a normal float: below -87 the result is 0, above 88 it is e^88; NaN stays NaN.
inline float fast_exp(const float x) {
    constexpr float round_shift = 0x1.8p23f;  // adding 1.5 * 2^23 rounds to an integer, kept in the low mantissa bits
    const float clamped = std::clamp(x, -87.0f, 88.0f);
    const float shifted = clamped * std::numbers::log2e_v<float> + round_shift;
    const float n = shifted - round_shift;
    const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float two_to_n = std::bit_cast<float>((std::bit_cast<uint32_t>(shifted) + 127u) << 23);
    return x < -87.0f ? 0.0f : (p * r * r + r + 1.0f) * two_to_n;
}

// ---- SiLU ----
// silu(z) = z * sigmoid(z);  silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z))).  Saves sigmoid(z) for backward,
// so that the exponential is computed once per element and step.
float sigmoid(const float z) { return 1.0f / (1.0f + fast_exp(-z)); }

void silu_forward(std::span<float> out, std::span<float> sigmoid_x, std::span<const float> x) {
    parallel_rows(static_cast<int>(out.size()), 20.0, [&](int begin, int end) {
        for (int i = begin; i < end; ++i) {
            sigmoid_x[i] = sigmoid(x[i]);
            out[i] = x[i] * sigmoid_x[i];
        }
    });
}
void silu_backward(std::span<float> dx, std::span<const float> dout, std::span<const float> x, std::span<const float> sigmoid_x) {
    parallel_rows(static_cast<int>(dout.size()), 6.0, [&](int begin, int end) {
        for (int i = begin; i < end; ++i) dx[i] += dout[i] * sigmoid_x[i] * (1.0f + x[i] * (1.0f - sigmoid_x[i]));
    });
}

Tensor& silu(Tape& tape, Tensor& x) {
    Tensor& out = tape.make(x.shape);
    Tensor& sigmoid_x = tape.make(x.shape, true);
    silu_forward(out.data, sigmoid_x.data, x.data);
    tape.on_backward([&out, &sigmoid_x, &x] { silu_backward(x.grad, out.grad, x.data, sigmoid_x.data); });
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
    Tensor& inv_rms = tape.make({N}, true);
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
                const float p = fast_exp(logits[size_t(n) * V + v] - lse[n]);
                dlogits[size_t(n) * V + v] += dloss * (p - (v == targets[n] ? 1.0f : 0.0f)) / N;
            }
    });
}

Tensor& cross_entropy(Tape& tape, Tensor& logits, std::span<const int> targets) {
    const int N = logits.shape[0], V = logits.shape[1];
    check(targets.size() == size_t(N), "cross_entropy: one target per row is needed");
    for (const int t : targets) check(t >= 0 && t < V, "target id " + std::to_string(t) + " is outside the vocabulary");
    Tensor& loss = tape.make({1});
    Tensor& lse = tape.make({N}, true);
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
// split: out[b, h, t, :] = x[b*T + t, h*hd : (h+1)*hd];  merge is the inverse permutation. The gradient of a
// permutation is the inverse permutation, so each op's backward is the other one, accumulated into dx.
void heads_permute(std::span<float> out, std::span<const float> x, const int B, const int T, const int n_heads, const int hd,
                   const bool to_heads, const bool accumulate) {
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < n_heads; ++h)
            for (int t = 0; t < T; ++t) {
                const size_t rows_index = (size_t(b) * T + t) * n_heads * hd + size_t(h) * hd;
                const size_t heads_index = ((size_t(b) * n_heads + h) * T + t) * hd;
                const float* from = &x[to_heads ? rows_index : heads_index];
                float* to = &out[to_heads ? heads_index : rows_index];
                for (int d = 0; d < hd; ++d) to[d] = accumulate ? to[d] + from[d] : from[d];
            }
}

// x: [B*T, n*hd] -> [B, n, T, hd]
Tensor& heads_split(Tape& tape, Tensor& x, const int B, const int T, const int n_heads) {
    const int hd = x.shape[1] / n_heads;
    Tensor& out = tape.make({B, n_heads, T, hd});
    heads_permute(out.data, x.data, B, T, n_heads, hd, true, false);
    tape.on_backward([&out, &x, B, T, n_heads, hd] { heads_permute(x.grad, out.grad, B, T, n_heads, hd, false, true); });
    return out;
}
// x: [B, n, T, hd] -> [B*T, n*hd]
Tensor& heads_merge(Tape& tape, Tensor& x) {
    const int B = x.shape[0], n_heads = x.shape[1], T = x.shape[2], hd = x.shape[3];
    Tensor& out = tape.make({B * T, n_heads * hd});
    heads_permute(out.data, x.data, B, T, n_heads, hd, false, false);
    tape.on_backward([&out, &x, B, T, n_heads, hd] { heads_permute(x.grad, out.grad, B, T, n_heads, hd, true, true); });
    return out;
}

// ---- RoPE, rotate-half layout (DESIGN.md §3) ----
// In each head vector, element i pairs with i + hd/2. With a = pos * theta^(-2i/hd):
//   x'_i = x_i cos a - x_{i+hd/2} sin a,   x'_{i+hd/2} = x_{i+hd/2} cos a + x_i sin a.
// x: [S, T, hd] (S = B * heads), the token at t has position pos0 + t. Backward rotates by -a.
// direction +1 rotates by +a (forward), -1 by -a (backward); accumulate adds the result into out.
void rope_rotate(std::span<float> out, std::span<const float> x, const int S, const int T, const int hd, const int pos0,
                 const float theta, const float direction, const bool accumulate) {
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
                o[i] = (accumulate ? o[i] : 0.0f) + (first * c - second * sn);
                o[i + half] = (accumulate ? o[i + half] : 0.0f) + (second * c + first * sn);
            }
        }
}
void rope_forward(std::span<float> out, std::span<const float> x, const int S, const int T, const int hd, const int pos0, const float theta) {
    rope_rotate(out, x, S, T, hd, pos0, theta, 1.0f, false);
}
void rope_backward(std::span<float> dx, std::span<const float> dout, const int S, const int T, const int hd, const int pos0, const float theta) {
    rope_rotate(dx, dout, S, T, hd, pos0, theta, -1.0f, true);
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
// h / (H/G). Per head, as matrices:  S = Q K^T / sqrt(hd),  P = softmax(S) row by row,  O = P V.
// Causal rows see keys j <= i + Nk - Nq (the ends aligned, so Nq new tokens after Nk - Nq cached ones see
// everything before them); masked entries of P are 0. lse_i = log sum_j e^{S_ij} is saved instead of P:
// backward recomputes P_ij = e^{S_ij - lse_i}, as flash attention does. A row that sees no key gives o = 0 and
// lse = -inf. The queries are taken in blocks of attention_block_rows rows, and a block only computes the columns
// of S up to the last key its last row sees: the masked upper triangle is skipped block by block (3/8 of the work
// at Nq = Nk = 128). Within a block the causal rule with the ends aligned is the same rule, so the block is
// attended as Nq = rows queries to Nk = keys keys. S and P are materialised per block ([rows, keys], fine on the
// CPU); gpt_cuda.cu shows how to avoid that.
constexpr int attention_block_rows = 32;

int attention_last_key(const int i, const int Nq, const int Nk, const bool causal) {
    return causal ? std::min(Nk - 1, i + Nk - Nq) : Nk - 1;
}

// The keys that queries i0 .. i0 + rows - 1 see: 0 .. attention_block_keys - 1.
int attention_block_keys(const int i0, const int rows, const int Nq, const int Nk, const bool causal) {
    return std::max(0, attention_last_key(i0 + rows - 1, Nq, Nk, causal) + 1);
}

// Forward softmax of the scores, in place: P_ij = e^{S_ij scale - m_i} / l_i over the keys row i sees (0 for the
// others), with m_i the row max and l_i the row sum; saves lse_i = m_i + log l_i.  scores: [Nq, Nk], lse: [Nq]
void attention_softmax(std::span<float> scores, std::span<float> lse, const float scale, const int Nq, const int Nk, const bool causal) {
    for (int i = 0; i < Nq; ++i) {
        float* row = &scores[size_t(i) * Nk];
        const int last = attention_last_key(i, Nq, Nk, causal);
        const float max = max_of(row, last + 1) * scale;  // scale > 0, so this is the largest of row[j] * scale
        for (int j = 0; j <= last; ++j) row[j] = fast_exp(row[j] * scale - max);
        const float sum = sum_of(row, last + 1);
        for (int j = 0; j <= last; ++j) row[j] /= sum;
        std::fill(row + std::max(0, last + 1), row + Nk, 0.0f);
        lse[i] = last < 0 ? -std::numeric_limits<float>::infinity() : max + std::log(sum);
    }
}

// Backward's P, recomputed from the scores and the saved lse: P_ij = e^{S_ij scale - lse_i}, 0 where masked.
void attention_probabilities(std::span<float> scores, std::span<const float> lse, const float scale, const int Nq, const int Nk,
                             const bool causal) {
    for (int i = 0; i < Nq; ++i) {
        float* row = &scores[size_t(i) * Nk];
        const int last = attention_last_key(i, Nq, Nk, causal);
        for (int j = 0; j <= last; ++j) row[j] = fast_exp(row[j] * scale - lse[i]);
        std::fill(row + std::max(0, last + 1), row + Nk, 0.0f);
    }
}

// kv_head_stride: floats from one KV head to the next; 0 means packed (Nk * hd). The KV cache passes max_T * hd.
void attention_forward(std::span<float> out, std::span<float> lse, std::span<const float> q, std::span<const float> k,
                       std::span<const float> v, const int H, const int G, const int Nq, const int Nk, const int hd, const bool causal,
                       const size_t kv_head_stride = 0) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const size_t q_head = size_t(Nq) * hd, kv_head = kv_head_stride ? kv_head_stride : size_t(Nk) * hd;
    parallel_for(H, 4.0 * H * Nq * Nk * hd, [&](const int h) {
        const int g = h / (H / G);
        thread_local std::vector<float> scores;  // each thread's scratch, kept between calls
        scores.resize(size_t(std::min(Nq, attention_block_rows)) * Nk);
        for (int i0 = 0; i0 < Nq; i0 += attention_block_rows) {
            const int rows = std::min(attention_block_rows, Nq - i0), keys = attention_block_keys(i0, rows, Nq, Nk, causal);
            const size_t q_block = h * q_head + size_t(i0) * hd;
            matmul_forward(scores, q.subspan(q_block, size_t(rows) * hd), k.subspan(g * kv_head, size_t(keys) * hd), rows, hd, keys);  // S
            attention_softmax(scores, lse.subspan(size_t(h) * Nq + i0, rows), scale, rows, keys, causal);                                // P
            gemm(&out[q_block], scores.data(), keys, 1, &v[g * kv_head], hd, 1, rows, keys, hd, false);                                 // O = P V
        }
    });
}

// Backward, with dP = dO V^T and delta_i = dO_i . O_i (= sum_j P_ij dP_ij):
//   dS = P * (dP - delta) * scale;  dQ += dS K;  dK += dS^T Q;  dV += P^T dO.
// One task per KV head g handles all query heads that read it, in order, so dK and dV have a single writer.
void attention_backward(std::span<float> dq, std::span<float> dk, std::span<float> dv, std::span<const float> dout,
                        std::span<const float> q, std::span<const float> k, std::span<const float> v, std::span<const float> out,
                        std::span<const float> lse, const int H, const int G, const int Nq, const int Nk, const int hd, const bool causal) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const size_t q_head = size_t(Nq) * hd, kv_head = size_t(Nk) * hd;
    parallel_for(G, 12.0 * H * Nq * Nk * hd, [&](const int g) {
        thread_local std::vector<float> probabilities, dscores;  // each thread's scratch, kept between calls
        probabilities.resize(size_t(std::min(Nq, attention_block_rows)) * Nk);
        dscores.resize(probabilities.size());
        for (int h = g * (H / G); h < (g + 1) * (H / G); ++h)
            for (int i0 = 0; i0 < Nq; i0 += attention_block_rows) {
                const int rows = std::min(attention_block_rows, Nq - i0), keys = attention_block_keys(i0, rows, Nq, Nk, causal);
                const size_t q_block = h * q_head + size_t(i0) * hd, block_size = size_t(rows) * hd;
                const std::span<const float> q_b = q.subspan(q_block, block_size), dout_b = dout.subspan(q_block, block_size);
                const std::span<const float> k_g = k.subspan(g * kv_head, size_t(keys) * hd), v_g = v.subspan(g * kv_head, size_t(keys) * hd);
                matmul_forward(probabilities, q_b, k_g, rows, hd, keys);                                                     // S
                attention_probabilities(probabilities, lse.subspan(size_t(h) * Nq + i0, rows), scale, rows, keys, causal);  // P
                matmul_forward(dscores, dout_b, v_g, rows, hd, keys);                                                        // dP = dO V^T
                for (int i = 0; i < rows; ++i) {
                    const float delta = dot(&dout_b[size_t(i) * hd], &out[q_block + size_t(i) * hd], hd);
                    for (int j = 0; j < keys; ++j) {
                        float& ds = dscores[size_t(i) * keys + j];
                        ds = probabilities[size_t(i) * keys + j] * (ds - delta) * scale;
                    }
                }
                gemm(&dq[q_block], dscores.data(), keys, 1, k_g.data(), hd, 1, rows, keys, hd, true);             // dQ += dS K
                gemm(&dk[g * kv_head], dscores.data(), 1, keys, q_b.data(), hd, 1, keys, rows, hd, true);         // dK += dS^T Q
                gemm(&dv[g * kv_head], probabilities.data(), 1, keys, dout_b.data(), hd, 1, keys, rows, hd, true);  // dV += P^T dO
            }
    });
}

// Batched over B sequences of equal length: q [B, H, Nq, hd], k, v [B, G, Nk, hd] -> [B, H, Nq, hd].
Tensor& attention(Tape& tape, Tensor& q, Tensor& k, Tensor& v) {
    const int B = q.shape[0], H = q.shape[1], Nq = q.shape[2], hd = q.shape[3], G = k.shape[1], Nk = k.shape[2];
    Tensor& out = tape.make(q.shape);
    Tensor& lse = tape.make({B, H, Nq}, true);
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

// With a KV cache (inference, one sequence): the new keys and values k, v [1, G, Nq, hd] are written to the
// cache at positions pos0 .. pos0+Nq-1, then the Nq queries attend to all pos0 + Nq cached positions (the
// causal rule with the ends aligned lets query i see cached positions <= pos0 + i). No backward.
Tensor& cached_attention(Tape& tape, Tensor& q, Tensor& k, Tensor& v, std::vector<float>& cache_keys, std::vector<float>& cache_values,
                         const int pos0, const int max_T) {
    const int H = q.shape[1], Nq = q.shape[2], hd = q.shape[3], G = k.shape[1];
    check(q.shape[0] == 1 && !tape.record, "the KV cache serves one sequence at inference");
    for (int g = 0; g < G; ++g) {
        std::copy_n(&k.data[size_t(g) * Nq * hd], size_t(Nq) * hd, &cache_keys[(size_t(g) * max_T + pos0) * hd]);
        std::copy_n(&v.data[size_t(g) * Nq * hd], size_t(Nq) * hd, &cache_values[(size_t(g) * max_T + pos0) * hd]);
    }
    Tensor& out = tape.make(q.shape);
    Tensor& lse = tape.make({1, H, Nq}, true);
    attention_forward(out.data, lse.data, q.data, cache_keys, cache_values, H, G, Nq, pos0 + Nq, hd, true, size_t(max_T) * hd);
    return out;
}

// ==== 9. Model ====
// The GPT of DESIGN.md §3, a pre-norm decoder in the Llama / DeepSeek-V3 style without biases:
//   x = embed[tokens]
//   x = x + attention(rms_norm(x)),  x = x + ffn(rms_norm(x))     for each layer
//   logits = rms_norm(x) @ W_lm_head^T                              (W_lm_head = embed when tied)
// where ffn is the dense SwiGLU MLP, or in MoE layers a mixture of experts (see below).
// Initialisation (§4): matrices ~ N(0, 0.02), the projections that write into the residual stream
// (o_proj and every down_proj) ~ N(0, 0.02 / sqrt(2L)), norm weights 1, routing biases 0, drawn in the order
// of model_parameters().

constexpr float init_std = 0.02f;

// A SwiGLU MLP of hidden size F: ffn(x) = W_down (silu(W_gate x) * (W_up x)).
struct SwiGLU {
    Tensor w_gate;     // [F, D]       gate_proj
    Tensor w_up;       // [F, D]       up_proj
    Tensor w_down;     // [D, F]       down_proj
};

// The feed-forward of an MoE layer: a router that picks K of E experts per token, the experts (SwiGLU MLPs
// of hidden size Fe) and, when S > 0, a shared expert of hidden size S*Fe that every token goes through.
struct MixtureOfExperts {
    Tensor router;                // [E, D]   mlp.gate.weight
    Tensor router_bias;           // [E]      mlp.gate.e_score_correction_bias: only chooses, never weighs; no gradient
    std::vector<SwiGLU> experts;  //          mlp.experts.{e}.{gate,up,down}_proj
    SwiGLU shared;                //          mlp.shared_experts.{gate,up,down}_proj (empty when S = 0)
    std::vector<int> counts;      // [E] tokens routed to each expert by the last forward pass (a token counts K times)
};

struct Layer {
    Tensor attn_norm;  // [D]          input_layernorm
    Tensor wq;         // [H*hd, D]    q_proj
    Tensor wk;         // [G*hd, D]    k_proj
    Tensor wv;         // [G*hd, D]    v_proj
    Tensor wo;         // [D, H*hd]    o_proj
    Tensor ffn_norm;   // [D]          post_attention_layernorm
    SwiGLU mlp;        //              mlp.{gate,up,down}_proj: dense layers
    MixtureOfExperts moe;  //          MoE layers (ModelConfig::is_moe_layer)
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
    bool is_trained = true;    // false for the routing bias, which balancing moves instead of the optimizer
};

void add_swiglu_parameters(std::vector<Parameter>& params, const std::string& prefix, SwiGLU& mlp) {
    params.push_back({prefix + "gate_proj.weight", &mlp.w_gate, true});
    params.push_back({prefix + "up_proj.weight", &mlp.w_up, true});
    params.push_back({prefix + "down_proj.weight", &mlp.w_down, true});
}

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
        if (!model.config.is_moe_layer(static_cast<int>(l))) {
            add_swiglu_parameters(params, prefix + "mlp.", layer.mlp);
            continue;
        }
        params.push_back({prefix + "mlp.gate.weight", &layer.moe.router, true});
        params.push_back({prefix + "mlp.gate.e_score_correction_bias", &layer.moe.router_bias, false, false});
        for (size_t e = 0; e < layer.moe.experts.size(); ++e)
            add_swiglu_parameters(params, prefix + "mlp.experts." + std::to_string(e) + ".", layer.moe.experts[e]);
        if (model.config.n_shared_experts > 0) add_swiglu_parameters(params, prefix + "mlp.shared_experts.", layer.moe.shared);
    }
    params.push_back({"model.norm.weight", &model.final_norm, false});
    if (!model.config.tie_embeddings) params.push_back({"lm_head.weight", &model.lm_head, true});
    return params;
}

// The parameters the optimizer updates (all but the routing biases), in model_parameters() order.
std::vector<Parameter> trained_parameters(Model& model) {
    std::vector<Parameter> params = model_parameters(model);
    std::erase_if(params, [](const Parameter& p) { return !p.is_trained; });
    return params;
}

SwiGLU make_swiglu(const int D, const int F) {
    return {make_tensor({F, D}, true), make_tensor({F, D}, true), make_tensor({D, F}, true)};
}

// Allocates every parameter (values zero, gradients zero; the routing bias has no gradient) with the shapes of §6.
Model make_model(const ModelConfig& config) {
    validate_model_config(config);
    const int V = config.vocab_size, D = config.dim, hd = config.head_dim(), E = config.n_experts;
    const int q_dim = config.n_heads * hd, kv_dim = config.n_kv_heads * hd;
    Model model;
    model.config = config;
    model.embed = make_tensor({V, D}, true);
    for (int l = 0; l < config.n_layers; ++l) {
        Layer layer{make_tensor({D}, true), make_tensor({q_dim, D}, true), make_tensor({kv_dim, D}, true),
                    make_tensor({kv_dim, D}, true), make_tensor({D, q_dim}, true), make_tensor({D}, true), {}, {}};
        if (!config.is_moe_layer(l)) {
            layer.mlp = make_swiglu(D, config.ffn_dim);
        } else {
            layer.moe.router = make_tensor({E, D}, true);
            layer.moe.router_bias = make_tensor({E}, false);
            for (int e = 0; e < E; ++e) layer.moe.experts.push_back(make_swiglu(D, config.expert_ffn_dim));
            if (config.n_shared_experts > 0) layer.moe.shared = make_swiglu(D, config.n_shared_experts * config.expert_ffn_dim);
            layer.moe.counts.assign(E, 0);
        }
        model.layers.push_back(std::move(layer));
    }
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
        for (float& value : p.tensor->data) value = p.is_matrix ? std * rng.normal() : p.is_trained ? 1.0f : 0.0f;
    }
}

// The KV cache (DESIGN.md §5): per layer, the keys and values of every position seen so far, [G, max_T, hd].
// G, not H: with grouped-query attention the cache is H/G times smaller than one K and V per query head.
struct KvCache {
    int length = 0;                                 // positions 0 .. length-1 are filled
    int max_T = 0;                                  // the model's context
    std::vector<std::vector<float>> keys, values;   // per layer, [G, max_T, hd]
};

KvCache make_kv_cache(const ModelConfig& c) {
    KvCache cache;
    cache.max_T = c.context;
    const size_t size = size_t(c.n_kv_heads) * c.context * c.head_dim();
    cache.keys.assign(c.n_layers, std::vector<float>(size, 0.0f));
    cache.values.assign(c.n_layers, std::vector<float>(size, 0.0f));
    return cache;
}

// x: [N, D] -> W_down (silu(W_gate x) * (W_up x)): [N, D], for each of the N rows.
Tensor& swiglu(Tape& tape, Tensor& x, SwiGLU& mlp) {
    Tensor& gate = silu(tape, matmul(tape, x, mlp.w_gate));
    Tensor& hidden = mul(tape, gate, matmul(tape, x, mlp.w_up));
    return matmul(tape, hidden, mlp.w_down);
}

// ---- Mixture of experts (DESIGN.md §3, DeepSeek-V3) ----
// Each token x (a row of the normed residual stream) is sent to K of E experts:
//   router logits  r = W_router x                                 [E]
//   scores         s_e = sigmoid(r_e)   or   p_e = softmax(r)_e
//   choice         the K experts with the largest s_e + b_e       (sigmoid; b is the routing bias, it only chooses)
//                  the K experts with the largest p_e             (softmax)
//   gates          g_e = s_e / sum_{chosen} s_e'                   (the chosen scores, renormalised)
//   output         y = shared(x) + sum_{chosen} g_e expert_e(x)
// Dispatch by expert: the N*K (token, expert) choices are gathered into one [N*K, D] batch sorted by expert,
// so that the rows of expert e are contiguous; each expert's SwiGLU runs as three matmuls on its slice of the
// batch (a grouped matmul), and the gated outputs are added back into their tokens' rows. The work grows with
// K (every token runs K experts), not with E, and the batch has the same shape at every step. The choice itself has no gradient; the gates do, so the router
// learns through them. Balancing keeps experts evenly loaded: sigmoid scoring moves the bias after each
// optimizer step (b_e += gamma sign(mean c - c_e), c_e = tokens routed to e in the batch); softmax scoring adds
// the Switch loss alpha E sum_e f_e P_e (f_e the share of the N*K choices that went to e, P_e the mean of p_e).

// Scores, row by row.  sigmoid: ds -> dr = ds s (1 - s).  softmax: dr = p (dp - sum_j dp_j p_j).
void expert_scores_forward(std::span<float> scores, std::span<const float> logits, const int N, const int E, const bool softmax) {
    for (int n = 0; n < N; ++n) {
        const float* r = &logits[size_t(n) * E];
        float* s = &scores[size_t(n) * E];
        if (!softmax) {
            for (int e = 0; e < E; ++e) s[e] = sigmoid(r[e]);
            continue;
        }
        const float max = *std::max_element(r, r + E);
        float sum = 0.0f;
        for (int e = 0; e < E; ++e) sum += s[e] = fast_exp(r[e] - max);
        for (int e = 0; e < E; ++e) s[e] /= sum;
    }
}
void expert_scores_backward(std::span<float> dlogits, std::span<const float> dscores, std::span<const float> scores, const int N,
                            const int E, const bool softmax) {
    for (int n = 0; n < N; ++n) {
        const float* s = &scores[size_t(n) * E];
        const float* ds = &dscores[size_t(n) * E];
        float* dr = &dlogits[size_t(n) * E];
        float weighted = 0.0f;
        if (softmax)
            for (int e = 0; e < E; ++e) weighted += ds[e] * s[e];
        for (int e = 0; e < E; ++e) dr[e] += softmax ? s[e] * (ds[e] - weighted) : ds[e] * s[e] * (1.0f - s[e]);
    }
}

Tensor& expert_scores(Tape& tape, Tensor& logits, const bool softmax) {
    const int N = logits.shape[0], E = logits.shape[1];
    Tensor& scores = tape.make(logits.shape);
    expert_scores_forward(scores.data, logits.data, N, E, softmax);
    tape.on_backward([&scores, &logits, N, E, softmax] { expert_scores_backward(logits.grad, scores.grad, scores.data, N, E, softmax); });
    return scores;
}

// Which experts each token chose, and where each choice sits in the batch sorted by expert.
struct Routing {
    int N = 0, K = 0;
    std::vector<int> expert;               // [N, K]: token n's k-th expert (largest key first)
    std::vector<int> row;                  // [N, K]: the row of token n in expert[n, k]'s slice
    std::vector<std::vector<int>> tokens;  // per expert, the tokens routed to it, in increasing order
    std::vector<int> offsets;              // [E + 1]: expert e's slice is rows offsets[e] .. offsets[e+1] - 1

    int sorted_row(const int n, const int k) const { return offsets[expert[size_t(n) * K + k]] + row[size_t(n) * K + k]; }
};

// For each token the K experts with the largest key s_e + b_e (b empty: no bias); ties go to the lower index.
Routing choose_experts(std::span<const float> scores, std::span<const float> bias, const int N, const int E, const int K) {
    Routing routing{N, K, std::vector<int>(size_t(N) * K), std::vector<int>(size_t(N) * K), std::vector<std::vector<int>>(E),
                    std::vector<int>(E + 1, 0)};
    std::vector<int> order(E);
    std::vector<float> key(E);
    for (int n = 0; n < N; ++n) {
        for (int e = 0; e < E; ++e) key[e] = scores[size_t(n) * E + e] + (bias.empty() ? 0.0f : bias[e]);
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + K, order.end(),
                          [&](const int a, const int b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
        for (int k = 0; k < K; ++k) {
            const int e = order[k];
            routing.expert[size_t(n) * K + k] = e;
            routing.row[size_t(n) * K + k] = static_cast<int>(routing.tokens[e].size());
            routing.tokens[e].push_back(n);
        }
    }
    for (int e = 0; e < E; ++e) routing.offsets[e + 1] = routing.offsets[e] + static_cast<int>(routing.tokens[e].size());
    return routing;
}

// gates [N, K]: g_nk = s_{n,e_k} / S_n with S_n = sum_j s_{n,e_j}.
// Backward (quotient rule): ds_{n,e_k} += (dg_nk - sum_j dg_nj g_nj) / S_n.
Tensor& expert_gates(Tape& tape, Tensor& scores, std::shared_ptr<const Routing> routing) {
    const int N = routing->N, K = routing->K, E = scores.shape[1];
    Tensor& gates = tape.make({N, K});
    Tensor& sums = tape.make({N}, true);  // S_n, saved for backward
    for (int n = 0; n < N; ++n) {
        float sum = 0.0f;
        for (int k = 0; k < K; ++k) sum += scores.data[size_t(n) * E + routing->expert[size_t(n) * K + k]];
        sums.data[n] = sum;
        for (int k = 0; k < K; ++k) gates.data[size_t(n) * K + k] = scores.data[size_t(n) * E + routing->expert[size_t(n) * K + k]] / sum;
    }
    tape.on_backward([&gates, &sums, &scores, routing, N, K, E] {
        for (int n = 0; n < N; ++n) {
            float weighted = 0.0f;
            for (int k = 0; k < K; ++k) weighted += gates.grad[size_t(n) * K + k] * gates.data[size_t(n) * K + k];
            for (int k = 0; k < K; ++k)
                scores.grad[size_t(n) * E + routing->expert[size_t(n) * K + k]] += (gates.grad[size_t(n) * K + k] - weighted) / sums.data[n];
        }
    });
    return gates;
}

// The batch sorted by expert, [N*K, D]: row sorted_row(n, k) = x[n].  dx[n] += sum_k dout[sorted_row(n, k)],
// summed per token in k order (each token's K rows are added by one thread).
Tensor& gather_by_expert(Tape& tape, Tensor& x, std::shared_ptr<const Routing> routing) {
    const int N = routing->N, K = routing->K, D = x.shape[1];
    Tensor& out = tape.make({N * K, D});
    parallel_rows(N, K * D, [&](int begin, int end) {
        for (int n = begin; n < end; ++n)
            for (int k = 0; k < K; ++k) std::copy_n(&x.data[size_t(n) * D], D, &out.data[size_t(routing->sorted_row(n, k)) * D]);
    });
    tape.on_backward([&out, &x, routing, N, K, D] {
        parallel_rows(N, K * D, [&](int begin, int end) {
            for (int n = begin; n < end; ++n)
                for (int k = 0; k < K; ++k) {
                    const float* dout = &out.grad[size_t(routing->sorted_row(n, k)) * D];
                    for (int d = 0; d < D; ++d) x.grad[size_t(n) * D + d] += dout[d];
                }
        });
    });
    return out;
}

// Grouped matmul: out[rows of e] = x[rows of e] @ W_e^T for every expert e, on the batch sorted by expert.
// x: [N*K, in], weights[e]: [out, in] -> [N*K, out]. Backward per slice, as matmul: dx_e += dout_e W_e, dW_e += dout_e^T x_e.
Tensor& grouped_matmul(Tape& tape, Tensor& x, std::vector<Tensor*> weights, std::shared_ptr<const Routing> routing) {
    const int rows = x.shape[0], K_in = x.shape[1], M = weights[0]->shape[0];
    Tensor& out = tape.make({rows, M});
    const auto slice = [routing](std::vector<float>& t, const size_t e, const int width) {
        return std::span<float>(t).subspan(size_t(routing->offsets[e]) * width, size_t(routing->offsets[e + 1] - routing->offsets[e]) * width);
    };
    for (size_t e = 0; e < weights.size(); ++e)
        if (const int n = routing->offsets[e + 1] - routing->offsets[e]; n > 0)
            matmul_forward(slice(out.data, e, M), slice(x.data, e, K_in), weights[e]->data, n, K_in, M);
    tape.on_backward([&out, &x, weights, routing, slice, K_in, M] {
        for (size_t e = 0; e < weights.size(); ++e)
            if (const int n = routing->offsets[e + 1] - routing->offsets[e]; n > 0)
                matmul_backward(slice(x.grad, e, K_in), weights[e]->grad, slice(out.grad, e, M), slice(x.data, e, K_in), weights[e]->data, n, K_in, M);
    });
    return out;
}

// y_n = sum_k g_nk out[sorted_row(n, k)], [N, D].  Backward: dout[sorted_row(n, k)] = g_nk dy_n,  dg_nk += dy_n . out[sorted_row(n, k)].
Tensor& combine_experts(Tape& tape, Tensor& expert_out, Tensor& gates, std::shared_ptr<const Routing> routing) {
    const int N = routing->N, K = routing->K, D = expert_out.shape[1];
    Tensor& y = tape.make({N, D});
    parallel_rows(N, 2.0 * K * D, [&](int begin, int end) {
        for (int n = begin; n < end; ++n) {
            float* y_n = &y.data[size_t(n) * D];
            std::fill(y_n, y_n + D, 0.0f);
            for (int k = 0; k < K; ++k) {
                const float g = gates.data[size_t(n) * K + k];
                const float* out = &expert_out.data[size_t(routing->sorted_row(n, k)) * D];
                for (int d = 0; d < D; ++d) y_n[d] += g * out[d];
            }
        }
    });
    tape.on_backward([&y, &expert_out, &gates, routing, N, K, D] {
        parallel_rows(N, 4.0 * K * D, [&](int begin, int end) {
            for (int n = begin; n < end; ++n) {
                const float* dy = &y.grad[size_t(n) * D];
                for (int k = 0; k < K; ++k) {
                    const size_t row = size_t(routing->sorted_row(n, k)) * D;
                    const float g = gates.data[size_t(n) * K + k];
                    gates.grad[size_t(n) * K + k] += dot(dy, &expert_out.data[row], D);
                    for (int d = 0; d < D; ++d) expert_out.grad[row + d] += g * dy[d];
                }
            }
        });
    });
    return y;
}

// The Switch balancing loss of one layer (softmax scoring): alpha E sum_e f_e P_e, with f_e = c_e / (N K) and
// P_e = (1/N) sum_n p_ne. f is a count and has no gradient, so dp_ne += dloss alpha E f_e / N.
Tensor& switch_balance_loss(Tape& tape, Tensor& probs, std::shared_ptr<const Routing> routing, const float alpha) {
    const int N = probs.shape[0], E = probs.shape[1], K = routing->K;
    Tensor& loss = tape.make({1});
    std::vector<float> weight(E);  // alpha E f_e / N = d loss / d p_ne
    double total = 0.0;
    for (int e = 0; e < E; ++e) {
        weight[e] = alpha * E * float(routing->tokens[e].size()) / float(size_t(N) * K) / float(N);
        for (int n = 0; n < N; ++n) total += double(weight[e]) * probs.data[size_t(n) * E + e];
    }
    loss.data[0] = static_cast<float>(total);
    tape.on_backward([&loss, &probs, weight, N, E] {
        for (int n = 0; n < N; ++n)
            for (int e = 0; e < E; ++e) probs.grad[size_t(n) * E + e] += loss.grad[0] * weight[e];
    });
    return loss;
}

// Training collects the balancing loss of every softmax-scored MoE layer here and adds them to the loss.
struct BalanceLoss {
    float alpha = 0.0f;
    std::vector<Tensor*> terms;
};

// x: [N, D] -> the MoE feed-forward, [N, D]. Records each expert's load in moe.counts.
Tensor& moe_forward(Tape& tape, Tensor& x, MixtureOfExperts& moe, const ModelConfig& c, BalanceLoss* balance) {
    const int N = x.shape[0], E = c.n_experts;
    const bool softmax = c.scoring == "softmax";
    Tensor& scores = expert_scores(tape, matmul(tape, x, moe.router), softmax);
    const auto routing = std::make_shared<const Routing>(
        choose_experts(scores.data, softmax ? std::span<const float>() : std::span<const float>(moe.router_bias.data), N, E, c.top_k_experts));
    Tensor& gates = expert_gates(tape, scores, routing);
    for (int e = 0; e < E; ++e) moe.counts[e] = static_cast<int>(routing->tokens[e].size());
    // Every expert's SwiGLU, each on its slice of the batch sorted by expert.
    std::vector<Tensor*> w_gate, w_up, w_down;
    for (SwiGLU& expert : moe.experts) w_gate.push_back(&expert.w_gate), w_up.push_back(&expert.w_up), w_down.push_back(&expert.w_down);
    Tensor& sorted = gather_by_expert(tape, x, routing);
    Tensor& hidden = mul(tape, silu(tape, grouped_matmul(tape, sorted, w_gate, routing)), grouped_matmul(tape, sorted, w_up, routing));
    Tensor* y = &combine_experts(tape, grouped_matmul(tape, hidden, w_down, routing), gates, routing);
    if (c.n_shared_experts > 0) y = &add(tape, *y, swiglu(tape, x, moe.shared));
    if (balance && softmax && balance->alpha > 0.0f) balance->terms.push_back(&switch_balance_loss(tape, scores, routing, balance->alpha));
    return *y;
}

// Auxiliary-loss-free balancing (sigmoid scoring), after each optimizer step: b_e += gamma sign(mean c - c_e),
// with the counts of that step's batch. Overloaded experts become less likely to be chosen, idle ones more.
void update_routing_biases(Model& model, const float gamma) {
    if (model.config.n_experts == 0 || model.config.scoring != "sigmoid") return;
    for (int l = 0; l < model.config.n_layers; ++l) {
        if (!model.config.is_moe_layer(l)) continue;
        MixtureOfExperts& moe = model.layers[l].moe;
        const double mean = std::accumulate(moe.counts.begin(), moe.counts.end(), 0.0) / model.config.n_experts;
        for (int e = 0; e < model.config.n_experts; ++e)
            moe.router_bias.data[e] += gamma * float((mean > moe.counts[e]) - (mean < moe.counts[e]));
    }
}

// tokens: [B*T] -> logits: [B*T, V]. Every step is an op recorded on the tape (when it records), so the
// same function serves training (with backward), evaluation, and inference with a KV cache: then B = 1, the
// tokens sit at positions cache.length .. cache.length + T - 1, attend to the cached ones, and are added to it.
// In training, balance collects the MoE balancing loss terms (softmax scoring).
Tensor& model_forward(Tape& tape, Model& model, std::span<const int> tokens, const int B, const int T, KvCache* cache = nullptr,
                      BalanceLoss* balance = nullptr) {
    const ModelConfig& c = model.config;
    const int pos0 = cache ? cache->length : 0;
    check(tokens.size() == size_t(B) * T, "model_forward: expected B*T tokens");
    check(pos0 + T <= c.context, "positions up to " + std::to_string(pos0 + T) + " do not fit the model's context of " + std::to_string(c.context));
    Tensor* x = &embedding(tape, model.embed, tokens);
    for (size_t l = 0; l < model.layers.size(); ++l) {
        Layer& layer = model.layers[l];
        // attention block: x = x + o_proj(attention(rope(q), rope(k), v))
        Tensor& h = rms_norm(tape, *x, layer.attn_norm, c.norm_eps);
        Tensor& q = rope(tape, heads_split(tape, matmul(tape, h, layer.wq), B, T, c.n_heads), pos0, c.rope_theta);
        Tensor& k = rope(tape, heads_split(tape, matmul(tape, h, layer.wk), B, T, c.n_kv_heads), pos0, c.rope_theta);
        Tensor& v = heads_split(tape, matmul(tape, h, layer.wv), B, T, c.n_kv_heads);
        Tensor& attended = heads_merge(tape, cache ? cached_attention(tape, q, k, v, cache->keys[l], cache->values[l], pos0, cache->max_T)
                                                   : attention(tape, q, k, v));
        x = &add(tape, *x, matmul(tape, attended, layer.wo));
        // feed-forward block: x = x + ffn(h), the dense MLP down_proj(silu(gate_proj(h)) * up_proj(h)) or the experts
        Tensor& h2 = rms_norm(tape, *x, layer.ffn_norm, c.norm_eps);
        x = &add(tape, *x, c.is_moe_layer(static_cast<int>(l)) ? moe_forward(tape, h2, layer.moe, c, balance) : swiglu(tape, h2, layer.mlp));
    }
    if (cache) cache->length += T;
    Tensor& final = rms_norm(tape, *x, model.final_norm, c.norm_eps);
    return matmul(tape, final, c.tie_embeddings ? model.embed : model.lm_head);
}

// "L4 D64 H4 G4 F256 T32 V28": the shape in DESIGN.md's letters.
std::string describe_model(const ModelConfig& c) {
    return "L" + std::to_string(c.n_layers) + " D" + std::to_string(c.dim) + " H" + std::to_string(c.n_heads) + " G" +
           std::to_string(c.n_kv_heads) + " F" + std::to_string(c.ffn_dim) + " T" + std::to_string(c.context) + " V" +
           std::to_string(c.vocab_size) + (c.tie_embeddings ? " tied" : "") +
           (c.n_experts == 0 ? "" : " MoE E" + std::to_string(c.n_experts) + " K" + std::to_string(c.top_k_experts) + " S" +
                                        std::to_string(c.n_shared_experts) + " Fe" + std::to_string(c.expert_ffn_dim) + " " + c.scoring +
                                        (c.dense_layers > 0 ? " dense-layers " + std::to_string(c.dense_layers) : ""));
}

size_t count_parameters(Model& model) {
    size_t n = 0;
    for (const Parameter& p : model_parameters(model)) n += p.tensor->numel();
    return n;
}

// The parameters one token uses: all, minus the E - K routed experts it does not run in each MoE layer.
size_t count_active_parameters(Model& model) {
    const ModelConfig& c = model.config;
    size_t unused = 0;
    for (int l = 0; l < c.n_layers; ++l)
        if (c.is_moe_layer(l)) unused += size_t(c.n_experts - c.top_k_experts) * 3 * c.dim * c.expert_ffn_dim;
    return count_parameters(model) - unused;
}

// ==== 10. Checkpoint: safetensors (DESIGN.md §6) ====
// File = 8-byte little-endian header length N, N bytes of JSON header, then the raw tensor bytes. Each header
// entry gives dtype "F32", shape and data_offsets [begin, end) into the byte buffer; "__metadata__" holds the
// config, the tokenizer and "format": "gpt.cpp". Reading trusts nothing: every offset, size and name is checked.
// Writing goes to a temporary file that is renamed over the target, so a crash never leaves half a checkpoint.

// A small JSON value and a recursive-descent parser: enough for safetensors headers and our metadata.
struct Json;
using JsonArray = std::vector<Json>;
using JsonObject = std::vector<std::pair<std::string, Json>>;
struct Json {
    std::variant<std::nullptr_t, bool, double, std::string, JsonArray, JsonObject> value;

    const Json* find(const std::string_view key) const {
        if (const auto* object = std::get_if<JsonObject>(&value))
            for (const auto& [name, member] : *object)
                if (name == key) return &member;
        return nullptr;
    }
};

struct JsonParser {
    std::string_view text;
    size_t pos = 0;

    void fail(const std::string& what) const { throw Error("invalid JSON at byte " + std::to_string(pos) + ": " + what); }
    void skip_space() {
        while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\n' || text[pos] == '\r' || text[pos] == '\t')) ++pos;
    }
    bool consume(const char c) {
        skip_space();
        if (pos < text.size() && text[pos] == c) return ++pos, true;
        return false;
    }
    void expect(const char c) {
        if (!consume(c)) fail(std::string("expected '") + c + "'");
    }
    unsigned parse_hex4() {
        if (pos + 4 > text.size()) fail("short \\u escape");
        unsigned value = 0;
        for (int i = 0; i < 4; ++i) {
            const char c = text[pos++];
            const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (digit < 0) fail("bad \\u escape");
            value = value * 16 + digit;
        }
        return value;
    }
    std::string parse_string() {
        expect('"');
        std::string out;
        while (true) {
            if (pos >= text.size()) fail("unterminated string");
            const char c = text[pos++];
            if (c == '"') return out;
            if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos >= text.size()) fail("unterminated escape");
            const char e = text[pos++];
            const std::string_view simple = "\"\\/bfnrt", replaced = "\"\\/\b\f\n\r\t";
            if (const size_t at = simple.find(e); at != std::string_view::npos) {
                out += replaced[at];
            } else if (e == 'u') {
                char32_t code = parse_hex4();
                if (code >= 0xD800 && code <= 0xDBFF) {  // a surrogate pair encodes one code point above U+FFFF
                    if (text.substr(pos, 2) != "\\u") fail("lone surrogate");
                    pos += 2;
                    const unsigned low = parse_hex4();
                    if (low < 0xDC00 || low > 0xDFFF) fail("bad surrogate pair");
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                } else if (code >= 0xDC00 && code <= 0xDFFF) {
                    fail("lone surrogate");
                }
                out += utf8_encode(code);
            } else {
                fail("unknown escape");
            }
        }
    }
    Json parse_value(const int depth) {
        if (depth > 64) fail("nested too deeply");
        skip_space();
        if (pos >= text.size()) fail("unexpected end");
        const char c = text[pos];
        if (c == '"') return {parse_string()};
        if (c == '{') {
            ++pos;
            JsonObject object;
            if (consume('}')) return {std::move(object)};
            do {
                skip_space();
                std::string key = parse_string();
                expect(':');
                object.emplace_back(std::move(key), parse_value(depth + 1));
            } while (consume(','));
            expect('}');
            return {std::move(object)};
        }
        if (c == '[') {
            ++pos;
            JsonArray array;
            if (consume(']')) return {std::move(array)};
            do array.push_back(parse_value(depth + 1));
            while (consume(','));
            expect(']');
            return {std::move(array)};
        }
        for (const auto& [word, value] : {std::pair<std::string_view, Json>{"true", {true}}, {"false", {false}}, {"null", {nullptr}}})
            if (text.substr(pos, word.size()) == word) return pos += word.size(), value;
        const size_t start = pos;
        while (pos < text.size() && std::string_view("+-0123456789.eE").find(text[pos]) != std::string_view::npos) ++pos;
        const std::string number(text.substr(start, pos - start));
        char* end = nullptr;
        const double value = number.empty() ? 0.0 : std::strtod(number.c_str(), &end);
        if (number.empty() || end != number.c_str() + number.size()) fail("expected a value");
        return {value};
    }
};

Json parse_json(const std::string_view text) {
    JsonParser parser{text};
    Json value = parser.parse_value(0);
    parser.skip_space();
    if (parser.pos != text.size()) parser.fail("trailing characters");
    return value;
}

// Parses JSON found inside a checkpoint; a syntax error says which part it was ("checkpoint 'm': config").
Json parse_json_in(const std::string_view text, const std::string& what) {
    try {
        return parse_json(text);
    } catch (const Error& e) {
        throw Error(what + " is not valid JSON (" + e.what() + ")");
    }
}

std::string json_quote(const std::string_view s) {
    std::string out = "\"";
    for (const char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += c;
        } else if (static_cast<unsigned char>(c) < 0x20) {
            char escape[8];
            std::snprintf(escape, sizeof escape, "\\u%04x", static_cast<unsigned>(c));
            out += escape;
        } else {
            out += c;
        }
    }
    return out + "\"";
}

// Shortest decimal text that reads back as the same float.
std::string float_text(const float value) {
    char text[32];
    for (int digits = 6; digits <= 9; ++digits) {
        std::snprintf(text, sizeof text, "%.*g", digits, double(value));
        if (std::strtof(text, nullptr) == value) break;
    }
    return text;
}

// Typed accessors that turn a malformed header into a clear message.
double json_number(const Json* value, const std::string& what) {
    check(value && std::holds_alternative<double>(value->value), what + " is missing or not a number");
    return std::get<double>(value->value);
}
int json_int(const Json* value, const std::string& what) {
    const double number = json_number(value, what);
    check(number == std::floor(number) && std::abs(number) < 1e9, what + " is not an integer");
    return static_cast<int>(number);
}
const std::string& json_string(const Json* value, const std::string& what) {
    check(value && std::holds_alternative<std::string>(value->value), what + " is missing or not a string");
    return std::get<std::string>(value->value);
}

struct NamedBuffer {
    std::string name;
    std::vector<int> shape;
    std::span<const float> values;
};

void write_safetensors(const std::string& path, const std::vector<NamedBuffer>& tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata) {
    std::string header = "{\"__metadata__\":{";
    for (size_t i = 0; i < metadata.size(); ++i)
        header += (i ? "," : "") + json_quote(metadata[i].first) + ":" + json_quote(metadata[i].second);
    header += "}";
    size_t offset = 0;
    for (const NamedBuffer& t : tensors) {
        check(t.values.size() == shape_numel(t.shape), "tensor '" + t.name + "': shape does not match its size");
        header += "," + json_quote(t.name) + ":{\"dtype\":\"F32\",\"shape\":[";
        for (size_t d = 0; d < t.shape.size(); ++d) {
            if (d) header += ",";
            header += std::to_string(t.shape[d]);
        }
        const size_t bytes = t.values.size() * sizeof(float);
        header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + bytes) + "]}";
        offset += bytes;
    }
    header += "}";
    header.append((8 - header.size() % 8) % 8, ' ');  // the tensor bytes start 8-byte aligned

    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(uint64_t(header.size()) >> (8 * i));
    bytes += header;
    bytes.reserve(bytes.size() + offset);
    for (const NamedBuffer& t : tensors)
        for (const float value : t.values) {  // little-endian IEEE 754, byte by byte: right on any host
            uint32_t bits;
            std::memcpy(&bits, &value, 4);
            for (int i = 0; i < 4; ++i) bytes += static_cast<char>(bits >> (8 * i));
        }
    write_file_atomically(path, bytes);
}

struct SafetensorsFile {
    std::map<std::string, std::string> metadata;
    std::map<std::string, Tensor> tensors;  // values only, no gradients
};

SafetensorsFile read_safetensors(const std::string& path) {
    const std::string where = "checkpoint '" + path + "': ";
    check(std::filesystem::is_regular_file(path), where + "does not exist or is not a file");
    const std::string bytes = read_file(path);
    check(bytes.size() >= 8, where + "too short to be safetensors (" + std::to_string(bytes.size()) + " bytes)");
    uint64_t header_size = 0;
    for (int i = 0; i < 8; ++i) header_size |= uint64_t(static_cast<unsigned char>(bytes[i])) << (8 * i);
    check(header_size <= bytes.size() - 8, where + "header length " + std::to_string(header_size) + " runs past the end of the file (truncated or not safetensors)");
    const size_t buffer_start = 8 + header_size, buffer_size = bytes.size() - buffer_start;

    const Json header = parse_json_in(std::string_view(bytes.data() + 8, header_size), where + "header");
    check(std::holds_alternative<JsonObject>(header.value), where + "header is not a JSON object");

    SafetensorsFile result;
    std::vector<std::pair<size_t, size_t>> ranges;
    for (const auto& [name, entry] : std::get<JsonObject>(header.value)) {
        if (name == "__metadata__") {
            check(std::holds_alternative<JsonObject>(entry.value), where + "__metadata__ is not an object");
            for (const auto& [key, value] : std::get<JsonObject>(entry.value))
                result.metadata[key] = json_string(&value, where + "metadata '" + key + "'");
            continue;
        }
        const std::string what = where + "tensor '" + name + "'";
        check(!result.tensors.contains(name), what + " appears twice");
        check(json_string(entry.find("dtype"), what + " dtype") == "F32",
              what + " has dtype " + json_string(entry.find("dtype"), what + " dtype") + ", expected F32");
        const Json* shape = entry.find("shape");
        const Json* offsets = entry.find("data_offsets");
        check(shape && std::holds_alternative<JsonArray>(shape->value), what + " has no shape list");
        check(offsets && std::holds_alternative<JsonArray>(offsets->value) && std::get<JsonArray>(offsets->value).size() == 2,
              what + " has no [begin, end] data_offsets");
        Tensor tensor;
        for (const Json& d : std::get<JsonArray>(shape->value)) {
            tensor.shape.push_back(json_int(&d, what + " shape"));
            check(tensor.shape.back() >= 0, what + " has a negative dimension");
        }
        const double begin = json_number(&std::get<JsonArray>(offsets->value)[0], what + " offset");
        const double end = json_number(&std::get<JsonArray>(offsets->value)[1], what + " offset");
        check(begin >= 0 && begin <= end && end <= double(buffer_size) && begin == std::floor(begin) && end == std::floor(end),
              what + " data_offsets [" + std::to_string(uint64_t(begin)) + ", " + std::to_string(uint64_t(end)) +
                  "] fall outside the " + std::to_string(buffer_size) + "-byte data buffer");
        const size_t numel = shape_numel(tensor.shape);
        check(size_t(end - begin) == numel * sizeof(float), what + " has shape of " + std::to_string(numel) + " floats but " +
                                                                 std::to_string(size_t(end - begin)) + " bytes");
        ranges.emplace_back(size_t(begin), size_t(end));
        tensor.data.resize(numel);
        const char* source = bytes.data() + buffer_start + size_t(begin);
        for (size_t i = 0; i < numel; ++i) {
            const auto byte = [&](int j) { return uint32_t(static_cast<unsigned char>(source[4 * i + j])); };
            const uint32_t bits = byte(0) | byte(1) << 8 | byte(2) << 16 | byte(3) << 24;
            std::memcpy(&tensor.data[i], &bits, 4);
        }
        result.tensors.emplace(name, std::move(tensor));
    }
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); ++i)
        check(ranges[i].first >= ranges[i - 1].second, where + "two tensors' data_offsets overlap");
    return result;
}

// The model's config as the JSON of DESIGN.md §6 (Hugging Face Llama key names).
std::string config_to_json(const ModelConfig& c) {
    return "{\"vocab_size\":" + std::to_string(c.vocab_size) + ",\"hidden_size\":" + std::to_string(c.dim) +
           ",\"intermediate_size\":" + std::to_string(c.ffn_dim) + ",\"num_hidden_layers\":" + std::to_string(c.n_layers) +
           ",\"num_attention_heads\":" + std::to_string(c.n_heads) + ",\"num_key_value_heads\":" + std::to_string(c.n_kv_heads) +
           ",\"max_position_embeddings\":" + std::to_string(c.context) + ",\"rope_theta\":" + float_text(c.rope_theta) +
           ",\"rms_norm_eps\":" + float_text(c.norm_eps) + ",\"tie_word_embeddings\":" + (c.tie_embeddings ? "true" : "false") +
           (c.n_experts == 0 ? "" : ",\"n_routed_experts\":" + std::to_string(c.n_experts) + ",\"num_experts_per_tok\":" +
                                       std::to_string(c.top_k_experts) + ",\"n_shared_experts\":" + std::to_string(c.n_shared_experts) +
                                       ",\"moe_intermediate_size\":" + std::to_string(c.expert_ffn_dim) + ",\"scoring_func\":" +
                                       json_quote(c.scoring) + ",\"first_k_dense_replace\":" + std::to_string(c.dense_layers)) +
           "}";
}

ModelConfig config_from_json(const std::string& text, const std::string& where) {
    const Json json = parse_json_in(text, where + "config");
    ModelConfig c;
    c.vocab_size = json_int(json.find("vocab_size"), where + "config vocab_size");
    c.dim = json_int(json.find("hidden_size"), where + "config hidden_size");
    c.ffn_dim = json_int(json.find("intermediate_size"), where + "config intermediate_size");
    c.n_layers = json_int(json.find("num_hidden_layers"), where + "config num_hidden_layers");
    c.n_heads = json_int(json.find("num_attention_heads"), where + "config num_attention_heads");
    c.n_kv_heads = json_int(json.find("num_key_value_heads"), where + "config num_key_value_heads");
    c.context = json_int(json.find("max_position_embeddings"), where + "config max_position_embeddings");
    c.rope_theta = static_cast<float>(json_number(json.find("rope_theta"), where + "config rope_theta"));
    c.norm_eps = static_cast<float>(json_number(json.find("rms_norm_eps"), where + "config rms_norm_eps"));
    const Json* tie = json.find("tie_word_embeddings");
    check(tie && std::holds_alternative<bool>(tie->value), where + "config tie_word_embeddings is missing or not a boolean");
    c.tie_embeddings = std::get<bool>(tie->value);
    if (json.find("n_routed_experts")) {  // an MoE model (DESIGN.md §6)
        c.n_experts = json_int(json.find("n_routed_experts"), where + "config n_routed_experts");
        c.top_k_experts = json_int(json.find("num_experts_per_tok"), where + "config num_experts_per_tok");
        c.n_shared_experts = json_int(json.find("n_shared_experts"), where + "config n_shared_experts");
        c.expert_ffn_dim = json_int(json.find("moe_intermediate_size"), where + "config moe_intermediate_size");
        c.scoring = json_string(json.find("scoring_func"), where + "config scoring_func");
        c.dense_layers = json_int(json.find("first_k_dense_replace"), where + "config first_k_dense_replace");
    }
    try {
        validate_model_config(c);
    } catch (const Error& e) {
        throw Error(where + "bad config: " + e.what());
    }
    return c;
}

// {"type": "char", "chars": "..."} or {"type": "bpe", "merges": [[left, right], ...]} (DESIGN.md §6).
std::string tokenizer_to_json(const Tokenizer& tokenizer) {
    if (tokenizer.is_bpe) {
        std::string json = "{\"type\":\"bpe\",\"merges\":[";
        for (size_t r = 0; r < tokenizer.merges.size(); ++r)
            json += (r ? ",[" : "[") + std::to_string(tokenizer.merges[r].first) + "," + std::to_string(tokenizer.merges[r].second) + "]";
        return json + "]}";
    }
    std::string chars;
    for (const char32_t c : tokenizer.chars) chars += utf8_encode(c);
    return "{\"type\":\"char\",\"chars\":" + json_quote(chars) + "}";
}

Tokenizer tokenizer_from_json(const std::string& text, const std::string& where) {
    const Json json = parse_json_in(text, where + "tokenizer");
    const std::string type = json_string(json.find("type"), where + "tokenizer type");
    if (type == "bpe") {
        const Json* list = json.find("merges");
        check(list && std::holds_alternative<JsonArray>(list->value), where + "tokenizer merges is missing or not a list");
        std::vector<std::pair<int, int>> merges;
        for (const Json& merge : std::get<JsonArray>(list->value)) {
            const auto* pair = std::get_if<JsonArray>(&merge.value);
            check(pair && pair->size() == 2, where + "tokenizer merge " + std::to_string(merges.size()) + " is not a [left, right] pair");
            merges.emplace_back(json_int(&(*pair)[0], where + "tokenizer merge"), json_int(&(*pair)[1], where + "tokenizer merge"));
        }
        try {
            return make_bpe_tokenizer(std::move(merges));
        } catch (const Error& e) {
            throw Error(where + "tokenizer " + e.what());
        }
    }
    check(type == "char", where + "tokenizer type '" + type + "' is not supported (char or bpe)");
    const std::vector<char32_t> chars = utf8_decode(json_string(json.find("chars"), where + "tokenizer chars"));
    Tokenizer tokenizer = make_char_tokenizer(chars);
    check(tokenizer.chars.size() == chars.size(), where + "tokenizer chars repeat a character");
    return tokenizer;
}

void save_checkpoint(const std::string& path, Model& model, const Tokenizer& tokenizer, const std::vector<NamedBuffer>& extra_tensors = {},
                     const std::vector<std::pair<std::string, std::string>>& extra_metadata = {}) {
    std::vector<NamedBuffer> tensors;
    for (const Parameter& p : model_parameters(model)) tensors.push_back({p.name, p.tensor->shape, p.tensor->data});
    tensors.insert(tensors.end(), extra_tensors.begin(), extra_tensors.end());
    std::vector<std::pair<std::string, std::string>> metadata{
        {"format", "gpt.cpp"}, {"config", config_to_json(model.config)}, {"tokenizer", tokenizer_to_json(tokenizer)}};
    metadata.insert(metadata.end(), extra_metadata.begin(), extra_metadata.end());
    write_safetensors(path, tensors, metadata);
}

struct Checkpoint {
    Model model;
    Tokenizer tokenizer;
    std::map<std::string, std::string> metadata;
    std::map<std::string, Tensor> training_tensors;  // names starting with "optimizer."
};

// Loads and validates: the format tag, the config, the tokenizer (whose size must equal vocab_size),
// exactly the expected tensors with exactly the expected shapes. Training state is passed through.
Checkpoint load_checkpoint(const std::string& path) {
    const std::string where = "checkpoint '" + path + "': ";
    SafetensorsFile file = read_safetensors(path);
    check(file.metadata.contains("format") && file.metadata["format"] == "gpt.cpp", where + "not a gpt.cpp checkpoint (metadata format is not \"gpt.cpp\")");
    check(file.metadata.contains("config"), where + "metadata has no config");
    check(file.metadata.contains("tokenizer"), where + "metadata has no tokenizer");
    Checkpoint checkpoint;
    checkpoint.metadata = file.metadata;
    const ModelConfig config = config_from_json(file.metadata["config"], where);
    checkpoint.tokenizer = tokenizer_from_json(file.metadata["tokenizer"], where);
    check(checkpoint.tokenizer.vocab_size() == config.vocab_size, where + "tokenizer has " + std::to_string(checkpoint.tokenizer.vocab_size()) +
                                                                      " tokens but config vocab_size is " + std::to_string(config.vocab_size));
    checkpoint.model = make_model(config);
    for (const Parameter& p : model_parameters(checkpoint.model)) {
        const auto found = file.tensors.find(p.name);
        check(found != file.tensors.end(), where + "tensor '" + p.name + "' is missing");
        check(found->second.shape == p.tensor->shape, where + "tensor '" + p.name + "' has the wrong shape for the config");
        p.tensor->data = std::move(found->second.data);
        file.tensors.erase(found);
    }
    for (auto& [name, tensor] : file.tensors) {
        check(name.starts_with("optimizer."), where + "unexpected tensor '" + name + "'");
        checkpoint.training_tensors.emplace(name, std::move(tensor));
    }
    return checkpoint;
}

// ==== 11. Inference: prefill and decode with the KV cache ====
// Generation without a cache re-runs the whole window for every new token: O(T) positions of work per token.
// With the KV cache (DESIGN.md §5), prefill runs the prompt once, in one batched pass, and stores every
// position's keys and values; each decode step then runs only the newest token at the next position and
// attends to the cache, so a token costs one position's worth of matmuls plus attention over the cache.
// Both use model_forward, the same layer code as training. Positions are absolute (RoPE uses pos0 + t).

struct InferenceState {
    KvCache cache;
    std::vector<float> logits;  // [V], the prediction after the last position processed
    Tape tape;                  // reused from step to step, so decoding does not allocate
};

InferenceState prefill(Model& model, std::span<const int> prompt) {
    check(!prompt.empty(), "prefill needs at least one token");
    InferenceState state{make_kv_cache(model.config), {}, {}};
    state.tape.record = false;
    const Tensor& logits = model_forward(state.tape, model, prompt, 1, static_cast<int>(prompt.size()), &state.cache);
    const int V = model.config.vocab_size;
    state.logits.assign(logits.data.end() - V, logits.data.end());
    return state;
}

void decode_step(Model& model, InferenceState& state, const int token) {
    state.tape.clear();
    const int tokens[1] = {token};
    const Tensor& logits = model_forward(state.tape, model, tokens, 1, 1, &state.cache);
    state.logits.assign(logits.data.begin(), logits.data.end());
}

// Bytes of cache one position takes: keys and values, L layers, G heads of hd floats.
size_t kv_cache_bytes_per_token(const ModelConfig& c) {
    return 2 * size_t(c.n_layers) * c.n_kv_heads * c.head_dim() * sizeof(float);
}

// ==== 12. Training ====
// One step (DESIGN.md §4): B random windows, forward, cross-entropy, backward, clip the global gradient norm
// to 1, then AdamW with the scheduled learning rate:
//   lr_s = lr (s+1)/warmup                                                  for s < warmup
//   lr_s = 0.1 lr + 0.9 lr (1 + cos(pi (s - warmup) / (N - 1 - warmup))) / 2   afterwards
//   m = b1 m + (1-b1) g,  v = b2 v + (1-b2) g^2,  p -= lr_s wd p (matrices),  p -= lr_s m^ / (sqrt(v^) + eps)
// where m^ = m / (1 - b1^t), v^ = v / (1 - b2^t), t = s + 1 (PyTorch's AdamW).

constexpr float adam_beta1 = 0.9f;
constexpr float adam_beta2 = 0.95f;
constexpr float adam_eps = 1e-8f;
constexpr float weight_decay = 0.1f;
constexpr double max_gradient_norm = 1.0;

struct TrainingState {
    int step = 0;                                  // optimizer steps done so far
    Rng rng{0};                                    // draws the training windows
    std::vector<std::vector<float>> exp_avg;       // AdamW first moments, one per trained parameter (trained_parameters order)
    std::vector<std::vector<float>> exp_avg_sq;    // AdamW second moments
};

TrainingState make_training_state(Model& model, const uint64_t seed) {
    TrainingState state;
    state.rng = Rng(seed ^ 0x5EED0F0DA7A5ULL);  // a different stream from the one that initialised the weights
    for (const Parameter& p : trained_parameters(model)) {
        state.exp_avg.emplace_back(p.tensor->numel(), 0.0f);
        state.exp_avg_sq.emplace_back(p.tensor->numel(), 0.0f);
    }
    return state;
}

float learning_rate(const int step, const int total_steps, const float lr, const int warmup) {
    if (step < warmup) return lr * float(step + 1) / float(warmup);
    const int decay_steps = total_steps - 1 - warmup;
    const double progress = decay_steps > 0 ? double(step - warmup) / decay_steps : 0.0;
    return static_cast<float>(0.1 * lr + 0.9 * lr * (1.0 + std::cos(std::numbers::pi * progress)) / 2.0);
}

// Global L2 norm of all gradients (summed in double, parameter by parameter, in a fixed order). If it exceeds
// max_gradient_norm every gradient is scaled by max_gradient_norm / norm. Returns the norm before clipping.
double clip_gradients(const std::vector<Parameter>& params) {
    double sum_squares = 0.0;
    for (const Parameter& p : params)
        for (const float g : p.tensor->grad) sum_squares += double(g) * g;
    const double norm = std::sqrt(sum_squares);
    if (norm > max_gradient_norm) {
        const float scale = static_cast<float>(max_gradient_norm / norm);
        for (const Parameter& p : params)
            for (float& g : p.tensor->grad) g *= scale;
    }
    return norm;
}

void adamw_update(const std::vector<Parameter>& params, TrainingState& state, const float lr) {
    const int t = state.step + 1;
    const float correction1 = 1.0f - std::pow(adam_beta1, float(t));
    const float correction2 = 1.0f - std::pow(adam_beta2, float(t));
    for (size_t i = 0; i < params.size(); ++i) {
        std::vector<float>& value = params[i].tensor->data;
        const std::vector<float>& grad = params[i].tensor->grad;
        std::vector<float>& m = state.exp_avg[i];
        std::vector<float>& v = state.exp_avg_sq[i];
        const float decay = params[i].is_matrix ? lr * weight_decay : 0.0f;
        parallel_rows(static_cast<int>(value.size()), 12.0, [&](int begin, int end) {
            for (int j = begin; j < end; ++j) {
                m[j] = adam_beta1 * m[j] + (1.0f - adam_beta1) * grad[j];
                v[j] = adam_beta2 * v[j] + (1.0f - adam_beta2) * grad[j] * grad[j];
                value[j] -= decay * value[j];
                value[j] -= lr * (m[j] / correction1) / (std::sqrt(v[j] / correction2) + adam_eps);
            }
        });
    }
}

struct StepResult {
    float loss = 0.0f;       // cross-entropy
    float balance_loss = 0.0f;  // the MoE balancing loss added to it (softmax scoring), else 0
    float lr = 0.0f;
    double gradient_norm = 0.0;
};

// One optimizer step on a fresh batch: the loss is the cross-entropy plus, for MoE layers with softmax scoring,
// their balancing losses; after AdamW, sigmoid-scored MoE layers move their routing biases. A loss that is not
// finite stops training before any weight changes.
StepResult train_step(Model& model, TrainingState& state, Tape& tape, Batch& batch, const std::vector<int>& train_stream,
                      const TrainConfig& train) {
    const int B = train.batch, T = model.config.context;
    const std::vector<Parameter> params = trained_parameters(model);
    for (const Parameter& p : params) std::fill(p.tensor->grad.begin(), p.tensor->grad.end(), 0.0f);
    sample_batch(batch, train_stream, B, T, state.rng);
    tape.clear();
    BalanceLoss balance{train.aux_loss, {}};
    Tensor& logits = model_forward(tape, model, batch.inputs, B, T, nullptr, &balance);
    Tensor* loss = &cross_entropy(tape, logits, batch.targets);
    StepResult result;
    result.loss = loss->data[0];
    for (Tensor* term : balance.terms) {
        result.balance_loss += term->data[0];
        loss = &add(tape, *loss, *term);
    }
    check(std::isfinite(loss->data[0]), "the loss is " + std::to_string(loss->data[0]) + " at step " + std::to_string(state.step + 1));
    backward(tape, *loss);
    result.gradient_norm = clip_gradients(params);
    check(std::isfinite(result.gradient_norm), "the gradient norm is " + std::to_string(result.gradient_norm) + " at step " + std::to_string(state.step + 1));
    result.lr = learning_rate(state.step, train.steps, train.lr, train.warmup);
    adamw_update(params, state, result.lr);
    update_routing_biases(model, train.bias_rate);
    ++state.step;
    return result;
}

bool all_finite(Model& model) {
    for (const Parameter& p : model_parameters(model))
        for (const float x : p.tensor->data)
            if (!std::isfinite(x)) return false;
    return true;
}

// ---- Evaluation (DESIGN.md §1) ----
// Windows start at 0, T, 2T, ...; window j predicts stream[jT+1 .. jT+T] from stream[jT .. jT+T-1] (the last
// window may be shorter), positions restarting at 0. loss = mean over all targets of -log p(target).
// For MoE models it also reports each MoE layer's load: the tokens routed to each expert over all windows.
struct EvalResult {
    double loss = 0.0;
    size_t tokens = 0;                                // number of predicted targets
    std::vector<int> moe_layers;                      // the indices of the MoE layers
    std::vector<std::vector<double>> expert_counts;   // [MoE layer][expert], tokens routed to each expert
};

// Adds the expert loads of the model's last forward pass to the result's totals.
void add_expert_counts(EvalResult& result, const Model& model) {
    if (result.moe_layers.empty())
        for (int l = 0; l < model.config.n_layers; ++l)
            if (model.config.is_moe_layer(l)) {
                result.moe_layers.push_back(l);
                result.expert_counts.emplace_back(model.config.n_experts, 0.0);
            }
    for (size_t i = 0; i < result.moe_layers.size(); ++i)
        for (int e = 0; e < model.config.n_experts; ++e) result.expert_counts[i][e] += model.layers[result.moe_layers[i]].moe.counts[e];
}

// Each expert's share of one layer's routed tokens, c_e / sum_e' c_e' (all 0 when no token was routed).
std::vector<double> expert_shares(const std::vector<double>& counts) {
    const double total = std::max(1.0, std::accumulate(counts.begin(), counts.end(), 0.0));
    std::vector<double> shares;
    for (const double c : counts) shares.push_back(c / total);
    return shares;
}

// Imbalance of one layer's load: max_e c_e / mean_e c_e (1 = perfectly even, E = everything on one expert).
double load_imbalance(const std::vector<double>& counts) {
    const double mean = std::accumulate(counts.begin(), counts.end(), 0.0) / double(counts.size());
    return mean > 0 ? *std::max_element(counts.begin(), counts.end()) / mean : 0.0;
}

// "layer 1: 12% 13% ... (max/mean 1.04)", one line per MoE layer: each expert's share of the routed tokens.
std::string describe_expert_load(const EvalResult& result) {
    std::string text;
    for (size_t i = 0; i < result.moe_layers.size(); ++i) {
        text += "  expert load, layer " + std::to_string(result.moe_layers[i]) + ":";
        for (const double share : expert_shares(result.expert_counts[i])) text += " " + std::to_string(static_cast<int>(std::lround(100.0 * share))) + "%";
        char imbalance[64];
        std::snprintf(imbalance, sizeof imbalance, " (max/mean %.2f)\n", load_imbalance(result.expert_counts[i]));
        text += imbalance;
    }
    return text;
}

EvalResult evaluate(Model& model, const std::vector<int>& stream, const int batch_windows) {
    const int T = model.config.context;
    const size_t targets = stream.size() >= 2 ? stream.size() - 1 : 0;
    EvalResult result;
    if (targets == 0) return result;
    Tape tape;
    tape.record = false;
    double total = 0.0;
    // Full windows in batches of batch_windows, then the short last window on its own.
    const size_t full_windows = targets / T;
    for (size_t window = 0; window < full_windows; window += batch_windows) {
        const int B = static_cast<int>(std::min<size_t>(batch_windows, full_windows - window));
        const std::span<const int> inputs(stream.data() + window * T, size_t(B) * T);
        const std::span<const int> next(stream.data() + window * T + 1, size_t(B) * T);
        tape.clear();
        total += double(cross_entropy(tape, model_forward(tape, model, inputs, B, T), next).data[0]) * B * T;
        add_expert_counts(result, model);
    }
    if (const int rest = static_cast<int>(targets - full_windows * T); rest > 0) {
        const std::span<const int> inputs(stream.data() + full_windows * T, rest);
        const std::span<const int> next(stream.data() + full_windows * T + 1, rest);
        tape.clear();
        total += double(cross_entropy(tape, model_forward(tape, model, inputs, 1, rest), next).data[0]) * rest;
        add_expert_counts(result, model);
    }
    result.tokens = targets;
    result.loss = total / double(targets);
    return result;
}

// ---- Training state in the checkpoint (DESIGN.md §6) ----
// AdamW moments are stored as tensors "optimizer.exp_avg.<name>" and "optimizer.exp_avg_sq.<name>"; the step,
// the schedule and the window generator's state as JSON in the metadata entry "train_state".
std::vector<NamedBuffer> training_tensors(Model& model, const TrainingState& state) {
    std::vector<NamedBuffer> tensors;
    const std::vector<Parameter> params = trained_parameters(model);
    for (size_t i = 0; i < params.size(); ++i) {
        tensors.push_back({"optimizer.exp_avg." + params[i].name, params[i].tensor->shape, state.exp_avg[i]});
        tensors.push_back({"optimizer.exp_avg_sq." + params[i].name, params[i].tensor->shape, state.exp_avg_sq[i]});
    }
    return tensors;
}

std::string training_state_to_json(const TrainingState& state, const TrainConfig& train) {
    std::string rng = "[";
    for (size_t i = 0; i < state.rng.state.size(); ++i) rng += (i ? ",\"" : "\"") + std::to_string(state.rng.state[i]) + "\"";
    return "{\"step\":" + std::to_string(state.step) + ",\"steps\":" + std::to_string(train.steps) + ",\"batch\":" +
           std::to_string(train.batch) + ",\"lr\":" + float_text(train.lr) + ",\"warmup\":" + std::to_string(train.warmup) +
           ",\"eval_every\":" + std::to_string(train.eval_every) + ",\"bias_rate\":" + float_text(train.bias_rate) + ",\"aux_loss\":" +
           float_text(train.aux_loss) + ",\"seed\":\"" + std::to_string(train.seed) + "\",\"rng\":" + rng +
           "],\"rng_has_spare\":" + (state.rng.has_spare ? "true" : "false") + ",\"rng_spare\":" + float_text(state.rng.spare) + "}";
}

// Restores the state and the schedule (train's fields) of a checkpoint written during training.
TrainingState training_state_from_checkpoint(Checkpoint& checkpoint, TrainConfig& train, const std::string& where) {
    check(checkpoint.metadata.contains("train_state"), where + "has no training state (it was not written by ./gpt train)");
    const Json json = parse_json_in(checkpoint.metadata["train_state"], where + "train_state");
    TrainingState state = make_training_state(checkpoint.model, 0);
    state.step = json_int(json.find("step"), where + "train_state step");
    train.steps = json_int(json.find("steps"), where + "train_state steps");
    train.batch = json_int(json.find("batch"), where + "train_state batch");
    train.lr = static_cast<float>(json_number(json.find("lr"), where + "train_state lr"));
    train.warmup = json_int(json.find("warmup"), where + "train_state warmup");
    train.eval_every = json_int(json.find("eval_every"), where + "train_state eval_every");
    train.bias_rate = static_cast<float>(json_number(json.find("bias_rate"), where + "train_state bias_rate"));
    train.aux_loss = static_cast<float>(json_number(json.find("aux_loss"), where + "train_state aux_loss"));
    train.seed = std::stoull(json_string(json.find("seed"), where + "train_state seed"));
    const Json* rng = json.find("rng");
    check(rng && std::holds_alternative<JsonArray>(rng->value) && std::get<JsonArray>(rng->value).size() == 4, where + "train_state rng is malformed");
    for (size_t i = 0; i < 4; ++i) state.rng.state[i] = std::stoull(json_string(&std::get<JsonArray>(rng->value)[i], where + "train_state rng"));
    const Json* has_spare = json.find("rng_has_spare");
    check(has_spare && std::holds_alternative<bool>(has_spare->value), where + "train_state rng_has_spare is malformed");
    state.rng.has_spare = std::get<bool>(has_spare->value);
    state.rng.spare = static_cast<float>(json_number(json.find("rng_spare"), where + "train_state rng_spare"));
    const std::vector<Parameter> params = trained_parameters(checkpoint.model);
    for (size_t i = 0; i < params.size(); ++i) {
        for (auto [prefix, moments] : {std::pair{"optimizer.exp_avg.", &state.exp_avg}, std::pair{"optimizer.exp_avg_sq.", &state.exp_avg_sq}}) {
            const auto found = checkpoint.training_tensors.find(prefix + params[i].name);
            check(found != checkpoint.training_tensors.end(), where + "tensor '" + prefix + params[i].name + "' is missing");
            check(found->second.shape == params[i].tensor->shape, where + "tensor '" + prefix + params[i].name + "' has the wrong shape");
            (*moments)[i] = found->second.data;
        }
    }
    return state;
}

// ---- Loss log: CSV and an SVG plot ----
struct LogRow {
    int step = 0;
    float train_loss = 0.0f;
    float lr = 0.0f;
    std::optional<float> val_loss;
};

std::string loss_log_csv(const std::vector<LogRow>& rows) {
    std::string csv = "step,train_loss,val_loss,lr\n";
    for (const LogRow& row : rows)
        csv += std::to_string(row.step) + "," + float_text(row.train_loss) + "," + (row.val_loss ? float_text(*row.val_loss) : "") + "," +
               float_text(row.lr) + "\n";
    return csv;
}

// The fields of each line of a CSV text after its header line (our logs: no quoting, no commas in fields).
std::vector<std::vector<std::string>> csv_fields(const std::string& text) {
    std::vector<std::vector<std::string>> rows;
    std::istringstream lines(text);
    std::string line;
    std::getline(lines, line);  // header
    while (std::getline(lines, line)) {
        std::vector<std::string> fields;
        std::istringstream cells(line);
        for (std::string cell; std::getline(cells, cell, ',');) fields.push_back(cell);
        rows.push_back(std::move(fields));
    }
    return rows;
}

std::vector<LogRow> parse_loss_log_csv(const std::string& text) {
    std::vector<LogRow> rows;
    for (const std::vector<std::string>& fields : csv_fields(text)) {
        if (fields.size() != 4) continue;
        LogRow row{std::stoi(fields[0]), std::stof(fields[1]), std::stof(fields[3]), std::nullopt};
        if (!fields[2].empty()) row.val_loss = std::stof(fields[2]);
        rows.push_back(row);
    }
    return rows;
}

// Train loss (each step, light) and validation loss (each evaluation, bold) against the step.
std::string loss_plot_svg(const std::vector<LogRow>& rows, const std::string& title) {
    constexpr double width = 720, height = 420, left = 60, right = 20, top = 40, bottom = 50;
    float low = std::numeric_limits<float>::max(), high = std::numeric_limits<float>::lowest();
    int last_step = 1;
    for (const LogRow& row : rows) {
        for (const float value : {row.train_loss, row.val_loss.value_or(row.train_loss)}) {
            low = std::min(low, value);
            high = std::max(high, value);
        }
        last_step = std::max(last_step, row.step);
    }
    if (rows.empty() || high <= low) low = 0.0f, high = std::max(1.0f, high);
    const auto x_of = [&](double step) { return left + (width - left - right) * step / last_step; };
    const auto y_of = [&](double loss) { return top + (height - top - bottom) * (high - loss) / (high - low); };
    char buffer[256];
    std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"420\" font-family=\"sans-serif\" font-size=\"12\">\n"
                      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"360\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">" +
                      title + "</text>\n";
    for (int i = 0; i <= 5; ++i) {  // horizontal grid lines with loss labels, vertical ones with step labels
        const double loss = low + (high - low) * i / 5, step = double(last_step) * i / 5;
        std::snprintf(buffer, sizeof buffer,
                      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.2f</text>\n"
                      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.0f</text>\n",
                      left, y_of(loss), width - right, y_of(loss), left - 6, y_of(loss) + 4, loss, x_of(step), top, x_of(step),
                      height - bottom, x_of(step), height - bottom + 16, step);
        svg += buffer;
    }
    std::string train_points, val_points;
    for (const LogRow& row : rows) {
        std::snprintf(buffer, sizeof buffer, "%.1f,%.1f ", x_of(row.step), y_of(row.train_loss));
        train_points += buffer;
        if (row.val_loss) {
            std::snprintf(buffer, sizeof buffer, "%.1f,%.1f ", x_of(row.step), y_of(*row.val_loss));
            val_points += buffer;
        }
    }
    svg += "<polyline fill=\"none\" stroke=\"#9ecae1\" stroke-width=\"1\" points=\"" + train_points + "\"/>\n";
    svg += "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2.5\" points=\"" + val_points + "\"/>\n";
    svg += "<text x=\"360\" y=\"410\" text-anchor=\"middle\">step</text>\n"
           "<text x=\"" + std::to_string(int(width - 200)) + "\" y=\"60\" fill=\"#3182bd\">train loss (per step)</text>\n"
           "<text x=\"" + std::to_string(int(width - 200)) + "\" y=\"76\" fill=\"#d62728\">validation loss</text>\n</svg>\n";
    return svg;
}

// ---- Expert load log (MoE): CSV and an SVG plot ----
// At each evaluation, each MoE layer's share of validation tokens per expert: rows "step,layer,expert,share".
struct ExpertLoadRow {
    int step = 0;
    int layer = 0;
    int expert = 0;
    double share = 0.0;
};

void append_expert_load(std::vector<ExpertLoadRow>& rows, const int step, const EvalResult& result) {
    for (size_t i = 0; i < result.moe_layers.size(); ++i) {
        const std::vector<double> shares = expert_shares(result.expert_counts[i]);
        for (size_t e = 0; e < shares.size(); ++e) rows.push_back({step, result.moe_layers[i], static_cast<int>(e), shares[e]});
    }
}

std::string expert_load_csv(const std::vector<ExpertLoadRow>& rows) {
    std::string csv = "step,layer,expert,share\n";
    for (const ExpertLoadRow& row : rows)
        csv += std::to_string(row.step) + "," + std::to_string(row.layer) + "," + std::to_string(row.expert) + "," + float_text(float(row.share)) + "\n";
    return csv;
}

std::vector<ExpertLoadRow> parse_expert_load_csv(const std::string& text) {
    std::vector<ExpertLoadRow> rows;
    for (const std::vector<std::string>& fields : csv_fields(text))
        if (fields.size() == 4) rows.push_back({std::stoi(fields[0]), std::stoi(fields[1]), std::stoi(fields[2]), std::stod(fields[3])});
    return rows;
}

// One panel per MoE layer: each expert's share of the tokens against the step, and the even share 1/E dashed.
std::string expert_load_svg(const std::vector<ExpertLoadRow>& rows, const ModelConfig& c, const std::string& title) {
    constexpr double width = 720, panel = 200, left = 60, right = 20, top = 40, gap = 30;
    static const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
    std::vector<int> layers;
    for (int l = 0; l < c.n_layers; ++l)
        if (c.is_moe_layer(l)) layers.push_back(l);
    int last_step = 1;
    double high = 1.0 / std::max(1, c.n_experts);
    for (const ExpertLoadRow& row : rows) last_step = std::max(last_step, row.step), high = std::max(high, row.share);
    high = std::min(1.0, high * 1.1);
    const double height = top + layers.size() * (panel + gap) + 20 + 14 * ((c.n_experts + 9) / 10);
    char buffer[320];
    std::snprintf(buffer, sizeof buffer,
                  "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">\n"
                  "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
                  width, height);
    std::string svg = buffer;
    svg += "<text x=\"360\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">" + title + "</text>\n";
    for (int e = 0; e < c.n_experts; ++e) {  // legend: one colour per expert
        std::snprintf(buffer, sizeof buffer, "<text x=\"%d\" y=\"%.0f\" fill=\"%s\">expert %d</text>\n", 60 + 64 * (e % 10),
                      height - 8 - 14 * (e / 10), colors[e % 10], e);
        svg += buffer;
    }
    for (size_t p = 0; p < layers.size(); ++p) {
        const double y0 = top + p * (panel + gap);
        const auto x_of = [&](double step) { return left + (width - left - right) * step / last_step; };
        const auto y_of = [&](double share) { return y0 + panel * (1.0 - share / high); };
        for (int i = 0; i <= 4; ++i) {
            std::snprintf(buffer, sizeof buffer, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%d</text>\n", x_of(last_step * i / 4.0),
                          y0 + panel + 14, last_step * i / 4);
            svg += buffer;
            const double share = high * i / 4;
            std::snprintf(buffer, sizeof buffer,
                          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.0f%%</text>\n",
                          left, y_of(share), width - right, y_of(share), left - 6, y_of(share) + 4, 100 * share);
            svg += buffer;
        }
        std::snprintf(buffer, sizeof buffer,
                      "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\" stroke-dasharray=\"4 4\"/>\n"
                      "<text x=\"%.1f\" y=\"%.1f\">layer %d: each expert's share of the tokens against the step (dashed: even, 1/%d)</text>\n",
                      left, y_of(1.0 / c.n_experts), width - right, y_of(1.0 / c.n_experts), left, y0 - 6, layers[p], c.n_experts);
        svg += buffer;
        for (int e = 0; e < c.n_experts; ++e) {
            std::string points;
            for (const ExpertLoadRow& row : rows)
                if (row.layer == layers[p] && row.expert == e) {
                    std::snprintf(buffer, sizeof buffer, "%.1f,%.1f ", x_of(row.step), y_of(row.share));
                    points += buffer;
                }
            svg += "<polyline fill=\"none\" stroke=\"" + std::string(colors[e % 10]) + "\" stroke-width=\"1.5\" points=\"" + points + "\"/>\n";
        }
    }
    return svg + "</svg>\n";
}


// ==== 13. Sampling ====
// Next-token choice (DESIGN.md §5): probabilities = softmax(logits / temperature) (temperature 0: argmax), keep
// the k most probable (top-k), then the smallest set of most probable tokens whose probability sums to at
// least p (top-p), renormalise and draw. Ties in probability are ordered by the lower token id first.
// A document starts from [EOT] + prompt and ends when EOT is drawn; tokens come from prefill and decode (§11).

std::vector<double> token_probabilities(std::span<const float> logits, const float temperature) {
    const double max = *std::max_element(logits.begin(), logits.end());
    std::vector<double> probabilities(logits.size());
    double sum = 0.0;
    for (size_t i = 0; i < logits.size(); ++i) sum += probabilities[i] = std::exp((logits[i] - max) / temperature);
    for (double& p : probabilities) p /= sum;
    return probabilities;
}

// The tokens that survive top-k and top-p, most probable first. top_k = 0 and top_p = 1 keep everything.
// The top-p sum is compared with a tolerance of 1e-9 so that rounding in the sum never adds a token.
std::vector<int> candidate_tokens(std::span<const double> probabilities, const int top_k, const double top_p) {
    std::vector<int> order(probabilities.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return probabilities[a] > probabilities[b]; });
    if (top_k > 0 && size_t(top_k) < order.size()) order.resize(top_k);
    if (top_p < 1.0) {
        double kept = 0.0, total = 0.0;
        for (const int token : order) total += probabilities[token];
        size_t count = 0;
        while (count < order.size() && kept < top_p * total * (1.0 - 1e-9)) kept += probabilities[order[count++]];
        order.resize(std::max<size_t>(count, 1));
    }
    return order;
}

int sample_token(std::span<const float> logits, const SampleConfig& config, Rng& rng) {
    if (config.temperature == 0.0f) return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    const std::vector<double> probabilities = token_probabilities(logits, config.temperature);
    const std::vector<int> candidates = candidate_tokens(probabilities, config.top_k, config.top_p);
    double total = 0.0;
    for (const int token : candidates) total += probabilities[token];
    double draw = rng.uniform_double() * total;
    for (const int token : candidates) {
        draw -= probabilities[token];
        if (draw < 0.0) return token;
    }
    return candidates.back();
}

void validate_sample_config(const SampleConfig& config) {
    check(config.count >= 0, "--n must not be negative, got " + std::to_string(config.count));
    check(std::isfinite(config.temperature) && config.temperature >= 0.0f, "--temperature must be 0 or positive, got " + float_text(config.temperature));
    check(config.top_k >= 0, "--top-k must be 0 (off) or positive, got " + std::to_string(config.top_k));
    check(config.top_p > 0.0 && config.top_p <= 1.0, "--top-p must be in (0, 1], got " + std::to_string(config.top_p));
    check(config.max_tokens >= 0, "--max-tokens must be 0 (no limit) or positive, got " + std::to_string(config.max_tokens));
}

struct Sample {
    std::vector<int> tokens;       // the prompt followed by the generated tokens, without EOT
    bool reached_context = false;  // stopped because the model's context was full
};

// The state after [EOT] + prompt, from which every document of a run starts. Engine is Model here, and
// the GPU copy of a model in gpt_cuda.cu, which brings its own prefill and decode_step.
template <typename Engine>
auto prefill_prompt(Engine& model, const Tokenizer& tokenizer, const std::vector<int>& prompt) {
    check(int(prompt.size()) + 1 <= model.config.context, "the prompt has " + std::to_string(prompt.size()) +
                                                              " tokens; with EOT it does not fit the context of " + std::to_string(model.config.context));
    std::vector<int> tokens{tokenizer.eot()};
    tokens.insert(tokens.end(), prompt.begin(), prompt.end());
    return prefill(model, tokens);
}

// Generates one document from a prefilled prompt. The state is taken by value: one prefill serves every
// document of a run (prefix sharing), each starting from its own copy of the prompt's cache. on_token is
// called with each new token as it is produced (streaming).
template <typename Engine, typename State>
Sample generate(Engine& model, const Tokenizer& tokenizer, const std::vector<int>& prompt, State state, const SampleConfig& config,
                Rng& rng, const std::function<void(int)>& on_token = {}) {
    Sample sample{prompt, false};
    for (int generated = 0; config.max_tokens == 0 || generated < config.max_tokens; ++generated) {
        const int token = sample_token(state.logits, config, rng);
        if (token == tokenizer.eot()) break;
        sample.tokens.push_back(token);
        if (on_token) on_token(token);
        if (state.cache.length == model.config.context) {  // no position left to read this token at
            sample.reached_context = !(config.max_tokens > 0 && generated + 1 == config.max_tokens);
            break;
        }
        decode_step(model, state, token);
    }
    return sample;
}

// ==== 14. Benchmarks ====
// ./gpt bench measures what the README reports: matmul GFLOP/s (square sizes, one thread and all threads),
// training step time and tokens/s for three model sizes, and sampling tokens/s. Each timing repeats the work
// until at least min_bench_seconds have passed and reports the mean over those repeats.

constexpr double min_bench_seconds = 1.0;

template <typename Work>
double seconds_per_run(Work&& work) {
    work();  // warm-up: caches, page faults, thread start
    int runs = 0;
    Timer timer;
    do {
        work();
        ++runs;
    } while (timer.seconds() < min_bench_seconds);
    return timer.seconds() / runs;
}

constexpr const char* bpe_bench_data = "data/sotu.txt";

// BPE training done the straightforward way, as the bench's yardstick: before every merge, count all pairs
// over all distinct chunks again. Same result as train_bpe, one pass over the corpus per merge.
std::vector<std::pair<int, int>> train_bpe_by_recount(const std::vector<std::string>& documents, const int vocab_size) {
    std::unordered_map<std::string_view, int64_t> chunk_counts;
    for (const std::string& document : documents)
        for (const std::string_view chunk : split_chunks(document)) ++chunk_counts[chunk];
    std::vector<std::pair<std::vector<int>, int64_t>> words;
    for (const auto& [chunk, count] : chunk_counts) {
        std::vector<int> ids;
        for (const char c : chunk) ids.push_back(static_cast<unsigned char>(c));
        words.emplace_back(std::move(ids), count);
    }
    std::vector<std::pair<int, int>> merges;
    std::unordered_map<uint64_t, int64_t> pair_count;
    while (static_cast<int>(merges.size()) < vocab_size - 257) {
        pair_count.clear();
        for (const auto& [ids, count] : words)
            for (size_t i = 0; i + 1 < ids.size(); ++i) pair_count[pair_key(ids[i], ids[i + 1])] += count;
        if (pair_count.empty()) break;
        const auto best = std::max_element(pair_count.begin(), pair_count.end(), [](const auto& a, const auto& b) {
            return a.second != b.second ? a.second < b.second : a.first > b.first;
        });
        const int left = static_cast<int>(best->first >> 32), right = static_cast<int>(best->first & 0xFFFFFFFFu);
        for (auto& word : words) replace_pair(word.first, left, right, 256 + static_cast<int>(merges.size()));
        merges.emplace_back(left, right);
    }
    return merges;
}

struct BenchModel {
    std::string name;
    ModelConfig config;
    int batch;
};

// The medium model with its MLPs replaced by E experts of Fe = 128, K = 2 of them per token plus one shared
// expert (sigmoid scoring): (K + S) Fe = 384 active hidden units per token against the dense 512.
ModelConfig medium_moe_config(const int experts) {
    ModelConfig c;
    c.vocab_size = 32;
    c.n_layers = 6, c.dim = 192, c.n_heads = 6, c.n_kv_heads = 2, c.ffn_dim = 512, c.context = 128;
    c.n_experts = experts, c.top_k_experts = 2, c.n_shared_experts = 1, c.expert_ffn_dim = 128;
    return c;
}

std::vector<BenchModel> bench_models() {
    const auto config = [](int layers, int dim, int heads, int kv_heads, int ffn, int context) {
        ModelConfig c;
        c.vocab_size = 32;
        c.n_layers = layers, c.dim = dim, c.n_heads = heads, c.n_kv_heads = kv_heads, c.ffn_dim = ffn, c.context = context;
        return c;
    };
    return {{"tiny", config(1, 16, 4, 4, 64, 16), 1}, {"small", config(4, 64, 4, 4, 256, 32), 32}, {"medium", config(6, 192, 6, 2, 512, 128), 16},
            {"medium-moe", medium_moe_config(8), 16}};
}

struct BenchRow {
    std::string name;
    std::string unit;
    double value;
};

std::vector<BenchRow> run_benchmarks(const int max_threads) {
    std::vector<BenchRow> rows;
    Rng rng(42);
    for (const int n : {64, 256, 512, 1024}) {
        std::vector<float> a(size_t(n) * n), b(size_t(n) * n), c(size_t(n) * n);
        for (float& x : a) x = rng.normal();
        for (float& x : b) x = rng.normal();
        for (const int threads : {1, max_threads}) {
            set_thread_count(threads);
            const double seconds = seconds_per_run([&] { matmul_forward(c, a, b, n, n, n); });
            rows.push_back({"matmul " + std::to_string(n) + "^3, " + std::to_string(threads) + " thread" + (threads > 1 ? "s" : ""),
                            "GFLOP/s", 2.0 * n * n * n / seconds * 1e-9});
            if (max_threads == 1) break;
        }
    }
    set_thread_count(max_threads);
    std::vector<BenchModel> training_benches = bench_models();
    for (const int experts : {4, 16, 32})  // with 8 above: the step time should stay about flat in E at fixed K
        training_benches.push_back({"medium-moe E" + std::to_string(experts), medium_moe_config(experts), 16});
    for (const BenchModel& bench : training_benches) {
        Model model = make_model(bench.config);
        init_model(model, 1);
        TrainingState state = make_training_state(model, 1);
        TrainConfig train;
        train.batch = bench.batch;
        std::vector<int> stream(100000);
        for (int& token : stream) token = static_cast<int>(rng.below(bench.config.vocab_size));
        Tape tape;
        Batch batch;
        const double seconds = seconds_per_run([&] { train_step(model, state, tape, batch, stream, train); });
        const std::string label = bench.name + " (" + describe_model(bench.config) + " B" + std::to_string(bench.batch) + "), " +
                                  std::to_string(max_threads) + " thread" + (max_threads > 1 ? "s" : "");
        rows.push_back({"train step, " + label, "ms", seconds * 1e3});
        rows.push_back({"train tokens/s, " + label, "tokens/s", double(bench.batch) * bench.config.context / seconds});
    }
    // Sampling speed on the default (small) model: documents drawn from [EOT] with the KV cache, generated
    // tokens (EOT not counted) per second of wall time.
    {
        Model model = make_model(bench_models()[1].config);
        init_model(model, 1);
        std::vector<char32_t> letters;
        for (char32_t c = 'a'; c < char32_t('a' + model.config.vocab_size - 1); ++c) letters.push_back(c);
        const Tokenizer tokenizer = make_char_tokenizer(letters);
        const InferenceState start = prefill_prompt(model, tokenizer, {});
        Rng sample_rng(7);
        size_t tokens = 0;
        Timer timer;
        while (timer.seconds() < min_bench_seconds) tokens += generate(model, tokenizer, {}, start, SampleConfig(), sample_rng).tokens.size();
        rows.push_back({"sampling, small, KV cache, " + std::to_string(max_threads) + " thread" + (max_threads > 1 ? "s" : ""), "tokens/s",
                        double(tokens) / timer.seconds()});
    }
    // Byte-level BPE on the prose corpus: incremental training against the recount-every-merge way (on a
    // subset, where recounting is still affordable), encoding speed and bytes per token.
    if (std::filesystem::exists(bpe_bench_data)) {
        const std::vector<std::string> documents = split_documents(read_documents(bpe_bench_data)).train;
        size_t bytes = 0;
        for (const std::string& document : documents) bytes += document.size();
        Tokenizer tokenizer;
        for (const int vocab : {1024, 4096}) {
            Timer timer;
            tokenizer = train_bpe(documents, vocab);
            rows.push_back({"BPE train, " + std::string(bpe_bench_data) + " train split (" + std::to_string(bytes / 1000) + " kB), vocab " +
                                std::to_string(vocab), "s", timer.seconds()});
        }
        const std::vector<std::string> subset(documents.begin(), documents.begin() + std::min<size_t>(documents.size(), 2000));
        size_t subset_bytes = 0;
        for (const std::string& document : subset) subset_bytes += document.size();
        Timer incremental_timer;
        const Tokenizer incremental = train_bpe(subset, 4096);
        const double incremental_seconds = incremental_timer.seconds();
        Timer recount_timer;
        const std::vector<std::pair<int, int>> recounted = train_bpe_by_recount(subset, 4096);
        const double recount_seconds = recount_timer.seconds();
        check(recounted == incremental.merges, "bench: the recount trainer disagrees with the incremental one");
        const std::string subset_label = "first 2000 documents (" + std::to_string(subset_bytes / 1000) + " kB), vocab 4096";
        rows.push_back({"BPE train incremental, " + subset_label, "s", incremental_seconds});
        rows.push_back({"BPE train by recount, " + subset_label, "s", recount_seconds});
        rows.push_back({"BPE train speed-up of incremental over recount", "x", recount_seconds / incremental_seconds});
        size_t tokens = 0;
        const double seconds = seconds_per_run([&] {
            Tokenizer fresh = tokenizer;  // an empty chunk cache each time: the cache fills as the text is read
            fresh.chunk_cache.clear();
            tokens = 0;
            for (const std::string& document : documents) tokens += encode(fresh, document).size();
        });
        rows.push_back({"BPE encode, vocab 4096, 1 thread", "MB/s", bytes / seconds * 1e-6});
        rows.push_back({"BPE bytes per token, vocab 4096", "bytes/token", double(bytes) / tokens});
    }
    // Inference on the medium model: prefill, and decode with and without the KV cache. Without the cache
    // every token runs the whole sequence so far; with it, only the new position. Timed per generated token
    // for sequences of 16, 64 and 128 tokens (the context), feeding back the greedy choice.
    {
        const ModelConfig config = bench_models()[2].config;
        Model model = make_model(config);
        init_model(model, 1);
        std::vector<int> prompt(config.context);
        for (int& token : prompt) token = static_cast<int>(rng.below(config.vocab_size));
        const double prefill_seconds = seconds_per_run([&] { prefill(model, prompt); });
        rows.push_back({"prefill, medium, " + std::to_string(config.context) + " tokens", "tokens/s", config.context / prefill_seconds});
        const auto greedy = [](const std::vector<float>& logits) { return int(std::max_element(logits.begin(), logits.end()) - logits.begin()); };
        for (const int length : {16, 64, config.context}) {
            const double cached = seconds_per_run([&] {
                InferenceState state = prefill(model, std::span<const int>(prompt).first(1));
                while (state.cache.length < length) decode_step(model, state, greedy(state.logits));
            });
            const double uncached = seconds_per_run([&] {
                std::vector<int> sequence{prompt[0]};
                Tape tape;
                tape.record = false;
                while (int(sequence.size()) < length) {
                    tape.clear();
                    const Tensor& logits = model_forward(tape, model, sequence, 1, static_cast<int>(sequence.size()));
                    const std::vector<float> last(logits.data.end() - config.vocab_size, logits.data.end());
                    sequence.push_back(greedy(last));
                }
            });
            rows.push_back({"decode, medium, " + std::to_string(length) + " tokens, KV cache", "ms/token", cached / (length - 1) * 1e3});
            rows.push_back({"decode, medium, " + std::to_string(length) + " tokens, no cache", "ms/token", uncached / (length - 1) * 1e3});
        }
        rows.push_back({"KV cache, medium (2 L G hd 4)", "bytes/token", double(kv_cache_bytes_per_token(config))});
    }
    return rows;
}

// ==== 15. Command line ====
// ./gpt [train|eval|sample|bench] [flags]. Each command lists its flags with their defaults in one table,
// which both the parser and --help read. Bad flags print the usage and exit 2; other errors print
// "error: ..." and exit 1.

struct UsageError : Error {
    using Error::Error;
};

struct FlagSpec {
    std::string name;           // "--steps"
    std::string default_value;  // shown in --help; "" for switches and optional values
    std::string help;
    bool is_switch = false;     // takes no value
};

struct Command {
    std::string name;
    std::string summary;
    std::vector<FlagSpec> flags;
};

const std::string default_threads = std::to_string(std::max(1u, std::thread::hardware_concurrency()));

const std::vector<FlagSpec> model_flags = {
    {"--layers", "4", "L, transformer layers"},          {"--dim", "64", "D, model width"},
    {"--heads", "4", "H, query heads (D / H must be even)"}, {"--kv-heads", "4", "G, key/value heads (must divide H)"},
    {"--ffn", "256", "F, MLP hidden size"},               {"--ctx", "32", "T, context length (training window)"},
    {"--tie", "", "tie the output layer to the embedding", true},
    {"--experts", "0", "E, routed experts per MoE layer (0: dense MLP in every layer)"},
    {"--top-k-experts", "2", "K, experts chosen per token (with --experts)"},
    {"--shared-experts", "1", "S, the shared expert's hidden size is S * Fe (0: none; with --experts)"},
    {"--expert-ffn", "64", "Fe, hidden size of each expert (with --experts)"},
    {"--scoring", "sigmoid", "router scores: sigmoid (balanced by a bias) or softmax (balanced by an auxiliary loss)"},
    {"--dense-layers", "0", "the first k layers keep the dense MLP (with --experts)"},
};

std::vector<Command> commands() {
    std::vector<FlagSpec> train_flags = {
        {"--data", "data/names.txt", "training text, one document per line"},
        {"--out", "out/names.safetensors", "checkpoint to write (a .loss.csv and .loss.svg are written beside it)"},
        {"--steps", "3000", "optimizer steps (the length of the learning-rate schedule)"},
        {"--batch", "32", "B, windows per step"},
    };
    train_flags.insert(train_flags.end(), model_flags.begin(), model_flags.end());
    const std::vector<FlagSpec> rest = {
        {"--lr", "0.003", "peak learning rate"},
        {"--warmup", "100", "linear warm-up steps"},
        {"--seed", "1337", "seed for the weights and the training windows"},
        {"--threads", default_threads, "worker threads (results do not depend on it)"},
        {"--eval-every", "250", "steps between validation evaluations and checkpoints"},
        {"--bias-rate", "0.001", "gamma, MoE sigmoid scoring: routing-bias step per optimizer step (0: no balancing)"},
        {"--aux-loss", "0.01", "alpha, MoE softmax scoring: weight of the balancing loss (0: no balancing)"},
        {"--resume", "", "continue training from this checkpoint (model shape and schedule come from it)"},
        {"--stop-after", "0", "stop after this many steps of this run, keeping a resumable checkpoint (0: run to the end)"},
        {"--tokenizer", "auto", "char, bpe, or auto: byte-level BPE when documents average over 64 bytes (prose), char otherwise"},
        {"--vocab", "2048", "BPE vocabulary size, including the 256 bytes and EOT"},
    };
    train_flags.insert(train_flags.end(), rest.begin(), rest.end());
    return {
        {"train", "train a model (./gpt with no command trains with the defaults, then samples 20 names)", train_flags},
        {"eval", "loss and perplexity of a checkpoint on a data file (DESIGN.md §1 windows)",
         {{"--model", "out/names.safetensors", "checkpoint"},
          {"--data", "data/names.txt", "text, one document per line"},
          {"--split", "all", "which documents: all, train or val"},
          {"--json", "", "print one JSON object {loss, perplexity, tokens}", true},
          {"--threads", default_threads, "worker threads"}}},
        {"sample", "print documents sampled from a checkpoint, one per line",
         {{"--model", "out/names.safetensors", "checkpoint"},
          {"--n", "20", "number of documents"},
          {"--prompt", "", "text every document starts with"},
          {"--temperature", "1.0", "softmax temperature; 0 picks the most likely token"},
          {"--top-k", "0", "keep only the k most likely tokens (0: all)"},
          {"--top-p", "1.0", "keep the smallest set of likeliest tokens with probability >= p"},
          {"--seed", "1337", "document i uses seed + i"},
          {"--max-tokens", "0", "most tokens generated per document (0: until EOT or the context is full)"},
          {"--threads", default_threads, "worker threads"}}},
        {"tokenizer train", "learn BPE merges on a data file's training documents and write them as JSON",
         {{"--data", "data/sotu.txt", "text, one document per line"},
          {"--vocab", "2048", "vocabulary size, including the 256 bytes and EOT"},
          {"--out", "out/tokenizer.json", "where to write {\"type\": \"bpe\", \"merges\": [...]}"}}},
        {"tokenizer encode", "print the ids and byte pieces of a text", {{"--model", "out/names.safetensors", "checkpoint or tokenizer JSON"},
                                                                         {"--text", "", "text to encode (default: standard input)"}}},
        {"tokenizer decode", "print the text of token ids", {{"--model", "out/names.safetensors", "checkpoint or tokenizer JSON"},
                                                            {"--ids", "", "ids separated by spaces (default: standard input)"}}},
        {"bench", "benchmark matmul, training steps, BPE and inference (prefill, decode with and without the KV cache)",
         {{"--json", "", "print the results as JSON", true}, {"--threads", default_threads, "worker threads for the all-threads rows"}}},
    };
}

// "  --steps X           optimizer steps (...) (default 3000)": one line of --help.
std::string flag_help_line(const FlagSpec& flag) {
    std::string left = "  " + flag.name + (flag.is_switch ? "" : " X");
    left.resize(std::max<size_t>(left.size() + 1, 21), ' ');
    return left + flag.help + (flag.default_value.empty() ? "" : " (default " + flag.default_value + ")") + "\n";
}

std::string usage() {
    std::string text = "usage: ./gpt [command] [flags]     (no command: train with the defaults, then sample 20 names)\n";
    for (const Command& command : commands()) {
        text += "\n./gpt " + command.name + ": " + command.summary + "\n";
        for (const FlagSpec& flag : command.flags) text += flag_help_line(flag);
    }
    return text;
}

// The flags given on the command line, checked against the command's table; defaults fill the rest.
struct Flags {
    std::map<std::string, std::string> values;
    std::set<std::string> given;

    bool has(const std::string& name) const { return given.contains(name); }
    const std::string& text(const std::string& name) const { return values.at(name); }
    int integer(const std::string& name) const {
        const std::string& s = text(name);
        size_t used = 0;
        long long value = 0;
        try {
            value = std::stoll(s, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        check(used == s.size() && !s.empty() && value >= std::numeric_limits<int>::min() && value <= std::numeric_limits<int>::max(),
              name + " expects an integer, got '" + s + "'");
        return static_cast<int>(value);
    }
    int positive(const std::string& name) const {
        const int value = integer(name);
        check(value > 0, name + " must be positive, got " + std::to_string(value));
        return value;
    }
    double real(const std::string& name) const {
        const std::string& s = text(name);
        char* end = nullptr;
        const double value = std::strtod(s.c_str(), &end);
        check(!s.empty() && end == s.c_str() + s.size() && std::isfinite(value), name + " expects a number, got '" + s + "'");
        return value;
    }
    uint64_t seed(const std::string& name) const {
        const std::string& s = text(name);
        check(!s.empty() && s.find_first_not_of("0123456789") == std::string::npos && s.size() <= 19, name + " expects a non-negative integer, got '" + s + "'");
        return std::stoull(s);
    }
};

Flags parse_flags(const Command& command, const std::vector<std::string>& args) {
    Flags flags;
    for (const FlagSpec& spec : command.flags) flags.values[spec.name] = spec.default_value;
    for (size_t i = 0; i < args.size(); ++i) {
        std::string name = args[i], value;
        const size_t equals = name.find('=');
        const bool inline_value = name.starts_with("--") && equals != std::string::npos;
        if (inline_value) value = name.substr(equals + 1), name = name.substr(0, equals);
        const auto spec = std::find_if(command.flags.begin(), command.flags.end(), [&](const FlagSpec& f) { return f.name == name; });
        if (spec == command.flags.end()) throw UsageError("unknown flag '" + name + "' for ./gpt " + command.name);
        if (spec->is_switch) {
            if (inline_value) throw UsageError(name + " takes no value");
            value = "1";
        } else if (!inline_value) {
            if (i + 1 >= args.size()) throw UsageError(name + " needs a value");
            value = args[++i];
        }
        flags.values[name] = value;
        flags.given.insert(name);
    }
    return flags;
}

// The live progress line: rewritten in place on a terminal, printed as plain lines otherwise.
struct Progress {
    bool live = isatty(fileno(stdout)) != 0;
    Timer timer;
    double last_print = -1.0;

    static std::string clock(const double seconds) {
        const int s = static_cast<int>(seconds + 0.5);
        char text[32];
        std::snprintf(text, sizeof text, "%d:%02d", s / 60, s % 60);
        return text;
    }
    void update(const int step, const int total, const int first_step, const float loss, const float lr, const int tokens_per_step) {
        const double elapsed = timer.seconds();
        const bool plain_line_due = step % std::max(1, total / 20) == 0 || step == total;
        if (live ? elapsed - last_print < 0.1 && step != total : !plain_line_due) return;
        last_print = elapsed;
        const double steps_done = step - first_step;
        const double tokens_per_second = steps_done * tokens_per_step / std::max(elapsed, 1e-9);
        const double eta = steps_done > 0 ? elapsed / steps_done * (total - step) : 0.0;
        std::printf("%sstep %5d/%d | loss %.4f | lr %.2e | %6.0f tok/s | elapsed %s | eta %s%s", live ? "\r" : "", step, total, loss, lr,
                    tokens_per_second, clock(elapsed).c_str(), clock(eta).c_str(), live ? "  " : "\n");
        std::fflush(stdout);
    }
    void end_line() {
        if (live) std::printf("\n");
    }
};

std::string loss_log_path(const std::string& checkpoint_path, const std::string& suffix) {
    return std::filesystem::path(checkpoint_path).replace_extension(suffix).string();
}

// --tokenizer auto picks byte-level BPE for prose (documents averaging over 64 bytes) and characters otherwise.
Tokenizer choose_tokenizer(const std::string& kind, const std::vector<std::string>& documents, const DocumentSplit& split, const int vocab) {
    check(kind == "auto" || kind == "char" || kind == "bpe", "--tokenizer must be auto, char or bpe, got '" + kind + "'");
    size_t bytes = 0;
    for (const std::string& document : documents) bytes += document.size();
    const bool prose = bytes > 64 * documents.size();
    return kind == "bpe" || (kind == "auto" && prose) ? train_bpe(split.train, vocab) : build_char_tokenizer(documents);
}

// A tokenizer from a checkpoint or from a tokenizer JSON file (./gpt tokenizer train writes those).
Tokenizer load_tokenizer(const std::string& path) {
    check(std::filesystem::is_regular_file(path), "'" + path + "' does not exist or is not a file");
    const std::string text = read_file(path);
    if (!text.empty() && text[0] == '{') return tokenizer_from_json(text, "tokenizer '" + path + "': ");
    return load_checkpoint(path).tokenizer;
}

// Trains and returns the path of the final checkpoint.
std::string cmd_train(const Flags& flags) {
    TrainConfig train;
    train.data_path = flags.text("--data");
    train.out_path = flags.text("--out");
    set_thread_count(flags.positive("--threads"));

    Model model;
    Tokenizer tokenizer;
    TrainingState state;
    std::vector<LogRow> log;
    std::vector<ExpertLoadRow> load_log;
    if (flags.has("--resume")) {
        train.resume_path = flags.text("--resume");
        for (const FlagSpec& spec : model_flags)
            check(!flags.has(spec.name), spec.name + " cannot be combined with --resume: the model's shape comes from the checkpoint");
        for (const std::string name : {"--tokenizer", "--vocab"})
            check(!flags.has(name), name + " cannot be combined with --resume: the tokenizer comes from the checkpoint");
        const std::string where = "checkpoint '" + train.resume_path + "': ";
        Checkpoint checkpoint = load_checkpoint(train.resume_path);
        state = training_state_from_checkpoint(checkpoint, train, where);
        model = std::move(checkpoint.model);
        tokenizer = std::move(checkpoint.tokenizer);
        if (const std::string csv = loss_log_path(train.resume_path, ".loss.csv"); std::filesystem::exists(csv))
            for (const LogRow& row : parse_loss_log_csv(read_file(csv)))
                if (row.step <= state.step) log.push_back(row);
        if (const std::string csv = loss_log_path(train.resume_path, ".experts.csv"); std::filesystem::exists(csv))
            for (const ExpertLoadRow& row : parse_expert_load_csv(read_file(csv)))
                if (row.step <= state.step) load_log.push_back(row);
    }
    // Flags given explicitly override the schedule stored in a checkpoint.
    if (!flags.has("--resume") || flags.has("--steps")) train.steps = flags.positive("--steps");
    if (!flags.has("--resume") || flags.has("--batch")) train.batch = flags.positive("--batch");
    if (!flags.has("--resume") || flags.has("--lr")) train.lr = static_cast<float>(flags.real("--lr"));
    if (!flags.has("--resume") || flags.has("--warmup")) train.warmup = flags.integer("--warmup");
    if (!flags.has("--resume") || flags.has("--eval-every")) train.eval_every = flags.positive("--eval-every");
    if (!flags.has("--resume") || flags.has("--seed")) train.seed = flags.seed("--seed");
    if (!flags.has("--resume") || flags.has("--bias-rate")) train.bias_rate = static_cast<float>(flags.real("--bias-rate"));
    if (!flags.has("--resume") || flags.has("--aux-loss")) train.aux_loss = static_cast<float>(flags.real("--aux-loss"));
    check(train.bias_rate >= 0, "--bias-rate must not be negative, got " + flags.text("--bias-rate"));
    check(train.aux_loss >= 0, "--aux-loss must not be negative, got " + flags.text("--aux-loss"));
    train.stop_after = flags.integer("--stop-after");
    check(train.lr > 0, "--lr must be positive, got " + flags.text("--lr"));
    check(train.warmup >= 0, "--warmup must not be negative, got " + flags.text("--warmup"));
    check(train.stop_after >= 0, "--stop-after must not be negative, got " + flags.text("--stop-after"));

    const std::vector<std::string> documents = read_documents(train.data_path);
    const DocumentSplit split = split_documents(documents);
    if (!flags.has("--resume")) {
        Timer tokenizer_timer;
        tokenizer = choose_tokenizer(flags.text("--tokenizer"), documents, split, flags.integer("--vocab"));
        if (tokenizer.is_bpe)
            std::printf("tokenizer: byte-level BPE, %zu merges learned on the training split in %.1f s\n", tokenizer.merges.size(),
                        tokenizer_timer.seconds());
        ModelConfig config;
        config.vocab_size = tokenizer.vocab_size();
        config.n_layers = flags.positive("--layers");
        config.dim = flags.positive("--dim");
        config.n_heads = flags.positive("--heads");
        config.n_kv_heads = flags.positive("--kv-heads");
        config.ffn_dim = flags.positive("--ffn");
        config.context = flags.positive("--ctx");
        config.tie_embeddings = flags.has("--tie");
        // The MoE flags count only with --experts; given without it they reach validation, which says so.
        config.n_experts = flags.integer("--experts");
        const auto moe_flag = [&](const std::string& name) { return config.n_experts != 0 || flags.has(name) ? flags.integer(name) : 0; };
        config.top_k_experts = moe_flag("--top-k-experts");
        config.n_shared_experts = moe_flag("--shared-experts");
        config.expert_ffn_dim = moe_flag("--expert-ffn");
        config.dense_layers = moe_flag("--dense-layers");
        config.scoring = flags.text("--scoring");
        model = make_model(config);
        init_model(model, train.seed);
        state = make_training_state(model, train.seed);
    }
    check(state.step < train.steps, "the checkpoint has already done " + std::to_string(state.step) + " of " + std::to_string(train.steps) +
                                        " steps; pass a larger --steps to continue");
    const std::vector<int> train_stream = make_stream(tokenizer, split.train);
    const std::vector<int> val_stream = make_stream(tokenizer, split.validation);
    const int T = model.config.context;
    check(train_stream.size() >= size_t(T) + 1, "data file '" + train.data_path + "' has " + std::to_string(train_stream.size()) +
                                                    " training tokens, fewer than one window of T+1 = " + std::to_string(T + 1));

    std::printf("data: %s, %zu documents (%zu train, %zu validation), %zu + %zu tokens\n", train.data_path.c_str(), documents.size(),
                split.train.size(), split.validation.size(), train_stream.size(), val_stream.size());
    std::printf("model: %s, %zu parameters (%zu active per token); batch %d, lr %s, warmup %d, %d steps, %d threads%s\n",
                describe_model(model.config).c_str(), count_parameters(model), count_active_parameters(model), train.batch, float_text(train.lr).c_str(), train.warmup, train.steps, thread_count,
                flags.has("--resume") ? (", resuming at step " + std::to_string(state.step)).c_str() : "");

    const int first_step = state.step;
    const int last_step = train.stop_after > 0 ? std::min(train.steps, first_step + train.stop_after) : train.steps;
    Progress progress;
    Tape tape;
    Batch batch;
    double loss_sum = 0.0;
    int loss_count = 0, saved_step = -1;
    // A non-finite loss, gradient or weight ends the run; the checkpoint on disk is the last good one.
    const auto stop_training = [&](const std::string& reason) {
        progress.end_line();
        throw Error(reason + "; training stopped, " +
                    (saved_step >= 0 ? "the last good checkpoint '" + train.out_path + "' (step " + std::to_string(saved_step) + ") is kept"
                                     : "no checkpoint was written by this run"));
    };
    while (state.step < last_step) {
        StepResult result;
        try {
            result = train_step(model, state, tape, batch, train_stream, train);
        } catch (const Error& e) {
            stop_training(e.what());
        }
        loss_sum += result.loss;
        ++loss_count;
        log.push_back({state.step, result.loss, result.lr, std::nullopt});
        progress.update(state.step, train.steps, first_step, result.loss, result.lr, train.batch * T);
        if (state.step % train.eval_every == 0 || state.step == last_step) {
            if (!all_finite(model)) stop_training("the weights overflowed at step " + std::to_string(state.step));
            const EvalResult val = evaluate(model, val_stream, 32);
            if (val.tokens > 0) log.back().val_loss = static_cast<float>(val.loss);
            save_checkpoint(train.out_path, model, tokenizer, training_tensors(model, state),
                            {{"train_state", training_state_to_json(state, train)}});
            saved_step = state.step;
            write_file_atomically(loss_log_path(train.out_path, ".loss.csv"), loss_log_csv(log));
            write_file_atomically(loss_log_path(train.out_path, ".loss.svg"), loss_plot_svg(log, "gpt.cpp: " + train.data_path));
            if (!val.expert_counts.empty()) {
                append_expert_load(load_log, state.step, val);
                write_file_atomically(loss_log_path(train.out_path, ".experts.csv"), expert_load_csv(load_log));
                write_file_atomically(loss_log_path(train.out_path, ".experts.svg"),
                                      expert_load_svg(load_log, model.config, "gpt.cpp expert load on the validation split: " + train.data_path));
            }
            progress.end_line();
            std::printf("step %d: train loss %.4f (mean of the last %d steps), val loss %s, saved %s\n", state.step, loss_sum / loss_count,
                        loss_count, val.tokens > 0 ? float_text(float(val.loss)).c_str() : "n/a (no validation documents)", train.out_path.c_str());
            std::printf("%s", describe_expert_load(val).c_str());
            if (result.balance_loss > 0) std::printf("  balancing loss %.5f (last step, added to the train loss it is trained on)\n", result.balance_loss);
            loss_sum = 0.0;
            loss_count = 0;
        }
    }
    std::printf("trained %d steps in %s; loss log %s, plot %s\n", state.step - first_step, Progress::clock(progress.timer.seconds()).c_str(),
                loss_log_path(train.out_path, ".loss.csv").c_str(), loss_log_path(train.out_path, ".loss.svg").c_str());
    return train.out_path;
}

std::vector<std::string> select_split(const std::vector<std::string>& documents, const std::string& split) {
    if (split == "all") return documents;
    check(split == "train" || split == "val", "--split must be all, train or val, got '" + split + "'");
    const DocumentSplit parts = split_documents(documents);
    return split == "train" ? parts.train : parts.validation;
}

// The token stream that eval scores: the --split documents of --data, encoded with the checkpoint's tokenizer.
std::vector<int> eval_stream(const Flags& flags, const Tokenizer& tokenizer) {
    const std::vector<std::string> documents = select_split(read_documents(flags.text("--data")), flags.text("--split"));
    std::vector<int> stream;
    try {
        stream = make_stream(tokenizer, documents);
    } catch (const Error& e) {
        throw Error("the checkpoint's tokenizer cannot encode '" + flags.text("--data") + "': " + e.what());
    }
    check(stream.size() >= 2, "no tokens to evaluate in this split of '" + flags.text("--data") + "'");
    return stream;
}

void print_eval_result(const Flags& flags, const EvalResult& result) {
    if (flags.has("--json")) {
        // MoE models add "expert_load": per MoE layer, each expert's share of the routed tokens, and "imbalance": max/mean.
        std::string moe;
        if (!result.expert_counts.empty()) {
            std::string shares, imbalance;
            for (const std::vector<double>& counts : result.expert_counts) {
                std::string row;
                for (const double share : expert_shares(counts)) row += (row.empty() ? "" : ", ") + float_text(float(share));
                shares += (shares.empty() ? "[" : ", [") + row + "]";
                imbalance += (imbalance.empty() ? "" : ", ") + float_text(float(load_imbalance(counts)));
            }
            moe = ", \"expert_load\": [" + shares + "], \"imbalance\": [" + imbalance + "]";
        }
        std::printf("{\"loss\": %.9g, \"perplexity\": %.9g, \"tokens\": %zu%s}\n", result.loss, std::exp(result.loss), result.tokens, moe.c_str());
    } else {
        std::printf("loss %.6f | perplexity %.4f | %zu predicted tokens (%s split of %s)\n", result.loss, std::exp(result.loss), result.tokens,
                    flags.text("--split").c_str(), flags.text("--data").c_str());
        std::printf("%s", describe_expert_load(result).c_str());
    }
}

void cmd_eval(const Flags& flags) {
    set_thread_count(flags.positive("--threads"));
    Checkpoint checkpoint = load_checkpoint(flags.text("--model"));
    print_eval_result(flags, evaluate(checkpoint.model, eval_stream(flags, checkpoint.tokenizer), 32));
}

SampleConfig sample_config_from_flags(const Flags& flags) {
    SampleConfig config;
    config.count = flags.integer("--n");
    config.prompt = flags.text("--prompt");
    config.temperature = static_cast<float>(flags.real("--temperature"));
    config.top_k = flags.integer("--top-k");
    config.top_p = flags.real("--top-p");
    config.seed = flags.seed("--seed");
    config.max_tokens = flags.integer("--max-tokens");
    validate_sample_config(config);
    return config;
}

// Prints config.count documents, one per line, streaming each token as it is drawn. Engine is Model here, and the GPU
// copy of a model in gpt_cuda.cu.
template <typename Engine>
void print_samples(Engine& model, const Tokenizer& tokenizer, const SampleConfig& config) {
    std::vector<int> prompt;
    try {
        prompt = encode(tokenizer, config.prompt);
    } catch (const Error& e) {
        throw Error(std::string("--prompt: ") + e.what());
    }
    // Prefix sharing: the prompt is prefilled once; every document starts from a copy of that state.
    Timer timer;
    const auto prompt_state = prefill_prompt(model, tokenizer, prompt);
    int reached_context = 0;
    size_t generated = 0;
    for (int i = 0; i < config.count; ++i) {
        Rng rng(config.seed + uint64_t(i));
        std::printf("%s", config.prompt.c_str());
        const Sample sample = generate(model, tokenizer, prompt, prompt_state, config, rng, [&](const int token) {
            const std::string piece = decode(tokenizer, std::span<const int>(&token, 1));  // streaming
            std::fwrite(piece.data(), 1, piece.size(), stdout);
            std::fflush(stdout);
        });
        std::printf("\n");
        std::fflush(stdout);
        reached_context += sample.reached_context;
        generated += sample.tokens.size() - prompt.size();
    }
    if (reached_context > 0)
        std::fprintf(stderr, "note: %d of %d documents stopped at the model's context of %d tokens, before EOT\n", reached_context,
                     config.count, model.config.context);
    std::fprintf(stderr, "%zu tokens in %.2f s (%.0f tokens/s); KV cache %zu bytes per token\n", generated, timer.seconds(),
                 generated / std::max(timer.seconds(), 1e-9), kv_cache_bytes_per_token(model.config));
}

void cmd_sample(const Flags& flags) {
    set_thread_count(flags.positive("--threads"));
    const SampleConfig config = sample_config_from_flags(flags);
    Checkpoint checkpoint = load_checkpoint(flags.text("--model"));
    print_samples(checkpoint.model, checkpoint.tokenizer, config);
}

void cmd_tokenizer(const std::string& name, const Flags& flags) {
    if (name == "tokenizer train") {
        const DocumentSplit split = split_documents(read_documents(flags.text("--data")));
        Timer timer;
        const Tokenizer tokenizer = train_bpe(split.train, flags.integer("--vocab"));
        const double seconds = timer.seconds();
        write_file_atomically(flags.text("--out"), tokenizer_to_json(tokenizer) + "\n");
        size_t bytes = 0, tokens = 0;
        for (const std::string& document : split.train) bytes += document.size(), tokens += encode(tokenizer, document).size();
        std::printf("%zu merges in %.2f s, written to %s; training split: %zu bytes -> %zu tokens (%.2f bytes per token)\n",
                    tokenizer.merges.size(), seconds, flags.text("--out").c_str(), bytes, tokens, double(bytes) / std::max<size_t>(tokens, 1));
        return;
    }
    const Tokenizer tokenizer = load_tokenizer(flags.text("--model"));
    if (name == "tokenizer encode") {
        const std::string text = flags.has("--text") ? flags.text("--text")
                                                     : std::string((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
        const std::vector<int> ids = encode(tokenizer, text);
        for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%d", i ? " " : "", ids[i]);
        std::printf("\n");
        for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%s", i ? " " : "", json_quote(decode(tokenizer, std::span(&ids[i], 1))).c_str());
        std::printf("\n%zu bytes -> %zu tokens\n", text.size(), ids.size());
        return;
    }
    std::istringstream input(flags.has("--ids") ? flags.text("--ids")
                                                : std::string((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>()));
    std::vector<int> ids;
    for (std::string word; input >> word;) {
        size_t used = 0;
        int id = -1;
        try {
            id = std::stoi(word, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        check(used == word.size(), "token id '" + word + "' is not an integer");
        ids.push_back(id);
    }
    std::printf("%s\n", decode(tokenizer, ids).c_str());
}

void cmd_bench(const Flags& flags) {
    const int threads = flags.positive("--threads");
    const std::vector<BenchRow> rows = run_benchmarks(threads);
    if (flags.has("--json")) {
        std::printf("[");
        for (size_t i = 0; i < rows.size(); ++i)
            std::printf("%s\n  {\"name\": %s, \"value\": %.6g, \"unit\": %s}", i ? "," : "", json_quote(rows[i].name).c_str(), rows[i].value,
                        json_quote(rows[i].unit).c_str());
        std::printf("\n]\n");
        return;
    }
    std::printf("| benchmark | value | unit |\n|---|---:|---|\n");
    for (const BenchRow& row : rows) std::printf("| %s | %.4g | %s |\n", row.name.c_str(), row.value, row.unit.c_str());
}

int run_command_line(const std::vector<std::string>& args) {
    if (!args.empty() && (args[0] == "--help" || args[0] == "-h" || args[0] == "help")) {
        std::printf("%s", usage().c_str());
        return 0;
    }
    const std::vector<Command> all = commands();
    const bool default_run = args.empty();
    const bool two_words = args.size() >= 2 && args[0] == "tokenizer";  // "tokenizer train" and its siblings
    const std::string name = default_run ? "train" : two_words ? args[0] + " " + args[1] : args[0];
    const auto command = std::find_if(all.begin(), all.end(), [&](const Command& c) { return c.name == name; });
    if (command == all.end()) throw UsageError("unknown command '" + name + "'");
    const std::vector<std::string> rest(args.begin() + (default_run ? 0 : two_words ? 2 : 1), args.end());
    if (std::find(rest.begin(), rest.end(), "--help") != rest.end()) {
        std::printf("./gpt %s: %s\n", command->name.c_str(), command->summary.c_str());
        for (const FlagSpec& flag : command->flags) std::printf("%s", flag_help_line(flag).c_str());
        return 0;
    }
    const Flags flags = parse_flags(*command, rest);
    if (name == "train") {
        const std::string checkpoint = cmd_train(flags);
        if (default_run) {
            std::printf("\n20 names sampled from %s:\n", checkpoint.c_str());
            cmd_sample(parse_flags(all[2], {"--model", checkpoint}));
        }
    } else if (name == "eval") {
        cmd_eval(flags);
    } else if (name == "sample") {
        cmd_sample(flags);
    } else if (name.starts_with("tokenizer")) {
        cmd_tokenizer(name, flags);
    } else {
        cmd_bench(flags);
    }
    return 0;
}

#ifndef GPT_NO_MAIN
int main(int argc, char** argv) {
    try {
        return run_command_line(std::vector<std::string>(argv + 1, argv + argc));
    } catch (const UsageError& e) {
        std::fprintf(stderr, "error: %s\n\n%s", e.what(), usage().c_str());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
#endif
