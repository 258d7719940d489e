// tests.cpp: the doctest suite. It includes gpt.cpp with its main compiled out, so every function is tested
// directly. Test suites are numbered like gpt.cpp's sections, so a failure points at a section.
// Each test compares against something independent of the code under test: a hand-computed value,
// a naive loop written here, or central finite differences.
//
// Built twice by the Makefile: `tests` (g++, CPU tests) and, where nvcc exists, `tests_cuda`
// (-DGPT_CUDA_TESTS: includes gpt_cuda.cu and runs the GPU suites, skipped when no GPU is present).

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define GPT_NO_MAIN
#ifdef GPT_CUDA_TESTS
#include "gpt_cuda.cu"

// ---- GPU tests: every stage of gpt_cuda.cu against gpt.cpp's CPU reference, through the CLI's own run_stage ----
// Tolerance: DESIGN.md §7 (|gpu - ref| <= atol + rtol |ref|, NaN fails; outputs are poisoned with NaN first, so an
// element that is never written fails too). Scores of standard deviation 40 overflow e^x in float, so a kernel that
// forgets to subtract the max fails. On a machine without a CUDA device every case is skipped, and the message says so.

bool no_cuda_device() {
    static const bool missing = [] {
        const bool none = !cuda_device_available();
        if (none) std::printf("[cuda tests] no CUDA device found: the 'cuda: stage N' test suites are skipped\n");
        return none;
    }();
    return missing;
}

AttentionShape attention_shape(const int B, const int H, const int G, const int Nq, const int Nk, const int hd,
                               const bool causal) {
    AttentionShape s;
    s.B = B, s.H = H, s.G = G, s.Nq = Nq, s.Nk = Nk, s.hd = hd, s.causal = causal;
    return s;
}

// Runs stage `id` on `shape` (check only, no timing) and expects it to pass.
void expect_stage_passes(const char* id, const AttentionShape& shape, const float score_std = 1.0f, const uint64_t seed = 1) {
    RunConfig config;
    config.shape = shape, config.score_std = score_std, config.seed = seed, config.timed_runs = 0, config.sample_rows = 0;
    const StageResult result = run_stage(find_stage(id), config);
    INFO("stage " << id << ", " << attention_workload(shape) << ", score std " << score_std << ": " << result.failure);
    CHECK(result.passed);
    CHECK(result.checked_rows == result.total_rows);
}

// The attention cases: B in {1, 2}; H/G in {4/4, 8/2, 6/1}; Nq, Nk in {1, 17, 100, 1000}; d in {32, 64, 80, 128};
// Nq != Nk both ways, causal rows that see no key (Nq > Nk), and scores large enough to need the max-subtraction.
// The subcase names carry the sizes, so a sanitizer run can leave out the large ones: -sce='*N*1000*'.
void expect_attention_stage_passes(const char* id) {
    struct Case {
        int B, H, G, Nq, Nk, hd;
        bool causal;
        float score_std;
    };
    const Case cases[] = {
        {1, 4, 4, 1, 1, 32, false, 1.0f},      {2, 8, 2, 17, 17, 64, false, 1.0f},    {1, 6, 1, 100, 100, 80, false, 40.0f},
        {2, 4, 4, 17, 100, 128, false, 1.0f},  {1, 8, 2, 100, 17, 32, false, 40.0f},  {1, 4, 4, 1, 1, 64, true, 1.0f},
        {2, 8, 2, 17, 17, 128, true, 40.0f},   {1, 6, 1, 100, 17, 64, true, 1.0f},    {2, 4, 4, 17, 100, 80, true, 1.0f},
        {1, 8, 2, 1, 100, 32, true, 40.0f},    {1, 4, 4, 100, 1, 128, true, 1.0f},    {1, 4, 4, 1000, 1000, 64, false, 40.0f},
        {1, 6, 1, 1000, 1000, 128, true, 1.0f}, {2, 8, 2, 1000, 100, 80, true, 40.0f}, {1, 4, 4, 100, 1000, 32, true, 1.0f},
        {1, 4, 4, 1000, 17, 64, false, 1.0f},
    };
    for (const Case& c : cases) {
        const AttentionShape shape = attention_shape(c.B, c.H, c.G, c.Nq, c.Nk, c.hd, c.causal);
        const std::string name = attention_workload(shape) + (c.score_std > 1.0f ? " large scores" : "");
        SUBCASE(name.c_str()) { expect_stage_passes(id, shape, c.score_std); }
    }
}

// Stage 0 and 3a: the score matrix [B*H*Nq, Nk]; stage 1: B*H products [Nq, Nk] x [Nk, hd] (1d: [Nq, hd] x [Nk, hd]^T).
// The sizes 1, 17 and 333 are multiples of no tile.
void expect_matrix_stage_passes(const char* id, const float score_std) {
    const AttentionShape shapes[] = {attention_shape(1, 1, 1, 1, 1, 1, false),     attention_shape(1, 1, 1, 17, 333, 17, false),
                                     attention_shape(1, 1, 1, 333, 17, 333, false), attention_shape(1, 1, 1, 333, 333, 333, false),
                                     attention_shape(2, 4, 2, 17, 100, 64, false),  attention_shape(1, 1, 1, 1, 1000, 80, false)};
    for (const AttentionShape& shape : shapes) {
        const std::string name = "Nq" + std::to_string(shape.Nq) + " Nk" + std::to_string(shape.Nk) + " d" +
                                 std::to_string(shape.hd) + " B" + std::to_string(shape.B) + " H" + std::to_string(shape.H);
        SUBCASE(name.c_str()) { expect_stage_passes(id, shape, score_std); }
    }
}

TEST_SUITE("cuda: stage 0") {
    TEST_CASE("0a element-wise scale" * doctest::skip(no_cuda_device())) { expect_matrix_stage_passes("0a", 1.0f); }
    TEST_CASE("0b row sum" * doctest::skip(no_cuda_device())) { expect_matrix_stage_passes("0b", 1.0f); }
    TEST_CASE("0c row softmax, scores large enough to overflow without the max" * doctest::skip(no_cuda_device())) {
        expect_matrix_stage_passes("0c", 40.0f);
    }
}

TEST_SUITE("cuda: stage 1") {
    TEST_CASE("1a naive matmul at awkward sizes" * doctest::skip(no_cuda_device())) { expect_matrix_stage_passes("1a", 1.0f); }
    TEST_CASE("1b shared-memory tiled matmul at awkward sizes" * doctest::skip(no_cuda_device())) {
        expect_matrix_stage_passes("1b", 1.0f);
    }
    TEST_CASE("1c register-tiled matmul at awkward sizes" * doctest::skip(no_cuda_device())) {
        expect_matrix_stage_passes("1c", 1.0f);
    }
    TEST_CASE("1d Q K^T at awkward sizes" * doctest::skip(no_cuda_device())) { expect_matrix_stage_passes("1d", 1.0f); }
}

TEST_SUITE("cuda: stage 2") {
    TEST_CASE("2 naive attention" * doctest::skip(no_cuda_device())) { expect_attention_stage_passes("2"); }
}

TEST_SUITE("cuda: stage 3") {
    TEST_CASE("3a online softmax, scores large enough to overflow without the max" * doctest::skip(no_cuda_device())) {
        expect_matrix_stage_passes("3a", 40.0f);
    }
    TEST_CASE("3b streaming attention" * doctest::skip(no_cuda_device())) { expect_attention_stage_passes("3b"); }
}

TEST_SUITE("cuda: stage 4") {
    TEST_CASE("4 tiled attention, FlashAttention-1 order" * doctest::skip(no_cuda_device())) {
        expect_attention_stage_passes("4");
    }
}

TEST_SUITE("cuda: stage 5") {
    TEST_CASE("5 fused flash attention, FlashAttention-2 order" * doctest::skip(no_cuda_device())) {
        expect_attention_stage_passes("5");
    }
}

TEST_SUITE("cuda: stage 6") {
    TEST_CASE("6 causal flash attention" * doctest::skip(no_cuda_device())) { expect_attention_stage_passes("6"); }
    TEST_CASE("6 and 8: the LSE of a row that sees no key is -inf and its output 0" * doctest::skip(no_cuda_device())) {
        // Nq = 100 > Nk = 17, causal: rows 0..82 see no key. The reference says so too; check it explicitly here.
        RunConfig config;
        config.shape = attention_shape(1, 4, 4, 100, 17, 64, true), config.timed_runs = 0, config.sample_rows = 0;
        for (const char* id : {"6", "8"}) {
            CAPTURE(id);
            Problem problem = make_problem(StageKind::attention, config);
            REQUIRE(run_stage(find_stage(id), problem).passed);
            std::vector<float> out(problem.out.count), lse(problem.lse.count);
            problem.out.download(out);
            problem.lse.download(lse);
            CHECK(lse[0] == -std::numeric_limits<float>::infinity());
            CHECK(out[0] == 0.0f);
            CHECK(std::isfinite(lse[99]));
        }
    }
    TEST_CASE("6 without the mask: blocks of rows cut between two blocks' shares merge to the CPU's answer" *
              doctest::skip(no_cuda_device())) {
        // Few blocks for the work, so that most shares begin or end inside a block of rows (one tile a row block
        // cannot be cut: Nk = 1). Against the CPU, and against the same call with one block per block of rows.
        struct Case {
            int B, H, G, Nq, Nk, hd;
            float score_std;
        };
        const Case cases[] = {{1, 4, 4, 300, 1000, 128, 1.0f}, {2, 8, 2, 17, 333, 80, 40.0f},
                              {1, 6, 1, 1000, 65, 32, 1.0f},   {1, 4, 4, 100, 1, 64, 40.0f}};
        for (const Case& c : cases) {
            const AttentionShape shape = attention_shape(c.B, c.H, c.G, c.Nq, c.Nk, c.hd, false);
            CAPTURE(attention_workload(shape));
            Rng rng(11);
            const size_t q_size = size_t(c.H) * c.Nq * c.hd, kv_size = size_t(c.G) * c.Nk * c.hd;
            const std::vector<float> q = random_vector(rng, c.B * q_size, c.score_std);
            const std::vector<float> k = random_vector(rng, c.B * kv_size, 1.0f);
            const std::vector<float> v = random_vector(rng, c.B * kv_size, 1.0f);
            std::vector<float> expected(q.size()), expected_lse(size_t(c.B) * c.H * c.Nq);
            for (int b = 0; b < c.B; ++b)
                attention_forward(std::span(expected).subspan(b * q_size, q_size),
                                  std::span(expected_lse).subspan(size_t(b) * c.H * c.Nq, size_t(c.H) * c.Nq),
                                  std::span(q).subspan(b * q_size, q_size), std::span(k).subspan(b * kv_size, kv_size),
                                  std::span(v).subspan(b * kv_size, kv_size), c.H, c.G, c.Nq, c.Nk, c.hd, false);
            const DeviceBuffer<float> q_device = to_device(q), k_device = to_device(k), v_device = to_device(v);
            const int row_blocks = c.B * c.H * int(ceil_div(c.Nq, flash_rows));
            std::vector<float> uncut;
            DeviceBuffer<float> workspace;
            for (const int blocks : {row_blocks, 1, 3, row_blocks / 2 + 1, row_blocks - 1}) {
                CAPTURE(blocks);
                DeviceBuffer<float> out(q.size()), lse(expected_lse.size());
                out.poison(), lse.poison();
                flash_attention_balanced(out.data, lse.data, q_device.data, k_device.data, v_device.data, shape,
                                         workspace, std::max(blocks, 1));
                CUDA_CHECK(cudaDeviceSynchronize());
                std::vector<float> got(q.size()), got_lse(expected_lse.size());
                out.download(got), lse.download(got_lse);
                for (size_t i = 0; i < got.size(); ++i) REQUIRE(close_enough(got[i], expected[i], 1e-4, 1e-3));
                for (size_t i = 0; i < got_lse.size(); ++i) REQUIRE(close_enough(got_lse[i], expected_lse[i], 1e-4, 1e-3));
                if (blocks == row_blocks) uncut = got;
                for (size_t i = 0; i < got.size(); ++i) REQUIRE(close_enough(got[i], uncut[i], 1e-5, 1e-4));
            }
        }
    }
    TEST_CASE("stages that cannot take a head size say so" * doctest::skip(no_cuda_device())) {
        RunConfig config;
        config.shape = attention_shape(1, 4, 4, 17, 17, 96, false), config.timed_runs = 0;
        for (const char* id : {"3b", "4", "5", "6", "8"}) CHECK_THROWS_WITH_AS(run_stage(find_stage(id), config), doctest::Contains("head size 96"), Error);
        expect_stage_passes("2", config.shape);  // stage 2 is built from matmuls and takes any head size
    }
}

TEST_SUITE("cuda: stage 8") {
    TEST_CASE("8 tensor cores, split-precision TF32" * doctest::skip(no_cuda_device())) {
        expect_attention_stage_passes("8");
    }
}

TEST_SUITE("cuda: stage 7") {
    TEST_CASE("7 decode attention, keys split across blocks" * doctest::skip(no_cuda_device())) {
        expect_attention_stage_passes("7");
    }
    TEST_CASE("7 split-KV equals one block and the CPU, with empty blocks and the length on the device" *
              doctest::skip(no_cuda_device())) {
        // A cache of capacity 300 holding past + Nq = 151 or 154 keys: blocks past the last key are empty.
        constexpr int H = 6, G = 2, hd = 64, capacity = 300, past = 150;
        Rng rng(3);
        const std::vector<float> k = random_vector(rng, size_t(G) * capacity * hd, 1.0f);
        const std::vector<float> v = random_vector(rng, size_t(G) * capacity * hd, 1.0f);
        const DeviceBuffer<float> k_device = to_device(k), v_device = to_device(v);
        DeviceBuffer<int> past_device(1);
        past_device.upload(std::vector<int>{past});
        for (const int Nq : {1, 4}) {
            const std::vector<float> q = random_vector(rng, size_t(H) * Nq * hd, 1.0f);
            const DeviceBuffer<float> q_device = to_device(q);
            std::vector<float> expected(q.size()), expected_lse(size_t(H) * Nq);
            attention_forward(expected, expected_lse, q, k, v, H, G, Nq, past + Nq, hd, true, size_t(capacity) * hd);
            AttentionShape shape = attention_shape(1, H, G, Nq, past + Nq, hd, true);
            std::vector<float> unsplit;
            for (const int split_keys : {capacity, 64, 7, 1}) {
                SplitKv kv;
                kv.head_stride = int64_t(capacity) * hd, kv.capacity = capacity, kv.split_keys = split_keys;
                kv.past = split_keys == 7 ? -1000 : past;  // with 7 keys per block, the length comes from the device
                if (split_keys == 7) kv.past_on_device = past_device.data;
                CAPTURE(Nq);
                CAPTURE(split_keys);
                if (split_keys < capacity) CHECK(decode_splits(kv) * split_keys >= past + Nq + split_keys);  // empty ones
                DeviceBuffer<float> out(q.size()), lse(size_t(H) * Nq), workspace;
                out.poison(), lse.poison();
                decode_attention(nullptr, out.data, lse.data, q_device.data, k_device.data, v_device.data, shape, kv,
                                 workspace);
                CUDA_CHECK(cudaDeviceSynchronize());
                std::vector<float> got(q.size()), got_lse(size_t(H) * Nq);
                out.download(got), lse.download(got_lse);
                for (size_t i = 0; i < got.size(); ++i) REQUIRE(close_enough(got[i], expected[i], 1e-4, 1e-3));
                for (size_t i = 0; i < got_lse.size(); ++i) REQUIRE(close_enough(got_lse[i], expected_lse[i], 1e-4, 1e-3));
                if (split_keys == capacity) unsplit = got;
                for (size_t i = 0; i < got.size(); ++i) REQUIRE(close_enough(got[i], unsplit[i], 1e-5, 1e-4));
            }
        }
    }
}

// ---- The GPU model against gpt.cpp: small random models written as checkpoints and loaded back ----

struct TestModel {
    Model model;
    Tokenizer tokenizer;
};

// The Mixture-of-Experts part of a test model's config; experts = 0 is a dense model.
struct TestMoe {
    std::string scoring = "sigmoid";
    int experts = 0, top_k = 0, shared = 0, expert_ffn = 0, dense_layers = 0;
};

// V = 37 (36 characters and EOT); context 160 spans three stage-7 blocks of 64 keys. F is a multiple of no tile. The
// RMSNorm weights are drawn from [0.5, 1.5] (init_model sets them to 1), so a GPU that folds them wrongly fails.
// MoE layers get a router 12 times the init scale, so the router logits spread over a few units and the K-th and
// (K+1)-th keys of a row are rarely within float rounding of each other (where they are, CPU and GPU may choose
// differently; these seeds have no such row, and the evaluation test checks that both engines count the same
// choices), and a routing bias of +-0.2 that changes choices (checked for sigmoid scoring; softmax ignores it).
TestModel test_model(const int heads, const int kv_heads, const bool tied, const uint64_t seed,
                     const TestMoe& moe = {}) {
    std::vector<char32_t> chars;
    for (char32_t c = 'a'; c <= 'z'; ++c) chars.push_back(c);
    for (char32_t c = '0'; c <= '9'; ++c) chars.push_back(c);
    TestModel t{{}, make_char_tokenizer(chars)};
    ModelConfig c;
    c.vocab_size = t.tokenizer.vocab_size(), c.dim = 32 * heads, c.n_layers = 2, c.n_heads = heads;
    c.n_kv_heads = kv_heads, c.ffn_dim = 97, c.context = 160, c.tie_embeddings = tied;
    c.n_experts = moe.experts, c.top_k_experts = moe.top_k, c.n_shared_experts = moe.shared;
    c.expert_ffn_dim = moe.expert_ffn, c.scoring = moe.scoring, c.dense_layers = moe.dense_layers;
    t.model = make_model(c);
    init_model(t.model, seed);
    Rng rng(seed + 1000);
    for (Layer& layer : t.model.layers)
        for (Tensor* norm : {&layer.attn_norm, &layer.ffn_norm})
            for (float& g : norm->data) g = 0.5f + rng.uniform();
    for (float& g : t.model.final_norm.data) g = 0.5f + rng.uniform();
    for (int l = 0; l < c.n_layers; ++l) {
        if (!c.is_moe_layer(l)) continue;
        MixtureOfExperts& layer = t.model.layers[l].moe;
        for (float& w : layer.router.data) w *= 12.0f;
        for (int e = 0; e < c.n_experts; ++e) layer.router_bias.data[e] = e % 2 ? 0.2f : -0.2f;
    }
    return t;
}

// Sigmoid and softmax scoring, K = 1 and 2, with and without a shared expert, with a dense first layer or none; Fe
// a multiple of 4 (float4 loads in a decode step) or not.
const std::vector<TestMoe> moe_cases = {
    {"sigmoid", 4, 2, 1, 24, 1}, {"sigmoid", 5, 1, 0, 21, 0}, {"softmax", 4, 2, 0, 20, 1}, {"softmax", 6, 1, 2, 13, 0}};

std::vector<int> random_tokens(const int n, const int V, const uint64_t seed) {
    Rng rng(seed);
    std::vector<int> tokens(n);
    for (int& token : tokens) token = int(rng.below(V));
    return tokens;
}

std::vector<float> cpu_logits(Model& model, const std::vector<int>& tokens, const int B, const int T) {
    Tape tape;
    tape.record = false;
    return model_forward(tape, model, tokens, B, T).data;
}

std::vector<float> gpu_logits(GpuModel& gpu, const std::vector<int>& tokens, const int B, const int T) {
    upload_tokens(gpu.work.tokens, tokens, gpu.config.vocab_size);
    gpu_forward(gpu, B, T, nullptr);
    std::vector<float> logits(tokens.size() * gpu.config.vocab_size);
    CUDA_CHECK(cudaMemcpy(logits.data(), gpu.work.logits.data, logits.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return logits;
}

// DESIGN.md §7: |gpu - cpu| <= 1e-4 + 1e-3 |cpu| everywhere (NaN fails).
void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu) {
    REQUIRE(gpu.size() == cpu.size());
    for (size_t i = 0; i < gpu.size(); ++i) {
        INFO("element " << i << ": gpu " << gpu[i] << ", cpu " << cpu[i]);
        REQUIRE(close_enough(gpu[i], cpu[i], 1e-4, 1e-3));
    }
}

// A temporary checkpoint file, removed at the end of the test.
struct TempCheckpoint {
    std::string path = (std::filesystem::temp_directory_path() /
                        ("gpt_cuda_test_" + std::to_string(::getpid()) + ".safetensors"))
                           .string();
    ~TempCheckpoint() { std::filesystem::remove(path); }
};

// t's model on the GPU, through the checkpoint writer and loader as the CLI loads it, for two windows side by side.
GpuModel upload_through_checkpoint(TestModel& t) {
    TempCheckpoint file;
    save_checkpoint(file.path, t.model, t.tokenizer);
    const Checkpoint loaded = load_checkpoint(file.path);
    return upload_model(loaded.model, "6", 2 * loaded.model.config.context);
}

// GPU logits equal the CPU's for one window of lengths 1 to the context, and for two windows side by side.
void check_logits_at_lengths(GpuModel& gpu, TestModel& t) {
    const ModelConfig& c = t.model.config;
    for (const int T : {1, 2, 17, 100, c.context}) {
        const std::vector<int> tokens = random_tokens(T, c.vocab_size, 7 + T);
        SUBCASE((describe_model(c) + " T" + std::to_string(T)).c_str()) {
            expect_close(gpu_logits(gpu, tokens, 1, T), cpu_logits(t.model, tokens, 1, T));
        }
    }
    SUBCASE((describe_model(c) + " two windows side by side").c_str()) {
        const std::vector<int> tokens = random_tokens(2 * c.context, c.vocab_size, 5);
        expect_close(gpu_logits(gpu, tokens, 2, c.context), cpu_logits(t.model, tokens, 2, c.context));
    }
}

TEST_SUITE("cuda: GPU model") {
    TEST_CASE("logits equal the CPU's: G < H and G = H, tied and untied, lengths 1 to the context, every stage" *
              doctest::skip(no_cuda_device())) {
        struct Case {
            int heads, kv_heads;
            bool tied;
        };
        for (const Case& model_case : {Case{4, 2, false}, Case{2, 2, true}, Case{4, 1, true}}) {
            TestModel t = test_model(model_case.heads, model_case.kv_heads, model_case.tied, 11);
            const ModelConfig& c = t.model.config;
            GpuModel gpu = upload_through_checkpoint(t);
            check_logits_at_lengths(gpu, t);
            for (const char* stage : {"2", "3b", "4", "5", "8"}) {
                SUBCASE((describe_model(c) + " stage " + stage).c_str()) {
                    gpu.attention_stage = &model_attention_stage(stage);
                    const std::vector<int> tokens = random_tokens(100, c.vocab_size, 9);
                    expect_close(gpu_logits(gpu, tokens, 1, 100), cpu_logits(t.model, tokens, 1, 100));
                }
            }
        }
    }
    TEST_CASE("evaluation loss equals the CPU's to 1e-4 relative" * doctest::skip(no_cuda_device())) {
        TestModel t = test_model(4, 2, false, 12);
        // 1001 tokens: six full windows of 160 (three side by side per forward) and a short last window of 40.
        const std::vector<int> stream = random_tokens(1001, t.model.config.vocab_size, 4);
        GpuModel gpu = upload_model(t.model, "6", 3 * t.model.config.context);
        const EvalResult on_gpu = evaluate(gpu, stream), on_cpu = evaluate(t.model, stream, 32);
        CHECK(on_gpu.tokens == on_cpu.tokens);
        CHECK(std::fabs(on_gpu.loss - on_cpu.loss) <= 1e-4 * on_cpu.loss);
    }
    TEST_CASE("one row through a linear layer (the decode step's gemv) equals the product in double: rows long enough "
              "to be split across warps, N not a multiple of a block's rows, float4 and scalar loads" *
              doctest::skip(no_cuda_device())) {
        GpuModel model;  // the one-row path of linear() reads only the config's norm_eps
        const double eps = model.config.norm_eps;
        for (const int K : {5, 36, 768, 1031, 2048, 2500})
            for (const LinearOutput mode : {LinearOutput::store, LinearOutput::add, LinearOutput::swiglu})
                for (const bool normalize : {false, true}) {
                    const int N = 37, rows_w = mode == LinearOutput::swiglu ? 2 * N : N;
                    CAPTURE(K);
                    CAPTURE(int(mode));
                    CAPTURE(normalize);
                    Rng rng(uint64_t(K) + 7);
                    std::vector<float> w(size_t(rows_w) * K), x(K), out(N);
                    for (float& v : w) v = rng.uniform() - 0.5f;
                    for (float& v : x) v = 2.0f * rng.uniform() - 1.0f;
                    for (float& v : out) v = rng.uniform();
                    double squares = 0.0;
                    for (const float v : x) squares += double(v) * v;
                    const double r = normalize ? 1.0 / std::sqrt(squares / K + eps) : 1.0;
                    std::vector<double> product(rows_w, 0.0);
                    for (int j = 0; j < rows_w; ++j) {
                        for (int k = 0; k < K; ++k) product[j] += double(w[size_t(j) * K + k]) * x[k];
                        product[j] *= r;
                    }
                    std::vector<float> expected(N);
                    for (int j = 0; j < N; ++j) {
                        const double silu = product[j] / (1.0 + std::exp(-product[j]));
                        expected[j] = float(mode == LinearOutput::store ? product[j]
                                            : mode == LinearOutput::add ? out[j] + product[j]
                                                                        : silu * product[N + j]);
                    }
                    DeviceBuffer<float> w_gpu = to_device(w), x_gpu = to_device(x), out_gpu = to_device(out);
                    linear(model, out_gpu.data, x_gpu.data, w_gpu.data, normalize, 1, K, N, mode);
                    CUDA_CHECK(cudaStreamSynchronize(model_stream));
                    CUDA_CHECK(cudaMemcpy(out.data(), out_gpu.data, N * sizeof(float), cudaMemcpyDeviceToHost));
                    expect_close(out, expected);
                }
    }
    TEST_CASE("prefill + decode equals the full forward on the GPU, up to the last position, also for a model wide "
              "enough that the decode step splits its q, k, v and [gate; up] rows across warps (D = 800)" *
              doctest::skip(no_cuda_device())) {
        for (const int heads : {4, 25}) {
            CAPTURE(heads);
            TestModel t = test_model(heads, heads == 4 ? 2 : 1, false, 13);
            const ModelConfig& c = t.model.config;
            GpuModel gpu = upload_model(t.model, "6", c.context);
            const std::vector<int> tokens = random_tokens(c.context, c.vocab_size, 8);
            const std::vector<float> full = gpu_logits(gpu, tokens, 1, c.context);
            const auto row = [&](const int position) {
                return std::vector<float>(full.begin() + size_t(position) * c.vocab_size,
                                          full.begin() + size_t(position + 1) * c.vocab_size);
            };
            for (const int prompt : {1, 50, c.context - 20}) {
                CAPTURE(prompt);
                GpuInferenceState state = prefill(gpu, std::span<const int>(tokens.data(), prompt));
                expect_close(state.logits, row(prompt - 1));
                for (int position = prompt; position < std::min(prompt + 20, c.context); ++position) {
                    decode_step(gpu, state, tokens[position]);
                    CHECK(state.cache.length == position + 1);
                    expect_close(state.logits, row(position));
                }
            }
            // A copy of a state (prefix sharing) decodes like the original.
            const GpuInferenceState prompt_state = prefill(gpu, std::span<const int>(tokens.data(), 30));
            GpuInferenceState copy = prompt_state, other = prompt_state;
            decode_step(gpu, copy, tokens[30]);
            decode_step(gpu, other, tokens[30]);
            CHECK(copy.logits == other.logits);
            expect_close(copy.logits, row(30));
        }
    }
    TEST_CASE("greedy samples equal the CPU's: dense models and every MoE routing case" *
              doctest::skip(no_cuda_device())) {
        size_t generated = 0;  // the comparison means something only if the samples are not all empty
        std::vector<TestModel> models;
        for (const bool tied : {false, true}) models.push_back(test_model(4, 2, tied, 14));
        for (const TestMoe& moe : moe_cases) models.push_back(test_model(2, 1, false, 24, moe));
        for (TestModel& t : models) {
            GpuModel gpu = upload_model(t.model, "6", t.model.config.context);
            SampleConfig config;
            config.temperature = 0.0f;
            for (const std::string prompt : {"", "abc", "9"}) {
                const std::vector<int> prompt_tokens = encode(t.tokenizer, prompt);
                Rng cpu_rng(1), gpu_rng(1);
                const Sample on_cpu = generate(t.model, t.tokenizer, prompt_tokens,
                                               prefill_prompt(t.model, t.tokenizer, prompt_tokens), config, cpu_rng);
                const Sample on_gpu = generate(gpu, t.tokenizer, prompt_tokens,
                                               prefill_prompt(gpu, t.tokenizer, prompt_tokens), config, gpu_rng);
                CAPTURE(describe_model(t.model.config));
                CAPTURE(prompt);
                generated += on_gpu.tokens.size() - prompt_tokens.size();
                CHECK(on_gpu.tokens == on_cpu.tokens);
                CHECK(on_gpu.reached_context == on_cpu.reached_context);
            }
        }
        CHECK(generated > 150);
    }
    TEST_CASE("MoE: logits equal the CPU's for every routing case, lengths 1 to the context" *
              doctest::skip(no_cuda_device())) {
        for (const TestMoe& moe : moe_cases) {
            TestModel t = test_model(2, 1, false, 21, moe);
            const ModelConfig& c = t.model.config;
            GpuModel gpu = upload_through_checkpoint(t);
            check_logits_at_lengths(gpu, t);
            if (moe.scoring == "sigmoid") {
                SUBCASE((describe_model(c) + " the routing bias changes choices").c_str()) {
                    const std::vector<int> stream = random_tokens(c.context + 1, c.vocab_size, 6);
                    Model unbiased = t.model;
                    for (Layer& layer : unbiased.layers)
                        std::fill(layer.moe.router_bias.data.begin(), layer.moe.router_bias.data.end(), 0.0f);
                    CHECK(evaluate(unbiased, stream, 1).expert_counts != evaluate(t.model, stream, 1).expert_counts);
                }
            }
        }
    }
    TEST_CASE("MoE: evaluation loss equals the CPU's to 1e-4 relative, expert loads equal" *
              doctest::skip(no_cuda_device())) {
        for (const TestMoe& moe : moe_cases) {
            TestModel t = test_model(2, 1, false, 22, moe);
            CAPTURE(describe_model(t.model.config));
            // 962 tokens: six full windows of 160 (three side by side per forward) and a last window of one token.
            const std::vector<int> stream = random_tokens(962, t.model.config.vocab_size, 5);
            GpuModel gpu = upload_model(t.model, "6", 3 * t.model.config.context);
            const EvalResult on_gpu = evaluate(gpu, stream), on_cpu = evaluate(t.model, stream, 32);
            CHECK(on_gpu.tokens == on_cpu.tokens);
            CHECK(std::fabs(on_gpu.loss - on_cpu.loss) <= 1e-4 * on_cpu.loss);
            CHECK(on_gpu.moe_layers == on_cpu.moe_layers);
            CHECK(on_gpu.expert_counts == on_cpu.expert_counts);
            CHECK(describe_expert_load(on_gpu) == describe_expert_load(on_cpu));
        }
    }
    TEST_CASE("MoE: prefill + decode equals the full forward on the GPU" * doctest::skip(no_cuda_device())) {
        for (const TestMoe& moe : moe_cases) {
            TestModel t = test_model(2, 1, false, 23, moe);
            const ModelConfig& c = t.model.config;
            CAPTURE(describe_model(c));
            GpuModel gpu = upload_model(t.model, "6", c.context);
            const std::vector<int> tokens = random_tokens(c.context, c.vocab_size, 9);
            const std::vector<float> full = gpu_logits(gpu, tokens, 1, c.context);
            for (const int prompt : {1, 50, c.context - 20}) {
                CAPTURE(prompt);
                GpuInferenceState state = prefill(gpu, std::span<const int>(tokens.data(), prompt));
                for (int position = prompt; position < std::min(prompt + 20, c.context); ++position) {
                    decode_step(gpu, state, tokens[position]);
                    expect_close(state.logits, std::vector<float>(full.begin() + size_t(position) * c.vocab_size,
                                                                  full.begin() + size_t(position + 1) * c.vocab_size));
                }
            }
        }
    }
    TEST_CASE("bad input: the CPU's checks, plus head sizes, stages and a model too big for the GPU" *
              doctest::skip(no_cuda_device())) {
        TestModel t = test_model(4, 2, false, 15);
        const ModelConfig& c = t.model.config;
        GpuModel gpu = upload_model(t.model, "6", c.context);
        const std::vector<int> too_long(c.context + 1, 0);
        CHECK_THROWS_WITH_AS(prefill(gpu, too_long), doctest::Contains("do not fit the model's context"), Error);
        CHECK_THROWS_WITH_AS(prefill(gpu, std::vector<int>{}), doctest::Contains("needs at least one token"), Error);
        CHECK_THROWS_WITH_AS(prefill(gpu, std::vector<int>{3, c.vocab_size}), doctest::Contains("outside the vocabulary"), Error);
        GpuInferenceState state = prefill(gpu, std::vector<int>(c.context - 1, 1));
        CHECK_THROWS_WITH_AS(decode_step(gpu, state, -1), doctest::Contains("outside the vocabulary"), Error);
        decode_step(gpu, state, 2);
        CHECK_THROWS_WITH_AS(decode_step(gpu, state, 2), doctest::Contains("do not fit the model's context"), Error);
        CHECK_THROWS_WITH_AS(upload_model(t.model, "1c", c.context), doctest::Contains("not an attention stage"), Error);
        CHECK_THROWS_WITH_AS(upload_model(t.model, "7", c.context), doctest::Contains("not an attention stage"), Error);
        CHECK_THROWS_WITH_AS(upload_model(t.model, "9", c.context), doctest::Contains("unknown stage"), Error);
        ModelConfig odd_heads = c;
        odd_heads.dim = 48, odd_heads.n_heads = 2, odd_heads.n_kv_heads = 2;  // head size 24
        Model odd = make_model(odd_heads);
        CHECK_THROWS_WITH_AS(upload_model(odd, "6", c.context), doctest::Contains("head size 24"), Error);
        ModelConfig huge = c;
        huge.dim = 8192, huge.n_heads = 64, huge.n_kv_heads = 8, huge.ffn_dim = 32768, huge.n_layers = 2000;
        CHECK_THROWS_WITH_AS(check_fits_on_gpu(huge, huge.context), doctest::Contains("does not fit in GPU memory"), Error);
        TempCheckpoint file;
        CHECK_THROWS_WITH_AS(run_cuda_command_line({"eval", "--model", file.path + ".missing"}),
                             doctest::Contains("does not exist"), Error);
        CHECK_THROWS_WITH_AS(run_cuda_command_line({"sample", "--model", file.path, "--top-p", "0"}),
                             doctest::Contains("--top-p must be in (0, 1]"), Error);
        CHECK_THROWS_AS(run_cuda_command_line({"sample", "--threads", "4"}), UsageError);
    }
}

#else
#include "gpt.cpp"

// ---- Helpers shared by the tests ----

// A fresh, empty directory under the system temp dir, removed when the test ends.
struct TempDir {
    std::filesystem::path path;
    TempDir() {
        static int counter = 0;
        path = std::filesystem::temp_directory_path() / ("gpt_tests_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
        std::filesystem::remove_all(path);
        std::filesystem::create_directories(path);
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    std::string file(const std::string& name) const { return (path / name).string(); }
};

void write_file(const std::string& path, const std::string& text) {
    std::ofstream(path, std::ios::binary) << text;
}

std::vector<float> random_vector(const size_t n, Rng& rng, const float scale = 1.0f) {
    std::vector<float> v(n);
    for (float& x : v) x = scale * rng.normal();
    return v;
}

Tensor random_tensor(std::vector<int> shape, Rng& rng, const float scale = 1.0f) {
    Tensor t = make_tensor(std::move(shape), true);
    t.data = random_vector(t.numel(), rng, scale);
    return t;
}

// Runs the backward steps recorded on the tape with d(out) = seed, as if the loss were sum(out * seed).
void backward_from(Tape& tape, Tensor& out, const std::vector<float>& seed) {
    out.grad = seed;
    for (auto step = tape.backward_steps.rbegin(); step != tape.backward_steps.rend(); ++step) (*step)();
}

// Gradient check by central finite differences. forward(tape) builds the op's output from `inputs` (tensors
// the test owns). The scalar is L = sum(out * seed) with a fixed random seed, accumulated in double.
// Tolerance: the code computes in float (relative rounding ~1e-7 per op); with eps = 1e-3 the difference
// quotient carries an error of about |L| * 1e-7 / 1e-3 plus O(eps^2) curvature, so at these small sizes
// (|L| < ~10) 2e-3 absolute plus 2% relative separates rounding from a wrong formula, which is off by O(1).
void grad_check(const std::function<Tensor&(Tape&)>& forward, const std::vector<Tensor*>& inputs, const uint64_t seed = 7) {
    Rng rng(seed);
    Tape tape;
    Tensor& out = forward(tape);
    const std::vector<float> weights = random_vector(out.numel(), rng);
    for (Tensor* input : inputs) std::fill(input->grad.begin(), input->grad.end(), 0.0f);
    backward_from(tape, out, weights);
    const auto loss = [&] {
        Tape t;
        t.record = false;
        const Tensor& o = forward(t);
        double sum = 0.0;
        for (size_t i = 0; i < o.numel(); ++i) sum += double(o.data[i]) * weights[i];
        return sum;
    };
    constexpr float eps = 1e-3f;
    for (size_t which = 0; which < inputs.size(); ++which) {
        Tensor& input = *inputs[which];
        for (size_t i = 0; i < input.numel(); ++i) {
            const float saved = input.data[i];
            input.data[i] = saved + eps;
            const double plus = loss();
            input.data[i] = saved - eps;
            const double minus = loss();
            input.data[i] = saved;
            const double numeric = (plus - minus) / (2.0 * eps);
            INFO("input ", which, " element ", i, ": analytic ", input.grad[i], ", numeric ", numeric);
            CHECK(std::abs(input.grad[i] - numeric) <= 2e-3 + 2e-2 * std::abs(numeric));
        }
    }
}

ModelConfig tiny_config(const int V = 11) {
    ModelConfig c;
    c.vocab_size = V;
    c.n_layers = 2, c.dim = 16, c.n_heads = 4, c.n_kv_heads = 2, c.ffn_dim = 24, c.context = 8;
    return c;
}

// Names-like documents over a small alphabet.
std::string small_corpus(const int documents) {
    Rng rng(3);
    std::string text;
    for (int d = 0; d < documents; ++d) {
        const int length = 2 + static_cast<int>(rng.below(6));
        for (int i = 0; i < length; ++i) text += static_cast<char>('a' + rng.below(8));
        text += "\n";
    }
    return text;
}

int run_cli(const std::vector<std::string>& args) { return run_command_line(args); }

std::map<std::string, std::vector<float>> checkpoint_values(const std::string& path) {
    std::map<std::string, std::vector<float>> values;
    for (auto& [name, tensor] : read_safetensors(path).tensors) values[name] = tensor.data;
    return values;
}

// ==== 1. Foundations ====
TEST_SUITE("1. Foundations") {
    TEST_CASE("splitmix64 matches the reference sequence for seed 0") {
        // First outputs of splitmix64 seeded with 0, from the published reference implementation.
        uint64_t state = 0;
        CHECK(splitmix64(state) == 0xe220a8397b1dcdafULL);
        CHECK(splitmix64(state) == 0x6e789e6aa1b965f4ULL);
    }
    TEST_CASE("Rng: same seed, same stream; uniform in [0, 1); normal has mean 0 and variance 1") {
        Rng a(5), b(5);
        for (int i = 0; i < 100; ++i) CHECK(a.next_u64() == b.next_u64());
        double sum = 0.0, sum_squares = 0.0;
        constexpr int n = 200000;
        for (int i = 0; i < n; ++i) {
            const float u = a.uniform();
            CHECK_UNARY(u >= 0.0f && u < 1.0f);
            const double z = a.normal();
            sum += z;
            sum_squares += z * z;
        }
        CHECK(std::abs(sum / n) < 0.01);          // standard error 1/sqrt(n) = 0.0022
        CHECK(std::abs(sum_squares / n - 1.0) < 0.02);
        for (int i = 0; i < 1000; ++i) CHECK(a.below(7) < 7u);
    }
    TEST_CASE("parallel_for runs every index exactly once") {
        set_thread_count(3);
        std::vector<int> hits(1000, 0);
        parallel_for(1000, 1e9, [&](int i) { hits[i] += 1; });
        CHECK(std::count(hits.begin(), hits.end(), 1) == 1000);
        set_thread_count(1);
    }
}

// ==== 3. Data ====
TEST_SUITE("3. Data") {
    TEST_CASE("documents: lines split on newline, trailing CR dropped, empty lines skipped, spaces kept") {
        TempDir dir;
        write_file(dir.file("d.txt"), "anna\r\n\nbob\n   \ncy");
        const std::vector<std::string> docs = read_documents(dir.file("d.txt"));
        CHECK(docs == std::vector<std::string>{"anna", "bob", "   ", "cy"});
    }
    TEST_CASE("split: document i is validation when i % 10 == 9") {
        std::vector<std::string> docs;
        for (int i = 0; i < 25; ++i) docs.push_back("d" + std::to_string(i));
        const DocumentSplit split = split_documents(docs);
        CHECK(split.validation == std::vector<std::string>{"d9", "d19"});
        CHECK(split.train.size() == 23);
        CHECK(split.train[9] == "d10");
    }
    TEST_CASE("bad data files give clear errors") {
        TempDir dir;
        CHECK_THROWS_WITH_AS(read_documents(dir.file("missing.txt")), doctest::Contains("does not exist"), Error);
        write_file(dir.file("empty.txt"), "\n\r\n\n");
        CHECK_THROWS_WITH_AS(read_documents(dir.file("empty.txt")), doctest::Contains("no documents"), Error);
        CHECK_THROWS_WITH_AS(read_documents(dir.path.string()), doctest::Contains("not a file"), Error);
    }
}

// ==== 4. Tokenizer ====
TEST_SUITE("4. Tokenizer") {
    TEST_CASE("char tokenizer: sorted code points, EOT last, round trip with multi-byte characters") {
        const Tokenizer t = build_char_tokenizer({"zoë", "ab", "日本"});
        // code points: a b o z ë(U+00EB) 日(U+65E5) 本(U+672C)
        CHECK(t.chars == std::vector<char32_t>{U'a', U'b', U'o', U'z', U'\u00eb', U'\u65e5', U'\u672c'});
        CHECK(t.eot() == 7);
        CHECK(t.vocab_size() == 8);
        CHECK(encode(t, "zoë") == std::vector<int>{3, 2, 4});
        for (const std::string s : {"zoë", "ab", "日本", "", "bazoo日"}) CHECK(decode(t, encode(t, s)) == s);
    }
    TEST_CASE("unknown characters and invalid UTF-8 are errors") {
        const Tokenizer t = build_char_tokenizer({"abc"});
        CHECK_THROWS_WITH_AS(encode(t, "abd"), doctest::Contains("'d' (U+0064) is not in the tokenizer's vocabulary"), Error);
        CHECK_THROWS_WITH_AS(utf8_decode("a\xff"), doctest::Contains("invalid UTF-8"), Error);
        CHECK_THROWS_WITH_AS(utf8_decode("\xc3"), doctest::Contains("invalid UTF-8"), Error);
        CHECK_THROWS_WITH_AS(utf8_decode("\xc0\xaf"), doctest::Contains("invalid UTF-8 at byte 0"), Error);  // overlong
    }
}

// Reference BPE trainer for the tests: recounts every pair over all distinct chunks before each merge.
std::vector<std::pair<int, int>> recount_bpe(const std::vector<std::string>& documents, const int vocab_size) {
    std::map<std::string, int64_t> chunk_counts;
    for (const std::string& document : documents)
        for (const std::string_view chunk : split_chunks(document)) ++chunk_counts[std::string(chunk)];
    std::vector<std::pair<std::vector<int>, int64_t>> words;
    for (const auto& [chunk, count] : chunk_counts) {
        std::vector<int> ids;
        for (const char c : chunk) ids.push_back(static_cast<unsigned char>(c));
        words.emplace_back(ids, count);
    }
    std::vector<std::pair<int, int>> merges;
    for (int r = 0; r < vocab_size - 257; ++r) {
        std::map<std::pair<int, int>, int64_t> pairs;  // ordered: the first of equal counts is the smallest pair
        for (const auto& [ids, count] : words)
            for (size_t i = 0; i + 1 < ids.size(); ++i) pairs[{ids[i], ids[i + 1]}] += count;
        if (pairs.empty()) break;
        std::pair<int, int> best = pairs.begin()->first;
        for (const auto& [pair, count] : pairs)
            if (count > pairs[best]) best = pair;
        merges.push_back(best);
        for (auto& [ids, count] : words) {
            std::vector<int> merged;
            for (size_t i = 0; i < ids.size(); ++i) {
                if (i + 1 < ids.size() && ids[i] == best.first && ids[i + 1] == best.second) {
                    merged.push_back(256 + r);
                    ++i;
                } else {
                    merged.push_back(ids[i]);
                }
            }
            ids = merged;
        }
    }
    return merges;
}

// Reference encoder: every merge in the order learned, each replacing all its occurrences left to right.
std::vector<int> reference_bpe_encode(const Tokenizer& tokenizer, const std::string& text) {
    std::vector<int> out;
    for (const std::string_view chunk : split_chunks(text)) {
        std::vector<int> ids;
        for (const char c : chunk) ids.push_back(static_cast<unsigned char>(c));
        for (size_t r = 0; r < tokenizer.merges.size(); ++r) {
            std::vector<int> merged;
            for (size_t i = 0; i < ids.size(); ++i) {
                if (i + 1 < ids.size() && ids[i] == tokenizer.merges[r].first && ids[i + 1] == tokenizer.merges[r].second) {
                    merged.push_back(256 + static_cast<int>(r));
                    ++i;
                } else {
                    merged.push_back(ids[i]);
                }
            }
            ids = merged;
        }
        out.insert(out.end(), ids.begin(), ids.end());
    }
    return out;
}

// A few KB of real prose: the first lines of the State of the Union corpus.
std::vector<std::string> prose_sample(const size_t bytes) {
    std::vector<std::string> documents;
    size_t total = 0;
    for (const std::string& line : read_documents("data/sotu.txt")) {
        if (total >= bytes) break;
        documents.push_back(line);
        total += line.size();
    }
    return documents;
}

TEST_SUITE("4. Tokenizer: BPE") {
    TEST_CASE("chunks follow the written rule") {
        const auto chunks = [](std::string_view s) {
            std::vector<std::string> out;
            for (const std::string_view c : split_chunks(s)) out.emplace_back(c);
            return out;
        };
        CHECK(chunks("Hello world, it's 2024!") == std::vector<std::string>{"Hello", " world", ",", " it", "'s", " 2024", "!"});
        CHECK(chunks("a  b\n\nc\t d") == std::vector<std::string>{"a", " ", " b", "\n", "\n", "c", "\t", " d"});
        CHECK(chunks("café — naïve") == std::vector<std::string>{"café", " —", " naïve"});
        CHECK(chunks("end  ") == std::vector<std::string>{"end", "  "});
        CHECK(chunks("x\xff\xfey") == std::vector<std::string>{"x", "\xff\xfe", "y"});
    }
    TEST_CASE("merges on a tiny corpus equal the ones computed by hand, including a tie") {
        // "xyxy": (x,y) x2, (y,x) x1; "zw": (z,w) x1.  Merge 0: (x,y) -> 256, leaving [256 256] and [z w].
        // Now (256,256) and (z,w) both occur once: the tie goes to the smaller pair, (z,w) = (122,119) -> 257.
        // Merge 2: (256,256) -> 258. Then no pair is left.
        const std::vector<std::string> corpus{"xyxy", "zw"};
        const Tokenizer t = train_bpe(corpus, 260);
        CHECK(t.merges == std::vector<std::pair<int, int>>{{'x', 'y'}, {'z', 'w'}, {256, 256}});
        CHECK(t.eot() == 259);
        CHECK(t.pieces[258] == "xyxy");
        CHECK(encode(t, "xyxyzw") == std::vector<int>{258, 257});
        CHECK_THROWS_WITH_AS(train_bpe(corpus, 261), doctest::Contains("at most 260"), Error);
        CHECK_THROWS_WITH_AS(train_bpe(corpus, 256), doctest::Contains("larger than 256"), Error);
        CHECK(train_bpe(corpus, 257).merges.empty());
    }
    TEST_CASE("incremental training gives exactly the merges of the recount-every-merge reference") {
        const std::vector<std::string> documents = prose_sample(6000);
        for (const int vocab : {300, 600}) {
            const Tokenizer t = train_bpe(documents, vocab);
            CHECK(t.merges == recount_bpe(documents, vocab));
        }
    }
    TEST_CASE("encoding equals the reference encoder, round-trips every byte string, never makes EOT") {
        const Tokenizer t = train_bpe(prose_sample(6000), 500);
        const std::vector<std::string> texts = prose_sample(20000);
        for (const std::string& text : texts) {
            const std::vector<int> ids = encode(t, text);
            CHECK(ids == reference_bpe_encode(t, text));
            CHECK(decode(t, ids) == text);
            CHECK(std::find(ids.begin(), ids.end(), t.eot()) == ids.end());
        }
        std::string every_byte;
        for (int b = 0; b < 256; ++b) every_byte += static_cast<char>(b);
        CHECK(decode(t, encode(t, every_byte)) == every_byte);
        Rng rng(77);
        for (int trial = 0; trial < 200; ++trial) {
            std::string s(rng.below(40), '\0');
            for (char& c : s) c = static_cast<char>(rng.below(256));
            const std::vector<int> ids = encode(t, s);
            CHECK(decode(t, ids) == s);
            CHECK(std::find(ids.begin(), ids.end(), t.eot()) == ids.end());
        }
    }
    TEST_CASE("tokenizer JSON round trip and bad tokenizer JSON") {
        const Tokenizer t = train_bpe({"xyxy", "zw"}, 260);
        const Tokenizer back = tokenizer_from_json(tokenizer_to_json(t), "");
        CHECK(back.is_bpe);
        CHECK(back.merges == t.merges);
        CHECK_THROWS_WITH_AS(tokenizer_from_json("{\"type\": \"bpe\", \"merges\": [[1, 2], [300, 1]]}", ""), doctest::Contains("does not exist yet"), Error);
        CHECK_THROWS_WITH_AS(tokenizer_from_json("{\"type\": \"bpe\", \"merges\": [[1, 2, 3]]}", ""), doctest::Contains("not a [left, right] pair"), Error);
        CHECK_THROWS_WITH_AS(tokenizer_from_json("{\"type\": \"bpe\", \"merges\": [[1, 2]", ""), doctest::Contains("not valid JSON"), Error);
        CHECK_THROWS_WITH_AS(tokenizer_from_json("{\"type\": \"wordpiece\"}", ""), doctest::Contains("not supported"), Error);
        CHECK_THROWS_WITH_AS(tokenizer_from_json("{\"type\": \"bpe\", \"merges\": [[1, 2], [1, 2]]}", ""), doctest::Contains("repeats"), Error);
    }
}

// ==== 5. Token streams and batches ====
TEST_SUITE("5. Token streams") {
    TEST_CASE("stream = [EOT] + doc_0 + [EOT] + doc_1 + [EOT]") {
        const Tokenizer t = build_char_tokenizer({"ab", "b"});
        CHECK(make_stream(t, {"ab", "b"}) == std::vector<int>{2, 0, 1, 2, 1, 2});
    }
    TEST_CASE("training windows: targets are inputs shifted by one, inside the stream") {
        std::vector<int> stream(50);
        std::iota(stream.begin(), stream.end(), 0);
        Batch batch;
        Rng rng(1);
        sample_batch(batch, stream, 16, 10, rng);
        for (int b = 0; b < 16; ++b)
            for (int t = 0; t < 10; ++t) {
                CHECK(batch.targets[b * 10 + t] == batch.inputs[b * 10 + t] + 1);
                if (t > 0) CHECK(batch.inputs[b * 10 + t] == batch.inputs[b * 10 + t - 1] + 1);
            }
        CHECK(*std::max_element(batch.targets.begin(), batch.targets.end()) <= 49);
        std::vector<int> short_stream(10);
        CHECK_THROWS_WITH_AS(sample_batch(batch, short_stream, 1, 10, rng), doctest::Contains("fewer than one window"), Error);
    }
}

// ==== 7. Core ops ====
TEST_SUITE("7. Core ops") {
    TEST_CASE("matmul equals a naive triple loop at awkward sizes, for any thread count") {
        Rng rng(11);
        // The last two sizes exceed parallel_min_flops, so that 3 threads really split them.
        for (const auto [N, K, M] : {std::array{1, 1, 1}, {17, 33, 5}, {70, 13, 65}, {5, 100, 333}, {130, 200, 100}, {3, 700, 400}}) {
            const std::vector<float> x = random_vector(size_t(N) * K, rng), w = random_vector(size_t(M) * K, rng);
            std::vector<float> out(size_t(N) * M), again(size_t(N) * M);
            set_thread_count(1);
            matmul_forward(out, x, w, N, K, M);
            set_thread_count(3);
            matmul_forward(again, x, w, N, K, M);
            set_thread_count(1);
            CHECK(out == again);
            for (int i = 0; i < N; ++i)
                for (int j = 0; j < M; ++j) {
                    double ref = 0.0;
                    for (int k = 0; k < K; ++k) ref += double(x[size_t(i) * K + k]) * w[size_t(j) * K + k];
                    CHECK(std::abs(out[size_t(i) * M + j] - ref) <= 1e-4 * (1.0 + std::abs(ref)) * std::sqrt(double(K)));
                }
        }
    }
    TEST_CASE("fast_exp against exp in double over its whole range, and at its edges") {
        double worst = 0.0;
        for (double x = -87.0; x <= 88.0; x += 1.0 / 4096) {  // 716,800 points, every binade of the result
            const float xf = float(x);
            const double exact = std::exp(double(xf));
            worst = std::max(worst, std::abs(double(fast_exp(xf)) - exact) / exact);
        }
        CHECK(worst < 1.5e-7);  // std::exp's float result is within 6e-8; two float roundings more at most
        CHECK(fast_exp(0.0f) == 1.0f);
        CHECK(fast_exp(-87.5f) == 0.0f);
        CHECK(fast_exp(-std::numeric_limits<float>::infinity()) == 0.0f);
        CHECK(std::isnan(fast_exp(std::numeric_limits<float>::quiet_NaN())));
    }
    TEST_CASE("dot, sum_of and max_of equal the plain loops at every length up to 70") {
        Rng rng(12);
        const std::vector<float> a = random_vector(70, rng), b = random_vector(70, rng);
        for (int n = 1; n <= 70; ++n) {
            double dot_ref = 0.0, sum_ref = 0.0;
            float max_ref = -std::numeric_limits<float>::infinity();
            for (int i = 0; i < n; ++i) dot_ref += double(a[i]) * b[i], sum_ref += a[i], max_ref = std::max(max_ref, a[i]);
            CHECK(std::abs(dot(a.data(), b.data(), n) - dot_ref) <= 1e-5 * n);
            CHECK(std::abs(sum_of(a.data(), n) - sum_ref) <= 1e-5 * n);
            CHECK(max_of(a.data(), n) == max_ref);
        }
    }
    TEST_CASE("gradients: matmul") {
        Rng rng(1);
        Tensor x = random_tensor({5, 7}, rng), w = random_tensor({3, 7}, rng);
        grad_check([&](Tape& t) -> Tensor& { return matmul(t, x, w); }, {&x, &w});
    }
    TEST_CASE("gradients: add, mul, silu") {
        Rng rng(2);
        Tensor a = random_tensor({4, 6}, rng), b = random_tensor({4, 6}, rng);
        grad_check([&](Tape& t) -> Tensor& { return add(t, a, b); }, {&a, &b});
        grad_check([&](Tape& t) -> Tensor& { return mul(t, a, b); }, {&a, &b});
        grad_check([&](Tape& t) -> Tensor& { return silu(t, a); }, {&a});
    }
    TEST_CASE("gradients: embedding with repeated tokens") {
        Rng rng(3);
        Tensor table = random_tensor({5, 4}, rng);
        const std::vector<int> tokens{1, 3, 1, 0, 1};
        grad_check([&](Tape& t) -> Tensor& { return embedding(t, table, tokens); }, {&table});
    }
    TEST_CASE("rms_norm forward equals the formula; gradients for x and w") {
        Rng rng(4);
        Tensor x = random_tensor({3, 8}, rng), w = random_tensor({8}, rng);
        Tape tape;
        const Tensor& y = rms_norm(tape, x, w, 1e-5f);
        for (int n = 0; n < 3; ++n) {
            double mean_square = 0.0;
            for (int i = 0; i < 8; ++i) mean_square += double(x.data[n * 8 + i]) * x.data[n * 8 + i] / 8.0;
            for (int i = 0; i < 8; ++i) CHECK(y.data[n * 8 + i] == doctest::Approx(x.data[n * 8 + i] / std::sqrt(mean_square + 1e-5) * w.data[i]).epsilon(1e-5));
        }
        grad_check([&](Tape& t) -> Tensor& { return rms_norm(t, x, w, 1e-5f); }, {&x, &w});
    }
    TEST_CASE("cross-entropy equals -log softmax by hand; gradient") {
        // logits (0, ln 2, ln 3) -> softmax (1/6, 2/6, 3/6); target 1 -> loss = -ln(1/3) = ln 3.
        Tensor logits = make_tensor({1, 3}, true);
        logits.data = {0.0f, std::log(2.0f), std::log(3.0f)};
        const std::vector<int> target{1};
        Tape tape;
        CHECK(cross_entropy(tape, logits, target).data[0] == doctest::Approx(std::log(3.0)).epsilon(1e-6));
        Rng rng(5);
        Tensor many = random_tensor({4, 6}, rng, 2.0f);
        const std::vector<int> targets{0, 5, 2, 2};
        grad_check([&](Tape& t) -> Tensor& { return cross_entropy(t, many, targets); }, {&many});
    }
    TEST_CASE("softmax_rows survives large logits") {
        const std::vector<float> x{1000.0f, 1000.0f, -1000.0f};
        std::vector<float> out(3);
        softmax_rows(out, x, 1, 3);
        CHECK(out[0] == doctest::Approx(0.5));
        CHECK(out[2] == 0.0f);
    }
}

// ==== 8. Attention ====

// Naive double-precision attention with the causal rule of DESIGN.md §7, written independently here.
std::vector<double> naive_attention(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v, int H, int G,
                                    int Nq, int Nk, int hd, bool causal) {
    std::vector<double> out(size_t(H) * Nq * hd, 0.0);
    for (int h = 0; h < H; ++h) {
        const int g = h / (H / G);
        for (int i = 0; i < Nq; ++i) {
            std::vector<double> scores;
            for (int j = 0; j < Nk && (!causal || j <= i + Nk - Nq); ++j) {
                double s = 0.0;
                for (int d = 0; d < hd; ++d) s += double(q[(size_t(h) * Nq + i) * hd + d]) * k[(size_t(g) * Nk + j) * hd + d];
                scores.push_back(s / std::sqrt(double(hd)));
            }
            if (scores.empty()) continue;
            const double max = *std::max_element(scores.begin(), scores.end());
            double sum = 0.0;
            for (double& s : scores) sum += (s = std::exp(s - max));
            for (size_t j = 0; j < scores.size(); ++j)
                for (int d = 0; d < hd; ++d) out[(size_t(h) * Nq + i) * hd + d] += scores[j] / sum * v[(size_t(g) * Nk + j) * hd + d];
        }
    }
    return out;
}

TEST_SUITE("8. Attention") {
    TEST_CASE("rope: a hand-computed rotation") {
        // hd = 4, position 1, theta = 10000: pair (0, 2) turns by 1 rad, pair (1, 3) by 10000^(-1/2) = 0.01 rad.
        const std::vector<float> x{1, 2, 3, 4};
        std::vector<float> out(4);
        rope_forward(out, x, 1, 1, 4, 1, 10000.0f);
        CHECK(out[0] == doctest::Approx(1 * std::cos(1.0) - 3 * std::sin(1.0)));
        CHECK(out[2] == doctest::Approx(3 * std::cos(1.0) + 1 * std::sin(1.0)));
        CHECK(out[1] == doctest::Approx(2 * std::cos(0.01) - 4 * std::sin(0.01)));
        CHECK(out[3] == doctest::Approx(4 * std::cos(0.01) + 2 * std::sin(0.01)));
        rope_forward(out, x, 1, 1, 4, 0, 10000.0f);  // position 0 is the identity
        CHECK(out == x);
    }
    TEST_CASE("gradients: rope, heads split and merge") {
        Rng rng(6);
        Tensor x = random_tensor({2, 3, 5, 4}, rng);
        grad_check([&](Tape& t) -> Tensor& { return rope(t, x, 3, 10000.0f); }, {&x});
        Tensor rows = random_tensor({6, 8}, rng);
        grad_check([&](Tape& t) -> Tensor& { return heads_merge(t, heads_split(t, rows, 2, 3, 4)); }, {&rows});
    }
    TEST_CASE("attention equals a naive loop: causal, Nq < Nk, G < H, and rows that see no key") {
        Rng rng(7);
        for (const auto& [H, G, Nq, Nk, causal] : {std::tuple{4, 4, 5, 5, true}, {6, 2, 7, 7, true}, {4, 1, 3, 9, true}, {2, 2, 6, 4, true}, {4, 2, 5, 8, false}}) {
            const int hd = 8;
            const std::vector<float> q = random_vector(size_t(H) * Nq * hd, rng, 2.0f), k = random_vector(size_t(G) * Nk * hd, rng, 2.0f),
                                     v = random_vector(size_t(G) * Nk * hd, rng);
            std::vector<float> out(q.size()), lse(size_t(H) * Nq);
            attention_forward(out, lse, q, k, v, H, G, Nq, Nk, hd, causal);
            const std::vector<double> ref = naive_attention(q, k, v, H, G, Nq, Nk, hd, causal);
            for (size_t i = 0; i < out.size(); ++i) CHECK(std::abs(out[i] - ref[i]) <= 1e-5 + 1e-4 * std::abs(ref[i]));
            if (causal && Nq > Nk) CHECK(std::isinf(lse[0]));  // query 0 sees no key when Nq - Nk >= 1
        }
    }
    TEST_CASE("grouped-query attention equals full attention with each KV head repeated H/G times") {
        Rng rng(8);
        const int H = 6, G = 2, N = 9, hd = 4;
        const std::vector<float> q = random_vector(size_t(H) * N * hd, rng), k = random_vector(size_t(G) * N * hd, rng),
                                 v = random_vector(size_t(G) * N * hd, rng);
        std::vector<float> k_repeated, v_repeated;
        for (int h = 0; h < H; ++h) {
            const int g = h / (H / G);
            k_repeated.insert(k_repeated.end(), k.begin() + size_t(g) * N * hd, k.begin() + size_t(g + 1) * N * hd);
            v_repeated.insert(v_repeated.end(), v.begin() + size_t(g) * N * hd, v.begin() + size_t(g + 1) * N * hd);
        }
        std::vector<float> grouped(q.size()), full(q.size()), lse(size_t(H) * N);
        attention_forward(grouped, lse, q, k, v, H, G, N, N, hd, true);
        attention_forward(full, lse, q, k_repeated, v_repeated, H, H, N, N, hd, true);
        CHECK(grouped == full);
    }
    TEST_CASE("gradients: causal attention with G < H") {
        Rng rng(9);
        Tensor q = random_tensor({2, 4, 5, 4}, rng), k = random_tensor({2, 2, 5, 4}, rng), v = random_tensor({2, 2, 5, 4}, rng);
        grad_check([&](Tape& t) -> Tensor& { return attention(t, q, k, v); }, {&q, &k, &v});
    }
}

// ==== 9. Model ====
TEST_SUITE("9. Model") {
    TEST_CASE("parameter names and shapes follow DESIGN.md section 6") {
        ModelConfig c = tiny_config();
        Model model = make_model(c);
        std::map<std::string, std::vector<int>> shapes;
        for (const Parameter& p : model_parameters(model)) shapes[p.name] = p.tensor->shape;
        CHECK(shapes["model.embed_tokens.weight"] == std::vector<int>{11, 16});
        CHECK(shapes["model.layers.1.self_attn.q_proj.weight"] == std::vector<int>{16, 16});
        CHECK(shapes["model.layers.1.self_attn.k_proj.weight"] == std::vector<int>{8, 16});
        CHECK(shapes["model.layers.0.self_attn.o_proj.weight"] == std::vector<int>{16, 16});
        CHECK(shapes["model.layers.0.mlp.down_proj.weight"] == std::vector<int>{16, 24});
        CHECK(shapes["model.norm.weight"] == std::vector<int>{16});
        CHECK(shapes["lm_head.weight"] == std::vector<int>{11, 16});
        CHECK(shapes.size() == 1 + 2 * 9 + 2);
        c.tie_embeddings = true;
        Model tied = make_model(c);
        CHECK(model_parameters(tied).size() == 1 + 2 * 9 + 1);
    }
    TEST_CASE("init: norms are 1, matrices have std 0.02, residual projections 0.02 / sqrt(2L)") {
        ModelConfig c = tiny_config();
        c.dim = 64, c.ffn_dim = 256, c.n_layers = 2;
        Model model = make_model(c);
        init_model(model, 1);
        for (const Parameter& p : model_parameters(model)) {
            double sum_squares = 0.0;
            for (const float x : p.tensor->data) sum_squares += double(x) * x;
            const double std = std::sqrt(sum_squares / p.tensor->numel());
            if (!p.is_matrix) CHECK(std == 1.0);
            else if (is_residual_projection(p.name)) CHECK(std == doctest::Approx(0.02 / 2.0).epsilon(0.1));
            else CHECK(std == doctest::Approx(0.02).epsilon(0.1));
        }
    }
    TEST_CASE("bad model configs give clear errors") {
        ModelConfig c = tiny_config();
        c.n_heads = 3;
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("not divisible by --heads"), Error);
        c = tiny_config(), c.n_kv_heads = 3;
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("not divisible by --kv-heads"), Error);
        c = tiny_config(), c.dim = 12, c.n_heads = 4;  // head size 3
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("odd"), Error);
        c = tiny_config(), c.n_layers = -1;
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("--layers must be positive"), Error);
    }
    TEST_CASE("loss at initialisation is close to log(V)") {
        ModelConfig c = tiny_config(40);
        Model model = make_model(c);
        init_model(model, 2);
        Rng rng(3);
        std::vector<int> tokens(4 * 8), targets(4 * 8);
        for (int& t : tokens) t = static_cast<int>(rng.below(40));
        for (int& t : targets) t = static_cast<int>(rng.below(40));
        Tape tape;
        const float loss = cross_entropy(tape, model_forward(tape, model, tokens, 4, 8), targets).data[0];
        CHECK(loss == doctest::Approx(std::log(40.0)).epsilon(0.01));
    }
    TEST_CASE("gradients of the whole model (tied and untied) through every op") {
        for (const bool tie : {false, true}) {
            ModelConfig c = tiny_config(7);
            c.dim = 8, c.n_heads = 2, c.n_kv_heads = 1, c.ffn_dim = 12, c.context = 5, c.tie_embeddings = tie;
            Model model = make_model(c);
            init_model(model, 4);
            for (const Parameter& p : model_parameters(model))  // larger weights so that every path matters
                for (float& x : p.tensor->data) x *= p.is_matrix ? 10.0f : 1.0f;
            const std::vector<int> tokens{1, 4, 6, 0, 2, 3, 3, 5, 1, 0};
            std::vector<Tensor*> params;
            for (const Parameter& p : model_parameters(model)) params.push_back(p.tensor);
            grad_check([&](Tape& t) -> Tensor& { return model_forward(t, model, tokens, 2, 5); }, params);
        }
    }
    TEST_CASE("a small model overfits one batch") {
        // A stream of exactly T+1 tokens has one window, so every batch is the same.
        ModelConfig c = tiny_config(6);
        Model model = make_model(c);
        init_model(model, 5);
        TrainingState state = make_training_state(model, 5);
        const std::vector<int> stream{5, 0, 3, 1, 4, 2, 2, 0, 5};
        TrainConfig train;
        train.batch = 2, train.steps = 150, train.warmup = 10, train.lr = 1e-2f;
        Tape tape;
        Batch batch;
        float loss = 0.0f;
        for (int s = 0; s < train.steps; ++s) loss = train_step(model, state, tape, batch, stream, train).loss;
        CHECK(loss < 0.05f);
    }
}

// ==== 9. Model: mixture of experts ====

ModelConfig tiny_moe_config(const std::string& scoring, const int K, const int shared, const int V = 7) {
    ModelConfig c = tiny_config(V);
    c.dim = 8, c.n_heads = 2, c.n_kv_heads = 1, c.ffn_dim = 12, c.context = 5;
    c.n_experts = 4, c.top_k_experts = K, c.n_shared_experts = shared, c.expert_ffn_dim = 6, c.scoring = scoring, c.dense_layers = 1;
    return c;
}

// The MoE feed-forward computed the plain way, in double: every expert on every token, weighted by gates that
// are 0 for the experts a token did not choose. Scores, choice and gates follow DESIGN.md §3 directly.
std::vector<double> moe_reference(const std::vector<float>& x, const MixtureOfExperts& moe, const ModelConfig& c, const int N) {
    const int D = c.dim, E = c.n_experts;
    const auto swiglu_row = [&](const SwiGLU& mlp, const float* row) {
        const int F = mlp.w_gate.shape[0];
        std::vector<double> hidden(F), out(D, 0.0);
        for (int f = 0; f < F; ++f) {
            double gate = 0, up = 0;
            for (int d = 0; d < D; ++d) gate += double(mlp.w_gate.data[f * D + d]) * row[d], up += double(mlp.w_up.data[f * D + d]) * row[d];
            hidden[f] = gate / (1.0 + std::exp(-gate)) * up;
        }
        for (int d = 0; d < D; ++d)
            for (int f = 0; f < F; ++f) out[d] += double(mlp.w_down.data[d * F + f]) * hidden[f];
        return out;
    };
    std::vector<double> y(size_t(N) * D, 0.0);
    for (int n = 0; n < N; ++n) {
        const float* row = &x[size_t(n) * D];
        std::vector<double> score(E), key(E);
        double max_logit = -1e300;
        for (int e = 0; e < E; ++e) {
            double r = 0;
            for (int d = 0; d < D; ++d) r += double(moe.router.data[e * D + d]) * row[d];
            score[e] = r;
            max_logit = std::max(max_logit, r);
        }
        double sum = 0;
        for (int e = 0; e < E; ++e) sum += std::exp(score[e] - max_logit);
        for (int e = 0; e < E; ++e) {
            score[e] = c.scoring == "sigmoid" ? 1.0 / (1.0 + std::exp(-score[e])) : std::exp(score[e] - max_logit) / sum;
            key[e] = score[e] + (c.scoring == "sigmoid" ? moe.router_bias.data[e] : 0.0);
        }
        std::vector<double> gate(E, 0.0);
        double chosen_sum = 0;
        for (int e = 0; e < E; ++e) {  // chosen: fewer than K experts have a larger key
            int larger = 0;
            for (int j = 0; j < E; ++j) larger += key[j] > key[e];
            if (larger < c.top_k_experts) gate[e] = score[e], chosen_sum += score[e];
        }
        for (int e = 0; e < E; ++e) {
            const std::vector<double> out = swiglu_row(moe.experts[e], row);
            for (int d = 0; d < D; ++d) y[size_t(n) * D + d] += gate[e] / chosen_sum * out[d];
        }
        if (c.n_shared_experts > 0) {
            const std::vector<double> out = swiglu_row(moe.shared, row);
            for (int d = 0; d < D; ++d) y[size_t(n) * D + d] += out[d];
        }
    }
    return y;
}

TEST_SUITE("9. Model: mixture of experts") {
    TEST_CASE("parameter names and shapes follow DESIGN.md section 6; the routing bias is not trained") {
        ModelConfig c = tiny_moe_config("sigmoid", 2, 2);
        Model model = make_model(c);
        std::map<std::string, Parameter> params;
        for (const Parameter& p : model_parameters(model)) params.emplace(p.name, p);
        CHECK(params.at("model.layers.0.mlp.gate_proj.weight").tensor->shape == std::vector<int>{12, 8});  // dense: first_k_dense_replace = 1
        CHECK_FALSE(params.contains("model.layers.0.mlp.gate.weight"));
        CHECK_FALSE(params.contains("model.layers.1.mlp.gate_proj.weight"));
        CHECK(params.at("model.layers.1.mlp.gate.weight").tensor->shape == std::vector<int>{4, 8});
        CHECK(params.at("model.layers.1.mlp.gate.e_score_correction_bias").tensor->shape == std::vector<int>{4});
        CHECK(params.at("model.layers.1.mlp.experts.3.gate_proj.weight").tensor->shape == std::vector<int>{6, 8});
        CHECK(params.at("model.layers.1.mlp.experts.0.down_proj.weight").tensor->shape == std::vector<int>{8, 6});
        CHECK(params.at("model.layers.1.mlp.shared_experts.up_proj.weight").tensor->shape == std::vector<int>{12, 8});  // S * Fe
        CHECK(params.at("model.layers.1.mlp.shared_experts.down_proj.weight").tensor->shape == std::vector<int>{8, 12});
        CHECK(params.size() == 1 + 9 + (6 + 2 + 4 * 3 + 3) + 2);
        CHECK(params.at("model.layers.1.mlp.gate.e_score_correction_bias").tensor->grad.empty());
        CHECK(trained_parameters(model).size() == params.size() - 1);
        init_model(model, 3);
        for (const float b : params.at("model.layers.1.mlp.gate.e_score_correction_bias").tensor->data) CHECK(b == 0.0f);
        CHECK(count_active_parameters(model) == count_parameters(model) - 2 * 3 * 8 * 6);
        c.n_shared_experts = 0;
        Model no_shared = make_model(c);
        CHECK(model_parameters(no_shared).size() == params.size() - 3);
    }
    TEST_CASE("bad MoE configs give clear errors") {
        ModelConfig c = tiny_moe_config("sigmoid", 5, 1);  // K > E
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("--top-k-experts must be between 1 and --experts 4"), Error);
        c = tiny_moe_config("sigmoid", 0, 1);
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("--top-k-experts"), Error);
        c = tiny_moe_config("sigmoid", 2, 1), c.n_experts = 0;  // E = 0 with K > 0
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("need --experts"), Error);
        c = tiny_moe_config("sigmoid", 2, 1), c.expert_ffn_dim = 0;
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("--expert-ffn must be positive"), Error);
        c = tiny_moe_config("sigmoid", 2, 1), c.expert_ffn_dim = -3;
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("--expert-ffn must be positive"), Error);
        c = tiny_moe_config("sigmoid", 2, 1), c.dense_layers = 2;  // no MoE layer left
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("--dense-layers"), Error);
        c = tiny_moe_config("sigmoid", 2, -1);
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("--shared-experts"), Error);
        c = tiny_moe_config("relu", 2, 1);
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("--scoring must be sigmoid or softmax"), Error);
        c = tiny_moe_config("sigmoid", 2, 1), c.n_experts = -2;
        CHECK_THROWS_WITH_AS(validate_model_config(c), doctest::Contains("--experts must not be negative"), Error);
        TempDir dir;
        write_file(dir.file("d.txt"), small_corpus(50));
        const std::vector<std::string> train{"train", "--data", dir.file("d.txt"), "--out", dir.file("m.safetensors")};
        const auto with = [&](std::vector<std::string> extra) {
            std::vector<std::string> args = train;
            args.insert(args.end(), extra.begin(), extra.end());
            return args;
        };
        CHECK_THROWS_WITH_AS(run_cli(with({"--experts", "4", "--top-k-experts", "5"})), doctest::Contains("--top-k-experts"), Error);
        CHECK_THROWS_WITH_AS(run_cli(with({"--top-k-experts", "2"})), doctest::Contains("need --experts"), Error);
        CHECK_THROWS_WITH_AS(run_cli(with({"--experts", "4", "--expert-ffn", "0"})), doctest::Contains("--expert-ffn"), Error);
        CHECK_THROWS_WITH_AS(run_cli(with({"--experts", "4", "--bias-rate", "-1"})), doctest::Contains("--bias-rate"), Error);
        CHECK_FALSE(std::filesystem::exists(dir.file("m.safetensors")));
    }
    TEST_CASE("E = 1, K = 1, no shared expert, sigmoid scoring equals the dense MLP with the same weights") {
        ModelConfig dense = tiny_config(9);
        ModelConfig moe = dense;
        moe.n_experts = 1, moe.top_k_experts = 1, moe.n_shared_experts = 0, moe.expert_ffn_dim = dense.ffn_dim;
        Model a = make_model(dense), b = make_model(moe);
        init_model(a, 31);
        init_model(b, 32);  // the router's weights do not matter: the one expert always gets gate s / s = 1
        for (size_t l = 0; l < a.layers.size(); ++l) {
            b.layers[l].moe.experts[0] = a.layers[l].mlp;
            for (auto member : {&Layer::attn_norm, &Layer::wq, &Layer::wk, &Layer::wv, &Layer::wo, &Layer::ffn_norm})
                b.layers[l].*member = a.layers[l].*member;
        }
        b.embed = a.embed, b.final_norm = a.final_norm, b.lm_head = a.lm_head;
        Rng rng(33);
        std::vector<int> tokens(3 * 8);
        for (int& t : tokens) t = static_cast<int>(rng.below(9));
        Tape tape;
        tape.record = false;
        const std::vector<float> dense_logits = model_forward(tape, a, tokens, 3, 8).data;
        tape.clear();
        CHECK(model_forward(tape, b, tokens, 3, 8).data == dense_logits);
    }
    TEST_CASE("dispatch by expert equals running every expert on every token, masked by the gates") {
        for (const std::string scoring : {"sigmoid", "softmax"})
            for (const int K : {1, 2, 4})
                for (const int shared : {0, 2}) {
                    INFO(scoring, " K ", K, " S ", shared);
                    ModelConfig c = tiny_moe_config(scoring, K, shared);
                    c.n_experts = 5, c.dense_layers = 0, c.n_layers = 1;
                    Model model = make_model(c);
                    init_model(model, 41);
                    MixtureOfExperts& moe = model.layers[0].moe;
                    Rng rng(42);
                    for (float& w : moe.router.data) w = rng.normal();  // scores spread out, so that the choice matters
                    for (float& b : moe.router_bias.data) b = 0.3f * rng.normal();
                    const int N = 37;
                    Tensor x = random_tensor({N, c.dim}, rng);
                    Tape tape;
                    const Tensor& y = moe_forward(tape, x, moe, c, nullptr);
                    const std::vector<double> reference = moe_reference(x.data, moe, c, N);
                    for (size_t i = 0; i < reference.size(); ++i) CHECK(std::abs(y.data[i] - reference[i]) <= 1e-5 * (1.0 + std::abs(reference[i])));
                    CHECK(std::accumulate(moe.counts.begin(), moe.counts.end(), 0) == N * K);
                }
    }
    TEST_CASE("gradients of an MoE model: router, experts, shared expert; both scorings, K = 1 and 2; the balancing loss") {
        for (const std::string scoring : {"sigmoid", "softmax"})
            for (const int K : {1, 2}) {
                INFO(scoring, " K ", K);
                ModelConfig c = tiny_moe_config(scoring, K, 1);
                Model model = make_model(c);
                init_model(model, 51);
                Rng rng(52);
                for (const Parameter& p : model_parameters(model))  // larger weights so that every path matters
                    for (float& x : p.tensor->data) x *= p.is_matrix ? 10.0f : 1.0f;
                for (float& b : model.layers[1].moe.router_bias.data) b = 0.1f * rng.normal();
                model.layers[1].moe.router_bias.data[3] = -5.0f;  // sigmoid: expert 3 gets no token, its batch is empty
                const std::vector<int> tokens{1, 4, 6, 0, 2, 3, 3, 5, 1, 0};
                std::vector<Tensor*> params;
                for (const Parameter& p : trained_parameters(model)) params.push_back(p.tensor);
                grad_check([&](Tape& t) -> Tensor& { return model_forward(t, model, tokens, 2, 5); }, params);
                if (scoring == "sigmoid") CHECK(model.layers[1].moe.counts[3] == 0);
                if (scoring == "softmax")  // alpha large enough that its gradient is far above rounding
                    grad_check(
                        [&](Tape& t) -> Tensor& {
                            BalanceLoss balance{0.5f, {}};
                            model_forward(t, model, tokens, 2, 5, nullptr, &balance);
                            REQUIRE(balance.terms.size() == 1);
                            return *balance.terms[0];
                        },
                        params);
            }
    }
    TEST_CASE("the balancing loss equals alpha E sum_e f_e P_e computed by hand") {
        // 2 tokens, 2 experts, K = 1. Probabilities [0.7, 0.3] and [0.4, 0.6]: token 0 picks expert 0, token 1 expert 1.
        // f = [1/2, 1/2], P = [0.55, 0.45], loss = alpha * 2 * (0.5 * 0.55 + 0.5 * 0.45) = alpha.
        Tensor probs = make_tensor({2, 2}, true);
        probs.data = {0.7f, 0.3f, 0.4f, 0.6f};
        const auto routing = std::make_shared<const Routing>(choose_experts(probs.data, {}, 2, 2, 1));
        CHECK(routing->expert == std::vector<int>{0, 1});
        Tape tape;
        CHECK(switch_balance_loss(tape, probs, routing, 0.25f).data[0] == doctest::Approx(0.25));
        // Everything on expert 0: f = [1, 0], P = [0.7, 0.3] -> alpha * 2 * 0.7.
        probs.data = {0.8f, 0.2f, 0.6f, 0.4f};
        const auto skewed = std::make_shared<const Routing>(choose_experts(probs.data, {}, 2, 2, 1));
        CHECK(switch_balance_loss(tape, probs, skewed, 0.25f).data[0] == doctest::Approx(0.25 * 2 * 0.7));
    }
    TEST_CASE("ties in the choice go to the lower expert index; the bias only chooses") {
        const std::vector<float> scores{0.5f, 0.5f, 0.5f, 0.9f};
        CHECK(choose_experts(scores, {}, 1, 4, 2).expert == std::vector<int>{3, 0});
        const std::vector<float> bias{0.0f, 0.1f, 0.0f, -1.0f};
        CHECK(choose_experts(scores, bias, 1, 4, 2).expert == std::vector<int>{1, 0});
    }
    TEST_CASE("bias balancing brings a router that sends everything to one expert below 1.5 imbalance") {
        ModelConfig c = tiny_moe_config("sigmoid", 2, 0);
        c.n_layers = 1, c.dense_layers = 0, c.n_experts = 8;
        Model model = make_model(c);
        init_model(model, 61);
        MixtureOfExperts& moe = model.layers[0].moe;
        Rng rng(62);
        const int N = 256;
        Tensor x = random_tensor({N, c.dim}, rng);
        for (int n = 0; n < N; ++n) x.data[size_t(n) * c.dim] = 1.0f;  // a feature every token has
        for (float& w : moe.router.data) w = 0.1f * rng.normal();
        moe.router.data[0] = moe.router.data[c.dim] = 4.0f;  // experts 0 and 1 read it: they win every token
        const auto imbalance = [&] {
            Tape tape;
            tape.record = false;
            moe_forward(tape, x, moe, c, nullptr);
            return load_imbalance(std::vector<double>(moe.counts.begin(), moe.counts.end()));
        };
        CHECK(imbalance() == doctest::Approx(4.0));  // 2 of 8 experts take all N K choices: max/mean = 8 / 2
        int steps = 0;
        for (; steps < 2000 && imbalance() >= 1.5; ++steps) {
            const std::vector<float> before = moe.router_bias.data;
            const std::vector<int> counts = moe.counts;
            update_routing_biases(model, 1e-3f);
            const double mean = double(N) * 2 / 8;
            for (int e = 0; e < 8; ++e)  // exactly the sign rule
                CHECK(moe.router_bias.data[e] == before[e] + (counts[e] < mean ? 1e-3f : counts[e] > mean ? -1e-3f : 0.0f));
        }
        INFO("steps ", steps);
        CHECK(imbalance() < 1.5);
        CHECK(steps < 2000);
        CHECK(moe.router_bias.grad.empty());
    }
    TEST_CASE("a training step moves the routing bias by the sign rule only, and the router by AdamW") {
        for (const std::string scoring : {"sigmoid", "softmax"}) {
            ModelConfig c = tiny_moe_config(scoring, 2, 1, 6);
            Model model = make_model(c);
            init_model(model, 71);
            TrainingState state = make_training_state(model, 71);
            std::vector<int> stream(200);
            Rng rng(72);
            for (int& t : stream) t = static_cast<int>(rng.below(6));
            TrainConfig train;
            train.batch = 4, train.steps = 10, train.warmup = 2;
            Tape tape;
            Batch batch;
            MixtureOfExperts& moe = model.layers[1].moe;
            const std::vector<float> router_before = moe.router.data;
            const StepResult step = train_step(model, state, tape, batch, stream, train);
            const double mean = 4.0 * 5 * 2 / 4;
            for (int e = 0; e < 4; ++e)
                CHECK(moe.router_bias.data[e] ==
                      (scoring == "softmax" ? 0.0f : moe.counts[e] < mean ? 1e-3f : moe.counts[e] > mean ? -1e-3f : 0.0f));
            CHECK(moe.router.data != router_before);
            CHECK((step.balance_loss > 0) == (scoring == "softmax"));
            CHECK(state.exp_avg.size() == trained_parameters(model).size());
        }
    }
    TEST_CASE("MoE checkpoint round trip and prefill + decode equal to the full forward") {
        TempDir dir;
        for (const std::string scoring : {"sigmoid", "softmax"}) {
            ModelConfig c = tiny_moe_config(scoring, 2, 1, 5);
            c.context = 9;
            Model model = make_model(c);
            init_model(model, 81);
            Rng rng(82);
            for (float& b : model.layers[1].moe.router_bias.data) b = 0.1f * rng.normal();
            const Tokenizer tokenizer = build_char_tokenizer({"abcd"});
            save_checkpoint(dir.file("m.safetensors"), model, tokenizer);
            Checkpoint loaded = load_checkpoint(dir.file("m.safetensors"));
            CHECK(config_to_json(loaded.model.config) == config_to_json(c));
            const std::string header = read_safetensors(dir.file("m.safetensors")).metadata.at("config");
            for (const std::string& key : std::vector<std::string>{"\"n_routed_experts\":4", "\"num_experts_per_tok\":2", "\"n_shared_experts\":1", "\"moe_intermediate_size\":6",
                                          "\"scoring_func\":\"" + scoring + "\"", "\"first_k_dense_replace\":1"})
                CHECK(header.find(key) != std::string::npos);
            const std::vector<Parameter> a = model_parameters(model), b = model_parameters(loaded.model);
            REQUIRE(a.size() == b.size());
            for (size_t i = 0; i < a.size(); ++i) CHECK(a[i].tensor->data == b[i].tensor->data);
            // The KV-cache path runs the same MoE layer on one token at a time.
            std::vector<int> tokens(9);
            for (int& t : tokens) t = static_cast<int>(rng.below(5));
            Tape tape;
            tape.record = false;
            const std::vector<float> full = model_forward(tape, model, tokens, 1, 9).data;
            InferenceState state = prefill(model, std::span<const int>(tokens).first(3));
            for (int position = 3; position < 9; ++position) {
                decode_step(model, state, tokens[position]);
                for (int v = 0; v < 5; ++v) CHECK(std::abs(state.logits[v] - full[position * 5 + v]) <= 1e-4f * (1.0f + std::abs(full[position * 5 + v])));
            }
        }
        // A checkpoint missing an expert's tensor is a clear error.
        ModelConfig c = tiny_moe_config("sigmoid", 2, 1, 5);
        Model model = make_model(c);
        std::vector<NamedBuffer> tensors;
        for (const Parameter& p : model_parameters(model))
            if (p.name != "model.layers.1.mlp.experts.2.up_proj.weight") tensors.push_back({p.name, p.tensor->shape, p.tensor->data});
        write_safetensors(dir.file("bad.safetensors"), tensors,
                          {{"format", "gpt.cpp"}, {"config", config_to_json(c)}, {"tokenizer", tokenizer_to_json(build_char_tokenizer({"abcd"}))}});
        CHECK_THROWS_WITH_AS(load_checkpoint(dir.file("bad.safetensors")), doctest::Contains("experts.2.up_proj.weight' is missing"), Error);
    }
}

// ==== 10. Checkpoint ====

// Builds a safetensors file from a header string and a byte buffer, for the bad-checkpoint tests.
std::string safetensors_bytes(const std::string& header, const std::string& buffer) {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(uint64_t(header.size()) >> (8 * i));
    return bytes + header + buffer;
}

TEST_SUITE("10. Checkpoint") {
    TEST_CASE("JSON parser: objects, arrays, escapes, surrogate pairs, errors") {
        const Json j = parse_json(R"( {"a": [1, -2.5e1, true, null], "b": "x\"\\\n\u00e9\ud83d\ude00"} )");
        CHECK(json_number(&std::get<JsonArray>(j.find("a")->value)[1], "") == -25.0);
        CHECK(json_string(j.find("b"), "") == "x\"\\\n\u00e9\U0001F600");
        CHECK_THROWS_AS(parse_json("{\"a\": }"), Error);
        CHECK_THROWS_AS(parse_json("[1, 2"), Error);
        CHECK_THROWS_AS(parse_json("{} x"), Error);
        const Json quoted = parse_json(json_quote("q\"\\\x01z"));
        CHECK(json_string(&quoted, "") == "q\"\\\x01z");
    }
    TEST_CASE("round trip: every tensor bit-exact, config and tokenizer restored") {
        TempDir dir;
        ModelConfig c = tiny_config(5);
        c.tie_embeddings = true;
        Model model = make_model(c);
        init_model(model, 9);
        const Tokenizer tokenizer = build_char_tokenizer({"a\"b", "é"});
        save_checkpoint(dir.file("m.safetensors"), model, tokenizer);
        Checkpoint loaded = load_checkpoint(dir.file("m.safetensors"));
        CHECK(config_to_json(loaded.model.config) == config_to_json(c));
        CHECK(loaded.tokenizer.chars == tokenizer.chars);
        const std::vector<Parameter> a = model_parameters(model), b = model_parameters(loaded.model);
        REQUIRE(a.size() == b.size());
        for (size_t i = 0; i < a.size(); ++i) CHECK(std::memcmp(a[i].tensor->data.data(), b[i].tensor->data.data(), a[i].tensor->numel() * 4) == 0);
        CHECK_FALSE(std::filesystem::exists(dir.file("m.safetensors.tmp")));
        // The header starts with its little-endian length and names the format.
        const std::string bytes = read_file(dir.file("m.safetensors"));
        uint64_t n = 0;
        for (int i = 0; i < 8; ++i) n |= uint64_t(static_cast<unsigned char>(bytes[i])) << (8 * i);
        CHECK(n % 8 == 0);
        CHECK(bytes.substr(8, n).find("\"format\":\"gpt.cpp\"") != std::string::npos);
    }
    TEST_CASE("bad checkpoints give clear errors") {
        TempDir dir;
        Model model = make_model(tiny_config(4));
        init_model(model, 1);
        const Tokenizer tokenizer = build_char_tokenizer({"abc"});
        save_checkpoint(dir.file("good.safetensors"), model, tokenizer);
        const std::string good = read_file(dir.file("good.safetensors"));
        uint64_t n = 0;
        for (int i = 0; i < 8; ++i) n |= uint64_t(static_cast<unsigned char>(good[i])) << (8 * i);
        const std::string header = good.substr(8, n), buffer = good.substr(8 + n);
        const std::string metadata = header.substr(1, header.find("},") + 1);  // "__metadata__":{...}
        const auto expect_error = [&](const std::string& name, const std::string& bytes, const std::string& message) {
            write_file(dir.file(name), bytes);
            INFO(name);
            CHECK_THROWS_WITH_AS(load_checkpoint(dir.file(name)), doctest::Contains(message.c_str()), Error);
        };
        const auto replace = [](std::string s, const std::string& from, const std::string& to) {
            const size_t at = s.find(from);
            REQUIRE(at != std::string::npos);
            return s.replace(at, from.size(), to);
        };
        CHECK_THROWS_WITH_AS(load_checkpoint(dir.file("missing.safetensors")), doctest::Contains("does not exist"), Error);
        expect_error("tiny", "abc", "too short");
        expect_error("truncated_header", good.substr(0, 8 + n / 2), "runs past the end");
        expect_error("truncated_data", good.substr(0, good.size() - 10), "fall outside");
        expect_error("text", "this is not a safetensors file at all, just some text", "runs past the end");
        expect_error("not_json", safetensors_bytes("{not json}", ""), "not valid JSON");
        const std::string embed = "\"model.embed_tokens.weight\":{\"dtype\":\"F32\",\"shape\":[4,16],\"data_offsets\":[0,256]}";
        REQUIRE(header.find(embed) != std::string::npos);
        expect_error("offsets_out_of_range", safetensors_bytes(replace(header, "\"data_offsets\":[0,256]", "\"data_offsets\":[0,99999999]"), buffer), "fall outside");
        expect_error("shape_mismatch", safetensors_bytes(replace(header, "\"shape\":[4,16]", "\"shape\":[4,15]"), buffer), "bytes");
        expect_error("wrong_dtype", safetensors_bytes(replace(header, "\"dtype\":\"F32\"", "\"dtype\":\"F16\""), buffer), "dtype F16");
        // Overlap: point the second tensor at the first one's bytes.
        const size_t second = header.find("data_offsets", header.find(embed) + embed.size());
        const size_t open = header.find('[', second), close = header.find(']', second);
        const std::string overlapping = header.substr(0, open) + "[0,64]" + header.substr(close + 1);
        expect_error("overlap", safetensors_bytes(overlapping, buffer), "overlap");
        expect_error("missing_tensor", safetensors_bytes(replace(header, embed + ",", ""), buffer), "'model.embed_tokens.weight' is missing");
        expect_error("extra_tensor", safetensors_bytes(replace(header, embed, embed + ",\"extra.weight\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}"), buffer),
                     "unexpected tensor 'extra.weight'");
        expect_error("not_gpt_cpp", safetensors_bytes(replace(header, "\"format\":\"gpt.cpp\"", "\"format\":\"pt\""), buffer), "not a gpt.cpp checkpoint");
        expect_error("bad_config", safetensors_bytes(replace(header, "\\\"num_attention_heads\\\":4", "\\\"num_attention_heads\\\":3"), buffer), "bad config");
        expect_error("vocab_mismatch", safetensors_bytes(replace(header, "\\\"chars\\\":\\\"abc\\\"", "\\\"chars\\\":\\\"ab\\\""), buffer),
                     "tokenizer has 3 tokens but config vocab_size is 4");
        CHECK(metadata.starts_with("\"__metadata__\""));
    }
    TEST_CASE("a checkpoint whose tokenizer cannot encode the eval data is a clear error") {
        TempDir dir;
        Model model = make_model(tiny_config(4));
        save_checkpoint(dir.file("m.safetensors"), model, build_char_tokenizer({"abc"}));
        write_file(dir.file("other.txt"), "abd\n");
        CHECK_THROWS_WITH_AS(run_cli({"eval", "--model", dir.file("m.safetensors"), "--data", dir.file("other.txt")}),
                             doctest::Contains("cannot encode"), Error);
    }
}

// ==== 11. Inference ====
TEST_SUITE("11. Inference") {
    TEST_CASE("prefill + decode gives the logits of one full forward, at every position") {
        // Models: G = H and G < H, tied and untied, with weights large enough that attention is far from uniform.
        // The cached path computes the same sums in the same order as the full forward except that each row's
        // keys arrive through the cache, so agreement is to float rounding: 1e-4 on logits of size ~1-10.
        for (const auto& [kv_heads, tie] : {std::pair{4, false}, {2, true}, {1, false}}) {
            ModelConfig c = tiny_config(9);
            c.n_kv_heads = kv_heads, c.tie_embeddings = tie, c.context = 12;
            Model model = make_model(c);
            init_model(model, 11);
            for (const Parameter& p : model_parameters(model))
                for (float& x : p.tensor->data) x *= p.is_matrix ? 10.0f : 1.0f;
            Rng rng(12);
            std::vector<int> tokens(12);
            for (int& t : tokens) t = static_cast<int>(rng.below(9));
            Tape tape;
            tape.record = false;
            const std::vector<float> full = model_forward(tape, model, tokens, 1, 12).data;
            for (const int prompt_length : {1, 2, 7, 12}) {
                INFO("G ", kv_heads, " tied ", tie, " prompt ", prompt_length);
                InferenceState state = prefill(model, std::span<const int>(tokens).first(prompt_length));
                const auto compare = [&](int position) {
                    for (int v = 0; v < 9; ++v) CHECK(std::abs(state.logits[v] - full[position * 9 + v]) <= 1e-4f * (1.0f + std::abs(full[position * 9 + v])));
                };
                compare(prompt_length - 1);
                for (int position = prompt_length; position < 12; ++position) {
                    decode_step(model, state, tokens[position]);
                    compare(position);
                }
                CHECK(state.cache.length == 12);
                CHECK_THROWS_WITH_AS(decode_step(model, state, 0), doctest::Contains("do not fit"), Error);
            }
        }
    }
    TEST_CASE("prefix sharing gives exactly the samples of prefilling each document alone") {
        ModelConfig c = tiny_config(6);
        Model model = make_model(c);
        init_model(model, 13);
        for (const Parameter& p : model_parameters(model))
            for (float& x : p.tensor->data) x *= p.is_matrix ? 10.0f : 1.0f;
        const Tokenizer tokenizer = make_char_tokenizer({U'a', U'b', U'c', U'd', U'e'});
        const std::vector<int> prompt = encode(tokenizer, "ab");
        const InferenceState shared = prefill_prompt(model, tokenizer, prompt);
        const SampleConfig config;
        for (uint64_t seed = 0; seed < 10; ++seed) {
            Rng a(seed), b(seed);
            CHECK(generate(model, tokenizer, prompt, shared, config, a).tokens ==
                  generate(model, tokenizer, prompt, prefill_prompt(model, tokenizer, prompt), config, b).tokens);
        }
    }
    TEST_CASE("the KV cache holds G heads: 2 L G hd 4 bytes per token") {
        ModelConfig c = tiny_config();  // L2 D16 H4 G2: hd 4
        CHECK(kv_cache_bytes_per_token(c) == 2 * 2 * 2 * 4 * 4);
        const KvCache cache = make_kv_cache(c);
        CHECK(cache.keys.size() == 2);
        CHECK(cache.keys[0].size() == size_t(2) * 8 * 4);
    }
}

// ==== 12. Training ====
TEST_SUITE("12. Training") {
    TEST_CASE("learning-rate schedule: warm-up, then cosine from lr to 0.1 lr") {
        CHECK(learning_rate(0, 100, 1.0f, 10) == doctest::Approx(0.1));
        CHECK(learning_rate(9, 100, 1.0f, 10) == doctest::Approx(1.0));
        CHECK(learning_rate(10, 100, 1.0f, 10) == doctest::Approx(1.0));
        CHECK(learning_rate(99, 100, 1.0f, 10) == doctest::Approx(0.1));
        // halfway through the decay: 0.1 + 0.9 * (1 + cos(pi/2)) / 2 = 0.55
        CHECK(learning_rate(10 + 89 / 2, 100, 1.0f, 10) == doctest::Approx(0.1 + 0.9 * (1 + std::cos(std::numbers::pi * 44 / 89)) / 2));
        CHECK(learning_rate(10 + 89 / 2, 100, 1.0f, 10) == doctest::Approx(0.55).epsilon(0.02));
    }
    TEST_CASE("gradient clipping scales to norm 1 only when the norm exceeds 1") {
        Tensor a = make_tensor({2}, true), b = make_tensor({1}, true);
        a.grad = {3.0f, 0.0f};
        b.grad = {4.0f};  // global norm 5
        std::vector<Parameter> params{{"a", &a, true}, {"b", &b, true}};
        CHECK(clip_gradients(params) == doctest::Approx(5.0));
        CHECK(a.grad[0] == doctest::Approx(0.6));
        CHECK(b.grad[0] == doctest::Approx(0.8));
        CHECK(clip_gradients(params) == doctest::Approx(1.0));
        CHECK(b.grad[0] == doctest::Approx(0.8));
    }
    TEST_CASE("AdamW: one step by hand, decay on matrices only") {
        // Step 1: m = 0.1 g, v = 0.05 g^2, m^ = g, v^ = g^2, so p -= lr * wd * p, then p -= lr * g / (|g| + eps).
        Model model = make_model(tiny_config(4));
        std::vector<Parameter> params = model_parameters(model);
        TrainingState state = make_training_state(model, 1);
        for (const Parameter& p : params) {
            std::fill(p.tensor->data.begin(), p.tensor->data.end(), 2.0f);
            std::fill(p.tensor->grad.begin(), p.tensor->grad.end(), -0.5f);
        }
        adamw_update(params, state, 0.01f);
        CHECK(params[0].tensor->data[0] == doctest::Approx(2.0 - 0.01 * 0.1 * 2.0 + 0.01 * 0.5 / (0.5 + 1e-8)));
        CHECK(params[1].tensor->data[0] == doctest::Approx(2.0 + 0.01 * 0.5 / (0.5 + 1e-8)));  // input_layernorm: no decay
        CHECK(state.exp_avg[0][0] == doctest::Approx(-0.05));
        CHECK(state.exp_avg_sq[0][0] == doctest::Approx(0.05 * 0.25));
    }
    TEST_CASE("evaluation windows on a hand-built stream equal window-by-window losses") {
        // Stream of 12 tokens, T = 4: windows predict targets 1..4, 5..8, 9..11 (the last one short): 11 targets.
        ModelConfig c = tiny_config(6);
        c.context = 4;
        Model model = make_model(c);
        init_model(model, 3);
        for (const Parameter& p : model_parameters(model))
            for (float& x : p.tensor->data) x *= p.is_matrix ? 20.0f : 1.0f;
        const std::vector<int> stream{5, 0, 1, 5, 2, 3, 4, 5, 1, 1, 0, 5};
        const EvalResult result = evaluate(model, stream, 2);
        CHECK(result.tokens == 11);
        double total = 0.0;
        for (const int start : {0, 4, 8}) {
            const int length = std::min(4, 11 - start);
            const std::vector<int> inputs(stream.begin() + start, stream.begin() + start + length);
            Tape tape;
            const Tensor& logits = model_forward(tape, model, inputs, 1, length);
            for (int t = 0; t < length; ++t) {
                std::vector<double> row(logits.data.begin() + t * 6, logits.data.begin() + t * 6 + 6);
                const double max = *std::max_element(row.begin(), row.end());
                double sum = 0.0;
                for (const double x : row) sum += std::exp(x - max);
                total += max + std::log(sum) - row[stream[start + t + 1]];
            }
        }
        CHECK(result.loss == doctest::Approx(total / 11).epsilon(1e-6));
    }
    TEST_CASE("loss log CSV round trip") {
        const std::vector<LogRow> rows{{1, 2.5f, 0.001f, std::nullopt}, {2, 2.25f, 0.002f, 2.125f}};
        const std::vector<LogRow> back = parse_loss_log_csv(loss_log_csv(rows));
        REQUIRE(back.size() == 2);
        CHECK(back[1].val_loss.value() == 2.125f);
        CHECK_FALSE(back[0].val_loss.has_value());
        CHECK(loss_plot_svg(rows, "t").starts_with("<svg"));
    }
}

// ==== 13. Sampling ====
TEST_SUITE("13. Sampling") {
    TEST_CASE("temperature 0 is greedy") {
        const std::vector<float> logits{0.1f, 2.0f, -1.0f, 1.9f};
        SampleConfig config;
        config.temperature = 0.0f;
        Rng rng(1);
        for (int i = 0; i < 10; ++i) CHECK(sample_token(logits, config, rng) == 1);
    }
    TEST_CASE("top-k and top-p keep exactly the right tokens, ties ordered by id") {
        const std::vector<double> p{0.1, 0.3, 0.1, 0.4, 0.1};
        CHECK(candidate_tokens(p, 0, 1.0) == std::vector<int>{3, 1, 0, 2, 4});
        CHECK(candidate_tokens(p, 2, 1.0) == std::vector<int>{3, 1});
        CHECK(candidate_tokens(p, 3, 1.0) == std::vector<int>{3, 1, 0});  // a tie at the boundary: the lower id stays
        CHECK(candidate_tokens(p, 0, 0.4) == std::vector<int>{3});        // 0.4 already reaches p
        CHECK(candidate_tokens(p, 0, 0.5) == std::vector<int>{3, 1});
        CHECK(candidate_tokens(p, 0, 0.75) == std::vector<int>{3, 1, 0});  // 0.7 < 0.75 <= 0.8
        CHECK(candidate_tokens(p, 0, 0.01) == std::vector<int>{3});
        CHECK(candidate_tokens(p, 2, 0.9) == std::vector<int>{3, 1});      // top-k first, then top-p of what is left
    }
    TEST_CASE("sampled frequencies match the distribution (chi-square)") {
        // logits = log(p) so softmax gives p back. 100k draws, 4 categories: chi-square with 3 degrees of
        // freedom exceeds 16.3 with probability 0.001; a sampler that is off by 1% in one category gives ~40.
        const std::vector<double> p{0.1, 0.2, 0.3, 0.4};
        std::vector<float> logits;
        for (const double x : p) logits.push_back(static_cast<float>(std::log(x)));
        SampleConfig config;
        Rng rng(1234);
        std::vector<int> counts(4, 0);
        constexpr int n = 100000;
        for (int i = 0; i < n; ++i) ++counts[sample_token(logits, config, rng)];
        double chi_square = 0.0;
        for (int i = 0; i < 4; ++i) chi_square += std::pow(counts[i] - n * p[i], 2) / (n * p[i]);
        CHECK(chi_square < 16.3);
        config.top_k = 2;  // only tokens 3 and 2 remain, renormalised to 4/7 and 3/7
        std::fill(counts.begin(), counts.end(), 0);
        for (int i = 0; i < n; ++i) ++counts[sample_token(logits, config, rng)];
        CHECK(counts[0] + counts[1] == 0);
        CHECK(std::pow(counts[3] - n * 4.0 / 7, 2) / (n * 4.0 / 7) + std::pow(counts[2] - n * 3.0 / 7, 2) / (n * 3.0 / 7) < 10.8);
    }
    TEST_CASE("bad sampling settings are clear errors") {
        SampleConfig c;
        c.top_p = 0.0f;
        CHECK_THROWS_WITH_AS(validate_sample_config(c), doctest::Contains("--top-p"), Error);
        c = SampleConfig(), c.top_p = 1.5f;
        CHECK_THROWS_AS(validate_sample_config(c), Error);
        c = SampleConfig(), c.top_k = -1;
        CHECK_THROWS_WITH_AS(validate_sample_config(c), doctest::Contains("--top-k"), Error);
        c = SampleConfig(), c.temperature = -0.5f;
        CHECK_THROWS_WITH_AS(validate_sample_config(c), doctest::Contains("--temperature"), Error);
    }
}

// ==== 15. Command line ====
TEST_SUITE("15. Command line") {
    TEST_CASE("resume: N steps, then N more, equals 2N steps in one go, bit for bit; threads do not matter; dense and MoE") {
      for (const std::vector<std::string>& model_flags :
           {std::vector<std::string>{}, {"--experts", "4", "--top-k-experts", "2", "--expert-ffn", "8", "--dense-layers", "1"},
            {"--experts", "3", "--top-k-experts", "1", "--shared-experts", "0", "--expert-ffn", "8", "--scoring", "softmax", "--aux-loss", "0.1"}}) {
        INFO("model flags: ", model_flags.size());
        TempDir dir;
        write_file(dir.file("d.txt"), small_corpus(300));
        std::vector<std::string> common{"train", "--data", dir.file("d.txt"), "--steps", "12", "--batch", "4", "--ctx", "8", "--layers", "2",
                                        "--dim", "16", "--heads", "4", "--kv-heads", "2", "--ffn", "32", "--warmup", "3", "--eval-every", "5"};
        common.insert(common.end(), model_flags.begin(), model_flags.end());
        const auto with = [&](std::vector<std::string> extra) {
            std::vector<std::string> args = common;
            args.insert(args.end(), extra.begin(), extra.end());
            return args;
        };
        REQUIRE(run_cli(with({"--out", dir.file("full.safetensors"), "--threads", "1"})) == 0);
        REQUIRE(run_cli(with({"--out", dir.file("half.safetensors"), "--threads", "2", "--stop-after", "6"})) == 0);
        REQUIRE(run_cli({"train", "--resume", dir.file("half.safetensors"), "--data", dir.file("d.txt"), "--out", dir.file("resumed.safetensors"), "--threads", "3"}) == 0);
        const auto full = checkpoint_values(dir.file("full.safetensors"));
        const auto half = checkpoint_values(dir.file("half.safetensors"));
        const auto resumed = checkpoint_values(dir.file("resumed.safetensors"));
        CHECK(full.size() == resumed.size());
        for (const auto& [name, values] : full) {
            INFO(name);
            CHECK(values == resumed.at(name));
            const bool fixed = name.ends_with("e_score_correction_bias") && model_flags.back() == "0.1";  // softmax scoring: stays 0
            if (name.starts_with("model.") && !fixed) CHECK(values != half.at(name));
        }
        CHECK(read_safetensors(dir.file("resumed.safetensors")).metadata.at("train_state").find("\"step\":12") != std::string::npos);
        // The resumed run's loss log continues the first one's.
        const std::vector<LogRow> log = parse_loss_log_csv(read_file(dir.file("resumed.loss.csv")));
        REQUIRE(log.size() == 12);
        CHECK(log[0].step == 1);
        CHECK(log[11].step == 12);
        if (!model_flags.empty()) {  // and so does the expert-load log: evaluations at steps 5, 6 (the stop), 10, 12
            const std::vector<ExpertLoadRow> load = parse_expert_load_csv(read_file(dir.file("resumed.experts.csv")));
            const size_t experts = std::stoul(model_flags[1]), moe_layers = model_flags.size() == 8 ? 1 : 2;
            CHECK(load.size() == 4 * experts * moe_layers);
            CHECK(read_file(dir.file("resumed.experts.svg")).find("</svg>") != std::string::npos);
        }
        set_thread_count(1);
      }
    }
    TEST_CASE("training steps large enough to run on several threads give bit-identical weights for 1 and 3 threads") {
        const auto train = [](const int threads) {
            set_thread_count(threads);
            ModelConfig c = tiny_config(40);
            c.dim = 64, c.n_heads = 4, c.n_kv_heads = 2, c.ffn_dim = 256, c.context = 32;
            Model model = make_model(c);
            init_model(model, 21);
            TrainingState state = make_training_state(model, 21);
            std::vector<int> stream(2000);
            Rng rng(22);
            for (int& token : stream) token = static_cast<int>(rng.below(40));
            TrainConfig config;
            config.batch = 8, config.steps = 3;
            Tape tape;
            Batch batch;
            for (int s = 0; s < 3; ++s) train_step(model, state, tape, batch, stream, config);
            std::vector<float> weights;
            for (const Parameter& p : model_parameters(model)) weights.insert(weights.end(), p.tensor->data.begin(), p.tensor->data.end());
            set_thread_count(1);
            return weights;
        };
        CHECK(train(1) == train(3));
    }
    TEST_CASE("sampling: same seed, same documents; temperature 0 repeats; max-tokens limits length") {
        TempDir dir;
        write_file(dir.file("d.txt"), small_corpus(200));
        REQUIRE(run_cli({"train", "--data", dir.file("d.txt"), "--out", dir.file("m.safetensors"), "--steps", "30", "--batch", "4", "--ctx", "8",
                         "--layers", "1", "--dim", "16", "--heads", "2", "--kv-heads", "1", "--ffn", "32", "--threads", "1"}) == 0);
        Checkpoint checkpoint = load_checkpoint(dir.file("m.safetensors"));
        Model& model = checkpoint.model;
        const Tokenizer& tokenizer = checkpoint.tokenizer;
        const InferenceState empty = prefill_prompt(model, tokenizer, {});
        SampleConfig config;
        Rng a(5), b(5);
        CHECK(generate(model, tokenizer, {}, empty, config, a).tokens == generate(model, tokenizer, {}, empty, config, b).tokens);
        config.max_tokens = 3;
        const std::vector<int> prompt = encode(tokenizer, "ab");
        const Sample sample = generate(model, tokenizer, prompt, prefill_prompt(model, tokenizer, prompt), config, a);
        CHECK(sample.tokens.size() <= 5);
        CHECK(std::equal(prompt.begin(), prompt.end(), sample.tokens.begin()));
        config = SampleConfig(), config.temperature = 0.0f;
        CHECK(generate(model, tokenizer, {}, empty, config, a).tokens == generate(model, tokenizer, {}, empty, config, b).tokens);
        // A prompt that fills the context, and characters outside the vocabulary, are errors.
        CHECK_THROWS_WITH_AS(prefill_prompt(model, tokenizer, std::vector<int>(8, 0)), doctest::Contains("does not fit"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"sample", "--model", dir.file("m.safetensors"), "--prompt", "a!"}), doctest::Contains("--prompt"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"sample", "--model", dir.file("m.safetensors"), "--prompt", "abababab"}), doctest::Contains("does not fit"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"sample", "--model", dir.file("m.safetensors"), "--top-k", "-1"}), doctest::Contains("--top-k"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"sample", "--model", dir.file("m.safetensors"), "--temperature", "-1"}), doctest::Contains("--temperature"), Error);
        CHECK(run_cli({"sample", "--model", dir.file("m.safetensors"), "--n", "3", "--prompt", "ab", "--max-tokens", "2"}) == 0);
    }
    TEST_CASE("a NaN loss stops training with the step number and keeps the last good checkpoint") {
        TempDir dir;
        write_file(dir.file("d.txt"), small_corpus(100));
        const std::vector<std::string> args{"train", "--data", dir.file("d.txt"), "--out", dir.file("m.safetensors"), "--steps", "200", "--batch", "2",
                                            "--ctx", "8", "--layers", "1", "--dim", "8", "--heads", "2", "--kv-heads", "2", "--ffn", "8", "--threads", "1", "--warmup", "0",
                                            "--lr", "1e30", "--eval-every", "1"};
        CHECK_THROWS_WITH_AS(run_cli(args), doctest::Contains("at step"), Error);
        CHECK_THROWS_WITH_AS(run_cli(args), doctest::Contains("last good checkpoint"), Error);
        Checkpoint kept = load_checkpoint(dir.file("m.safetensors"));  // still loads: it was never overwritten by bad weights
        for (const Parameter& p : model_parameters(kept.model))
            for (const float x : p.tensor->data) REQUIRE(std::isfinite(x));
    }
    TEST_CASE("bad flags and values: usage errors and clear messages") {
        TempDir dir;
        write_file(dir.file("d.txt"), small_corpus(50));
        const std::string data = dir.file("d.txt"), out = dir.file("m.safetensors");
        CHECK_THROWS_AS(run_cli({"train", "--bogus"}), UsageError);
        CHECK_THROWS_AS(run_cli({"frobnicate"}), UsageError);
        CHECK_THROWS_AS(run_cli({"train", "--steps"}), UsageError);
        CHECK_THROWS_WITH_AS(run_cli({"train", "--data", data, "--out", out, "--steps", "-5"}), doctest::Contains("--steps must be positive"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"train", "--data", data, "--out", out, "--steps", "ten"}), doctest::Contains("expects an integer"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"train", "--data", data, "--out", out, "--dim", "30", "--heads", "4"}), doctest::Contains("not divisible"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"train", "--data", data, "--out", out, "--heads", "4", "--kv-heads", "3"}), doctest::Contains("not divisible"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"train", "--data", data, "--out", out, "--dim", "12", "--heads", "4"}), doctest::Contains("odd"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"train", "--data", dir.file("none.txt"), "--out", out}), doctest::Contains("does not exist"), Error);
        write_file(dir.file("short.txt"), "ab\n");
        CHECK_THROWS_WITH_AS(run_cli({"train", "--data", dir.file("short.txt"), "--out", out}), doctest::Contains("fewer than one window"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"eval", "--model", dir.file("none.safetensors"), "--data", data}), doctest::Contains("does not exist"), Error);
        CHECK_THROWS_WITH_AS(run_cli({"sample", "--model", out, "--top-p", "1.5"}), doctest::Contains("--top-p"), Error);
        CHECK_FALSE(std::filesystem::exists(out));
        CHECK(run_cli({"--help"}) == 0);
        CHECK(usage().find("--kv-heads") != std::string::npos);
    }
}
#endif
