#!/usr/bin/env python3
"""Independent float64 PyTorch reference for gpt.cpp, written from DESIGN.md (§1-§4, §6) only.

  torch_reference.py eval --model M --data F [--split all|train|val]   -> JSON {loss, perplexity, tokens, ...}
  torch_reference.py compare --gpt BIN --model M --data F              -> table; exit 1 on a mismatch
  torch_reference.py train-check --gpt BIN --data F [--configs LIST]   -> checks gpt's training steps (see there)
  torch_reference.py self-test                                         -> checks this file's own MoE and gradients

Dense models and the Mixture-of-Experts feed-forward of §3 (DeepSeek-V3 style, sigmoid or softmax scoring).
The MoE is computed the plain way: every expert runs on every token and its output is weighted by a gate that
is zero for the experts a token did not choose. That costs E/K times the FLOPs of a dispatching engine, which
is the point: it shares no gather/scatter logic with the engine it checks.
"""
import argparse, json, math, os, re, shutil, struct, subprocess, sys, tempfile
import torch
import torch.nn.functional as F

CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings"]
MOE_KEYS = ["n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size", "scoring_func",
            "first_k_dense_replace"]
BIAS = "mlp.gate.e_score_correction_bias"  # §3's b: chooses experts, gets no gradient, no weight decay


def fail(msg):
    sys.exit(f"torch_reference: {msg}")


def is_moe_layer(c, l):
    """§6: with n_routed_experts > 0, layers l >= first_k_dense_replace are MoE; the first k stay dense."""
    return c.get("n_routed_experts", 0) > 0 and l >= c["first_k_dense_replace"]


def expected_shapes(c):
    """§6: every model tensor name with its shape, from the config."""
    V, D, L = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]
    H, G, Fd = c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    hd = D // H
    swiglu_shapes = lambda p, f: {f"{p}.gate_proj.weight": [f, D], f"{p}.up_proj.weight": [f, D],
                                  f"{p}.down_proj.weight": [D, f]}
    out = {"model.embed_tokens.weight": [V, D], "model.norm.weight": [D]}
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = [V, D]
    for l in range(L):
        p = f"model.layers.{l}"
        out.update({f"{p}.input_layernorm.weight": [D], f"{p}.post_attention_layernorm.weight": [D],
                    f"{p}.self_attn.q_proj.weight": [H * hd, D], f"{p}.self_attn.k_proj.weight": [G * hd, D],
                    f"{p}.self_attn.v_proj.weight": [G * hd, D], f"{p}.self_attn.o_proj.weight": [D, H * hd]})
        if not is_moe_layer(c, l):
            out.update(swiglu_shapes(f"{p}.mlp", Fd))
            continue
        E, S, Fe = c["n_routed_experts"], c["n_shared_experts"], c["moe_intermediate_size"]
        out.update({f"{p}.mlp.gate.weight": [E, D], f"{p}.{BIAS}": [E]})
        for e in range(E):
            out.update(swiglu_shapes(f"{p}.mlp.experts.{e}", Fe))
        if S > 0:
            out.update(swiglu_shapes(f"{p}.mlp.shared_experts", S * Fe))
    return out


def check_config(cfg):
    """§6 config keys: the dense ten, plus the six MoE keys (all six or none). Fails on values §3 cannot mean."""
    if sorted(cfg) not in (sorted(CONFIG_KEYS), sorted(CONFIG_KEYS + MOE_KEYS)):
        fail(f"config keys {sorted(cfg)} are neither the dense keys {CONFIG_KEYS} nor those plus {MOE_KEYS}")
    if "n_routed_experts" not in cfg:
        return
    E, K, S = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["n_shared_experts"]
    Fe, k, L = cfg["moe_intermediate_size"], cfg["first_k_dense_replace"], cfg["num_hidden_layers"]
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (E, K, S, Fe, k))
    if not ints or E < 0 or S < 0 or not 0 <= k <= L or cfg["scoring_func"] not in ("sigmoid", "softmax"):
        fail(f"bad MoE config E={E} K={K} S={S} Fe={Fe} first_k_dense_replace={k} scoring={cfg['scoring_func']!r}")
    if E > 0 and not (1 <= K <= E and Fe > 0):
        fail(f"bad MoE config: needs 1 <= K <= E and Fe > 0, got E={E} K={K} Fe={Fe}")


def load_checkpoint(path):
    """Parses a safetensors file with struct + json and checks it against §6. Returns (tensors, meta)."""
    blob = open(path, "rb").read()
    if len(blob) < 8:
        fail(f"{path}: shorter than the 8-byte header length")
    n = struct.unpack("<Q", blob[:8])[0]
    if 8 + n > len(blob):
        fail(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    buf = blob[8 + n:]
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        fail("__metadata__ missing or not string -> string")
    if meta.get("format") != "gpt.cpp":
        fail(f"metadata format is {meta.get('format')!r}, not 'gpt.cpp'")
    cfg, tok = json.loads(meta["config"]), json.loads(meta["tokenizer"])
    check_config(cfg)
    if tok.get("type") == "bpe":
        merges = [tuple(m) for m in tok["merges"]]
        for r, (a, b) in enumerate(merges):
            if not (0 <= a < 256 + r and 0 <= b < 256 + r):
                fail(f"merge {r} ({a}, {b}) uses an id that does not exist yet")
        if cfg["vocab_size"] != 256 + len(merges) + 1:
            fail(f"vocab_size {cfg['vocab_size']} != 256 bytes + {len(merges)} merges + EOT")
    elif tok.get("type") == "char":
        chars = tok["chars"]
        if list(chars) != sorted(set(chars)):
            fail("tokenizer chars are not distinct and sorted by code point")
        if cfg["vocab_size"] != len(chars) + 1:
            fail(f"vocab_size {cfg['vocab_size']} != {len(chars)} chars + EOT")
    else:
        fail(f"tokenizer type {tok.get('type')!r} is neither 'char' nor 'bpe'")
    D, H, G = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if D % H or (D // H) % 2 or H % G:
        fail(f"bad head layout D={D} H={H} G={G}")
    shapes = expected_shapes(cfg)
    opt = {f"optimizer.{k}.{name}": s for name, s in shapes.items() for k in ("exp_avg", "exp_avg_sq")}
    has_opt = any(k.startswith("optimizer.") for k in header)
    want = {**shapes, **(opt if has_opt else {})}
    # The router bias has no gradient, so an engine may or may not keep (all-zero) AdamW moments for it.
    bias_opt = {n for n in want if n.startswith("optimizer.") and n.endswith(BIAS)}
    if bias_opt and not bias_opt & set(header):
        want = {n: s for n, s in want.items() if n not in bias_opt}
    if set(header) != set(want):
        fail(f"tensor names differ: missing {sorted(set(want) - set(header))[:5]}, "
             f"unexpected {sorted(set(header) - set(want))[:5]}")
    if has_opt and "train_state" not in meta:
        fail("optimizer tensors without a train_state metadata entry")
    tensors, pos = {}, 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, end = e["data_offsets"]
        if e["dtype"] != "F32" or e["shape"] != want[name]:
            fail(f"{name}: {e['dtype']} {e['shape']}, expected F32 {want[name]}")
        if b != pos or end - b != 4 * math.prod(e["shape"]):
            fail(f"{name}: data_offsets {e['data_offsets']} not contiguous from {pos} or wrong size")
        pos = end
        tensors[name] = torch.frombuffer(bytearray(buf[b:end]), dtype=torch.float32).reshape(e["shape"])
    if pos != len(buf):
        fail(f"byte buffer has {len(buf) - pos} bytes beyond the last tensor")
    return tensors, dict(meta, config=cfg, tokenizer=tok)


# §2 byte-level BPE, from README's pre-tokenisation rule: contractions, an optional space and a run of letters,
# digits or symbols, whitespace runs that leave their last character to a following non-space.
LETTER = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u1fff\u2c00-\u2fff\u3040-\U0010ffff"
SPACE = " \t\n\v\f\r"
CHUNK = re.compile(f"'(?:re|ve|ll|s|t|m|d)| ?[{LETTER}]+| ?[0-9]+| ?[^{LETTER}0-9{SPACE}]+|[{SPACE}]+(?![^{SPACE}])|[{SPACE}]+")


def bpe_encoder(merges):
    rank = {pair: r for r, pair in enumerate(merges)}

    def encode(text):
        out = []
        for chunk in CHUNK.findall(text):
            ids = list(chunk.encode("utf-8"))
            while len(ids) > 1:
                best = min((rank.get(p, len(rank)), p) for p in zip(ids, ids[1:]))
                if best[0] == len(rank):
                    break
                merged, i, new = 256 + best[0], 0, []
                while i < len(ids):
                    if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best[1]:
                        new.append(merged)
                        i += 2
                    else:
                        new.append(ids[i])
                        i += 1
                ids = new
            out += ids
        return out
    return encode


def char_encoder(chars):
    ids = {c: i for i, c in enumerate(chars)}

    def encode(text):
        for ch in text:
            if ch not in ids:
                fail(f"character {ch!r} (U+{ord(ch):04X}) is not in the checkpoint's vocabulary")
        return [ids[ch] for ch in text]
    return encode


def encode_split(data_path, tokenizer, split):
    """§1/§2: one document per line, trailing \\r dropped, empty lines skipped; doc i is val when i % 10 == 9."""
    if tokenizer["type"] == "bpe":
        merges = [tuple(m) for m in tokenizer["merges"]]
        encode, eot = bpe_encoder(merges), 256 + len(merges)
    else:
        encode, eot = char_encoder(tokenizer["chars"]), len(tokenizer["chars"])
    docs = [ln[:-1] if ln.endswith("\r") else ln for ln in open(data_path, "rb").read().decode("utf-8").split("\n")]
    docs = [d for d in docs if d]
    stream = [eot]
    for i, d in enumerate(docs):
        if split == "all" or (split == "val") == (i % 10 == 9):
            stream += encode(d) + [eot]
    return stream


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """Rotate-half RoPE on [B, heads, T, hd]; positions 0..T-1 within the window."""
    T, hd = x.shape[-2], x.shape[-1]
    freq = theta ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2 / hd)
    a = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
    cos, sin = torch.cos(a), torch.sin(a)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def swiglu(W, p, x):
    """§3 SwiGLU: W_down (silu(W_gate x) * (W_up x)), for the dense MLP, every expert and the shared expert."""
    return (F.silu(x @ W[f"{p}.gate_proj.weight"].T) * (x @ W[f"{p}.up_proj.weight"].T)) @ W[f"{p}.down_proj.weight"].T


NEAR_TIE = 1e-5  # a choice-score gap below this may be ordered differently by float32 arithmetic


def route(c, r, b):
    """§3 router on logits r [N, E] with bias b [E]. Returns (gates [N, E], chosen [N, E] bool, scores [N, E], gaps).

    sigmoid: s = sigmoid(r); the K largest s + b are chosen (b only chooses: it is detached and never enters a gate).
    softmax: s = softmax(r); the K largest s are chosen.
    Both: g_e = s_e / sum_{chosen} s_e' on the chosen experts, 0 elsewhere. The choice is a constant of the
    backward pass; gradients reach the router through the gate values only.
    Ties: a stable descending sort, so between equal choice scores the lower expert index wins.
    gaps [N]: each token's gap between its K-th and (K+1)-th choice score (inf when K = E); a choice closer than
    float32 rounding may legitimately differ in a float32 engine.
    """
    K, E = c["num_experts_per_tok"], c["n_routed_experts"]
    if c["scoring_func"] == "sigmoid":
        s = torch.sigmoid(r)
        key = s.detach() + b.detach()
    else:
        s = torch.softmax(r, -1)
        key = s.detach()
    ranked, order = torch.sort(key, dim=-1, descending=True, stable=True)
    chosen = torch.zeros(key.shape, dtype=torch.bool).scatter_(1, order[:, :K], True)
    picked = s * chosen
    gates = picked / picked.sum(-1, keepdim=True)
    gaps = ranked[:, K - 1] - ranked[:, K] if K < E else torch.full((len(key),), math.inf, dtype=key.dtype)
    return gates, chosen, s, gaps


def moe(W, c, p, x, stats):
    """§3 MoE on x [N, D]: y = shared(x) + sum_e g_e expert_e(x), every expert on every token (g_e = 0 if not chosen).

    Appends this layer's routing statistics to stats: counts c_e (a token counts once for each of its K experts),
    the sum over tokens of the scores s_e (softmax scoring: P_e = that / N), N, the smallest choice gap (margin)
    and the number of tokens whose gap is below NEAR_TIE.
    """
    r = x @ W[f"{p}.gate.weight"].T
    gates, chosen, s, gaps = route(c, r, W[f"{p}.gate.e_score_correction_bias"])
    y = sum(gates[:, e:e + 1] * swiglu(W, f"{p}.experts.{e}", x) for e in range(c["n_routed_experts"]))
    if c["n_shared_experts"] > 0:
        y = y + swiglu(W, f"{p}.shared_experts", x)
    stats.append({"counts": chosen.sum(0).double(), "score_sum": s.sum(0), "tokens": len(x),
                  "margin": gaps.min().item(), "near_ties": int((gaps < NEAR_TIE).sum())})
    return y


def aux_loss(c, layer_stats, alpha):
    """§3 softmax-scoring balance loss of one MoE layer over one batch of N tokens: alpha * E * sum_e f_e P_e,
    f_e = c_e / (N K) (the fraction of the N*K assignments that went to e; a count, no gradient),
    P_e = mean over the N tokens of p_e = softmax(r)_e (differentiable). It is alpha for a uniform router."""
    E, K, N = c["n_routed_experts"], c["num_experts_per_tok"], layer_stats["tokens"]
    f = layer_stats["counts"] / (N * K)
    return alpha * E * (f * layer_stats["score_sum"] / N).sum()


def forward(W, c, tokens, stats=None):
    """§3 on a batch of windows [B, T] -> logits [B, T, V], float64. MoE layers append their routing statistics
    (see moe()) to stats, in layer order, over all B*T tokens of the batch."""
    B, T = tokens.shape
    D, H, G, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd = D // H
    stats = [] if stats is None else stats
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    x = W["model.embed_tokens.weight"][tokens]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}"
        h = rms_norm(x, W[f"{p}.input_layernorm.weight"], eps)
        q = (h @ W[f"{p}.self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ W[f"{p}.self_attn.k_proj.weight"].T).view(B, T, G, hd).transpose(1, 2)
        v = (h @ W[f"{p}.self_attn.v_proj.weight"].T).view(B, T, G, hd).transpose(1, 2)
        q, k = rope(q, c["rope_theta"]), rope(k, c["rope_theta"])
        k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)  # head h reads h // (H/G)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        o = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ v
        x = x + o.transpose(1, 2).reshape(B, T, H * hd) @ W[f"{p}.self_attn.o_proj.weight"].T
        h = rms_norm(x, W[f"{p}.post_attention_layernorm.weight"], eps)
        if is_moe_layer(c, l):
            x = x + moe(W, c, f"{p}.mlp", h.reshape(B * T, D), stats).view(B, T, D)
        else:
            x = x + swiglu(W, f"{p}.mlp", h)
    head = W["model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"]
    return rms_norm(x, W["model.norm.weight"], eps) @ head.T


def training_loss(W, c, inputs, targets, alpha):
    """§3 Loss of one training batch: mean cross-entropy over all B*T targets, plus (softmax scoring) the
    auxiliary loss of every MoE layer over the batch's B*T tokens. Returns (loss, cross-entropy, stats)."""
    stats = []
    logits = forward(W, c, inputs, stats)
    ce = F.cross_entropy(logits.reshape(-1, c["vocab_size"]), targets.reshape(-1))
    loss = ce
    if c.get("n_routed_experts", 0) > 0 and c["scoring_func"] == "softmax":
        loss = ce + sum(aux_loss(c, st, alpha) for st in stats)
    return loss, ce, stats


def moe_layers(c):
    return [l for l in range(c["num_hidden_layers"]) if is_moe_layer(c, l)]


def evaluate(model, data, split):
    """§1 evaluation: the mean cross-entropy of the windows, nothing else (the auxiliary loss is a training term,
    §3 "added to the training loss"). For MoE models also each layer's expert load over the evaluated tokens."""
    tensors, meta = load_checkpoint(model)
    c = meta["config"]
    W = {k: v.double() for k, v in tensors.items() if not k.startswith("optimizer.")}
    s = torch.tensor(encode_split(data, meta["tokenizer"], split))
    T, n = c["max_position_embeddings"], len(s)
    full = (n - 1) // T  # windows with T targets; the rest (if any) is one shorter window
    total = torch.zeros((), dtype=torch.float64)
    layers = moe_layers(c)
    counts = [torch.zeros(c["n_routed_experts"], dtype=torch.float64) for _ in layers]
    margin, near = [math.inf for _ in layers], [0 for _ in layers]

    def run(x, y):
        nonlocal total
        stats = []
        total += F.cross_entropy(forward(W, c, x, stats).reshape(-1, c["vocab_size"]), y.reshape(-1), reduction="sum")
        for i, st in enumerate(stats):
            counts[i] += st["counts"]
            margin[i] = min(margin[i], st["margin"])
            near[i] += st["near_ties"]

    with torch.no_grad():
        for j in range(0, full, 256):
            j2 = min(full, j + 256)
            run(s[j * T:j2 * T].view(-1, T), s[j * T + 1:j2 * T + 1].view(-1, T))
        if full * T < n - 1:
            run(s[full * T:n - 1][None], s[full * T + 1:n][None])
    loss = total.item() / (n - 1)
    out = {"loss": loss, "perplexity": math.exp(loss), "tokens": n - 1}
    if layers:
        out["expert_load"] = {str(l): {"share": (cn / cn.sum()).tolist(), "imbalance": (cn.max() / cn.mean()).item(),
                                       "choice_margin": m, "near_ties": nt}
                              for l, cn, m, nt in zip(layers, counts, margin, near)}
    return out


def compare(args):
    """gpt eval against evaluate() on every split: loss and perplexity to 1e-4 relative, token counts equal.
    For MoE models also each layer's expert load (share of the N*K assignments per expert) and imbalance max/mean
    against gpt's, and the smallest choice margin (a near-tie may route differently in float32)."""
    bad, rows, loads = False, [], []
    c = load_checkpoint(args.model)[1]["config"]
    for split in ("all", "train", "val"):
        out = subprocess.run([args.gpt, "eval", "--model", args.model, "--data", args.data, "--split", split, "--json"],
                             check=True, capture_output=True, text=True).stdout
        g = json.loads(out.strip().splitlines()[-1])
        r = evaluate(args.model, args.data, split)
        for key in ("loss", "perplexity", "tokens"):
            rel = abs(g[key] - r[key]) / max(abs(r[key]), 1e-300)
            ok = rel <= 1e-4 if key != "tokens" else g[key] == r[key]
            bad |= not ok
            verdict = "ok" if ok else "FAIL"
            rows.append(f"| {split:5} | {key:10} | {g[key]:.9g} | {r[key]:.9g} | {rel:.2e} | {verdict} |")
        # gpt's JSON: "expert_load": one list of shares per MoE layer in layer order, "imbalance": max/mean each.
        theirs, near = g.get("expert_load", []), 0
        for i, (l, ld) in enumerate(r.get("expert_load", {}).items()):
            share = theirs[i] if i < len(theirs) and len(theirs[i]) == len(ld["share"]) else None
            diff = None if share is None else max(abs(a - b) for a, b in zip(share, ld["share"]))
            imb = g["imbalance"][i] if share is not None and i < len(g.get("imbalance", [])) else None
            # A share is c_e / (N K): a token routed differently moves a share by 1 / (N K). Only near-ties may
            # route differently: allow two moves for each near-tie in this layer or an earlier one (a flipped
            # choice changes the token's later layers), beyond float32's printing of the share.
            near += ld["near_ties"]
            unit = 1.0 / (r["tokens"] * c["num_experts_per_tok"])
            ok = diff is not None and diff <= 2 * near * unit + 1e-6 and imb is not None and \
                abs(imb - ld["imbalance"]) <= 1e-5 + 2 * near * unit * len(ld["share"])
            bad |= not ok
            loads.append(f"| {split:5} | {l} | {' '.join(f'{x:.5f}' for x in ld['share'])} | {ld['imbalance']:.5f} | "
                         f"{'-' if imb is None else f'{imb:.5f}'} | {ld['choice_margin']:.1e} | {ld['near_ties']} | "
                         + ("missing in gpt's JSON" if diff is None else f"{diff:.1e}") + f" | {'ok' if ok else 'FAIL'} |")
    print("| split | quantity   | gpt | torch float64 | rel diff | |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    if loads:
        print("\n| split | MoE layer | share of assignments per expert (torch) | max/mean (torch) | max/mean (gpt) | "
              "smallest choice gap | gaps < 1e-5 | max share diff vs gpt | |\n|---|---|---|---|---|---|---|---|---|")
        print("\n".join(loads))
    sys.exit(1 if bad else 0)


def schedule(s, N, lr, warmup):
    """§4 learning rate at 0-based step s of N."""
    if s < warmup:
        return lr * (s + 1) / warmup
    if N - 1 - warmup <= 0:  # the formula is 0/0 here; DESIGN.md says lr at s = warmup
        return lr
    return 0.1 * lr + 0.9 * lr * (1 + math.cos(math.pi * (s - warmup) / (N - 1 - warmup))) / 2


B1, B2, ADAM_EPS, WD = 0.9, 0.95, 1e-8, 0.1


def adam_direction(m, v, t):
    """§4 AdamW's bias-corrected step direction m_hat / (sqrt(v_hat) + eps) at 1-based step t."""
    return (m / (1 - B1 ** t)) / ((v / (1 - B2 ** t)).sqrt() + ADAM_EPS)


def check_adam(A, B, k, lr):
    """Checks that the weights and moments in B are one §4 AdamW step (0-based step k, rate lr) after those in A,
    for every tensor but the router bias. A's moments may be absent (then they are zero: k = 0).
    Returns (errors, recovered clipped gradients {name: g}, their float32 uncertainty {name: bound})."""
    t = k + 1
    d = lambda T, n: T[n].double()
    names = [n for n in B if not n.startswith("optimizer.") and not n.endswith(BIAS)]
    err_v = err_w = err_raw = num = den = 0.0
    grads, noise = {}, {}
    for n in names:
        m0 = d(A, "optimizer.exp_avg." + n) if "optimizer.exp_avg." + n in A else torch.zeros_like(d(B, n))
        v0 = d(A, "optimizer.exp_avg_sq." + n) if "optimizer.exp_avg_sq." + n in A else torch.zeros_like(d(B, n))
        m1, v1 = d(B, "optimizer.exp_avg." + n), d(B, "optimizer.exp_avg_sq." + n)
        g = (m1 - B1 * m0) / (1 - B1)  # the clipped gradient of step k
        grads[n] = g
        noise[n] = 2.0 ** -23 * (m1.abs() + B1 * m0.abs()) / (1 - B1)  # float32 rounding of m0 and m1, amplified
        err_v = max(err_v, ((B2 * v0 + (1 - B2) * g * g - v1).abs() / v1.abs().clamp_min(1e-30)).max().item())
        step = adam_direction(m1, v1, t)
        if B[n].dim() >= 2:
            step = step + WD * d(A, n)  # decoupled decay, matrices only
        dw = d(B, n) - d(A, n)
        # W is float32: allow 1e-4 of the step plus one float32 ulp of W (it dominates on norm weights ~1).
        tol = 1e-4 * lr + 2.0 ** -23 * torch.maximum(d(A, n).abs(), d(B, n).abs())
        err_w = max(err_w, ((dw + lr * step).abs() / tol).max().item())
        err_raw = max(err_raw, ((dw + lr * step).abs().max() / lr).item())
        num, den = num - (dw * step).sum().item(), den + (step * step).sum().item()
    grad_norm = math.sqrt(sum((g * g).sum().item() for g in grads.values()))
    return ({"lr": lr, "lr_fit": num / den, "grad_norm": grad_norm, "v_rel_err": err_v, "w_err_over_lr": err_raw,
             "w_err_over_tol": err_w}, grads, noise)


def check_step(path_a, path_b):
    """Checks that checkpoint b is one §4 AdamW step after checkpoint a. Returns the max errors."""
    (A, ma), (B, mb) = load_checkpoint(path_a), load_checkpoint(path_b)
    sa, sb = json.loads(ma["train_state"]), json.loads(mb["train_state"])
    k = sa["step"]
    assert sb["step"] == k + 1, (sa["step"], sb["step"])
    r = check_adam(A, B, k, schedule(k, sa["steps"], sa["lr"], sa["warmup"]))[0]
    return dict(r, step=k)


def bias_steps(A, B, c, gamma):
    """Router-bias change from A to B in units of gamma, per MoE layer: §3 allows only -1, 0, +1 (sigmoid scoring;
    softmax keeps b = 0). Returns the largest distance of any change from the allowed set."""
    worst = 0.0
    for l in moe_layers(c):
        n = f"model.layers.{l}.{BIAS}"
        delta = (B[n].double() - A[n].double()) / gamma
        allowed = torch.tensor([-1.0, 0.0, 1.0] if c["scoring_func"] == "sigmoid" else [0.0], dtype=torch.float64)
        worst = max(worst, (delta[:, None] - allowed[None]).abs().min(1).values.max().item())
        if c["scoring_func"] == "softmax":
            worst = max(worst, B[n].abs().max().item() / gamma)
    return worst


def reference_step(W32, c, inputs, targets, alpha, gamma):
    """One §4 training step's gradient and §3 bias update, in float64, on a known batch.

    loss = cross-entropy (+ softmax scoring: sum over MoE layers of the auxiliary loss); gradient by autograd for
    every tensor but the router bias, which is a constant; when the global L2 norm of all those gradients
    (auxiliary loss included, bias excluded) exceeds 1, they are divided by it. Sigmoid scoring then sets, per MoE layer,
    b_e += gamma * sign(mean_c - c_e) with c_e the layer's counts over the whole batch (a token counts once for
    each of its K experts), computed in this forward pass, before the weights change.
    Returns (clipped gradients, unclipped norm, new biases {name: b}, smallest choice margin, loss)."""
    W = {n: v.double().requires_grad_(not n.endswith(BIAS)) for n, v in W32.items() if not n.startswith("optimizer.")}
    loss, _, stats = training_loss(W, c, inputs, targets, alpha)
    names = [n for n in W if not n.endswith(BIAS)]
    grads = dict(zip(names, torch.autograd.grad(loss, [W[n] for n in names], allow_unused=True)))
    grads = {n: (g if g is not None else torch.zeros_like(W[n])) for n, g in grads.items()}
    norm = math.sqrt(sum((g * g).sum().item() for g in grads.values()))
    if norm > 1.0:
        grads = {n: g / norm for n, g in grads.items()}
    biases, margin = {}, math.inf
    for l, st in zip(moe_layers(c), stats):
        n = f"model.layers.{l}.{BIAS}"
        b = W[n].detach().clone()
        if c["scoring_func"] == "sigmoid":
            b += gamma * torch.sign(st["counts"].mean() - st["counts"])
        biases[n] = b
        margin = min(margin, st["margin"])
    return grads, norm, biases, margin, loss.item()


def init_check(A1, c, lr0):
    """§4 initialisation, seen through the checkpoint after step 0: W_0 = (W_1 + lr_0 d) / (1 - lr_0 wd) with d the
    first AdamW direction (m_0 = v_0 = 0). Matrices: mean 0 and std 0.02, or 0.02/sqrt(2L) for the projections
    into the residual stream (o_proj, every down_proj); norm weights 1. Returns (W_0, worst |z| of the std and the
    mean over all matrices, worst |norm weight - 1|, whether any two experts of a layer start equal)."""
    L, W0, z, norm_err, clones = c["num_hidden_layers"], {}, 0.0, 0.0, False
    for n, w in A1.items():
        if n.startswith("optimizer."):
            continue
        if n.endswith(BIAS):
            W0[n] = torch.zeros_like(w)  # router bias starts at 0 (§4); step 0's update is checked separately
            continue
        direction = adam_direction(A1["optimizer.exp_avg." + n].double(), A1["optimizer.exp_avg_sq." + n].double(), 1)
        w0 = (w.double() + lr0 * direction) / (1 - lr0 * WD if w.dim() >= 2 else 1.0)
        W0[n] = w0.float()
        if w.dim() < 2:
            norm_err = max(norm_err, (w0 - 1).abs().max().item())
            continue
        sigma = 0.02 / math.sqrt(2 * L) if n.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        m = w0.numel()
        z = max(z, abs(w0.pow(2).mean().sqrt().item() / sigma - 1) * math.sqrt(2 * m),
                abs(w0.mean().item()) / (sigma / math.sqrt(m)))
    for l in moe_layers(c):
        ws = [W0[f"model.layers.{l}.mlp.experts.{e}.up_proj.weight"] for e in range(c["n_routed_experts"])]
        clones |= any(torch.equal(ws[i], ws[j]) for i in range(len(ws)) for j in range(i))
    return W0, z, norm_err, clones


# train-check configurations: name -> extra `gpt train` flags (the model shape below is shared by all).
CONFIGS = {
    "dense": [],
    "dense-tied": ["--tie"],
    "sigmoid-k2-shared": ["--experts", "4", "--top-k-experts", "2", "--shared-experts", "1", "--expert-ffn", "16",
                          "--scoring", "sigmoid"],
    "sigmoid-k1-dense1-tied": ["--experts", "4", "--top-k-experts", "1", "--shared-experts", "0", "--expert-ffn", "16",
                               "--scoring", "sigmoid", "--dense-layers", "1", "--tie"],
    "sigmoid-k2-s2-gamma0.01": ["--experts", "6", "--top-k-experts", "2", "--shared-experts", "2", "--expert-ffn", "8",
                                "--scoring", "sigmoid", "--bias-rate", "0.01"],
    "softmax-k2-shared-dense1": ["--experts", "4", "--top-k-experts", "2", "--shared-experts", "1", "--expert-ffn", "16",
                                 "--scoring", "softmax", "--dense-layers", "1"],
    "softmax-k1-tied-alpha0.1": ["--experts", "4", "--top-k-experts", "1", "--shared-experts", "0", "--expert-ffn", "16",
                                 "--scoring", "softmax", "--tie", "--aux-loss", "0.1"],
    "softmax-e8-k3-alpha0.05": ["--experts", "8", "--top-k-experts", "3", "--shared-experts", "1", "--expert-ffn", "8",
                                "--scoring", "softmax", "--aux-loss", "0.05"],
}


def flag_value(flags, name, default):
    return float(flags[flags.index(name) + 1]) if name in flags else default


def train_check(args):
    """Part A, on --data: gpt's own random windows. Each one-step resume must be one §4 AdamW step (the gradient is
    recovered from the moments, g = (m1 - 0.9 m0) / 0.1), the router bias may move only by -gamma, 0, +gamma, and
    an uninterrupted run must equal the chain of one-step resumes bitwise.
    Part B, on a made-up file whose training stream is T+2 tokens: a window can start at 0 or 1 only, so the batch
    is one of B+1 multisets (see exact_batch_check). Then the recovered gradient of every step is checked against
    this file's float64 autograd (cross-entropy + auxiliary loss, clipped), the router bias against §3's update
    from this file's counts, and the weights reconstructed before step 0 against §4's initialisation."""
    tmp, notes = tempfile.mkdtemp(prefix="train_check_"), []
    T = 16
    shape = ["--batch", "4", "--ctx", str(T), "--layers", "2", "--dim", "32", "--heads", "4", "--kv-heads", "2",
             "--ffn", "64", "--eval-every", "1", "--threads", "2"]
    run = lambda *a: subprocess.run([args.gpt, "train", *a], check=True, capture_output=True, text=True)
    bad = False
    two_windows = os.path.join(tmp, "two_windows.txt")
    with open(two_windows, "w") as f:  # [EOT] abcde [EOT] fghij [EOT] klmn [EOT] = 18 = T+2 tokens, no validation doc
        f.write("abcde\nfghij\nklmn\n")
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    for name in names:
        if name not in CONFIGS:
            fail(f"unknown train-check config {name!r}; known: {', '.join(CONFIGS)}")
    for name in names:
        extra = CONFIGS[name]
        gamma, alpha = flag_value(extra, "--bias-rate", 1e-3), flag_value(extra, "--aux-loss", 0.01)
        print(f"\n### {name}: `gpt train {' '.join(shape + extra)}`\n")
        print("Part A (--data, gpt's random windows)\n")
        print("| steps/warmup | step k | lr (§4) | lr fitted | clipped grad norm | v rel err | W err / lr | W err / tol | "
              "bias moves off {0, ±gamma} |")
        print("|---|---|---|---|---|---|---|---|---|")
        for steps, warmup in ((3, 2), (6, 2)):
            ck = [os.path.join(tmp, f"{name}_s{steps}_{k}.safetensors") for k in range(steps + 1)]
            schedule_args = ["--data", args.data, "--steps", str(steps), "--warmup", str(warmup), *shape, *extra]
            run(*schedule_args, "--out", ck[1], "--stop-after", "1")
            T1 = load_checkpoint(ck[1])[0]  # after step 0: m = 0.1 g and v = 0.05 g^2, so v = 5 m^2
            params = [n for n in T1 if not n.startswith("optimizer.") and not n.endswith(BIAS)]
            m, v = (torch.cat([T1[f"optimizer.{x}.{n}"].double().flatten() for n in params]) for x in ("exp_avg", "exp_avg_sq"))
            first = ((v - 5 * m * m).abs() / v.clamp_min(1e-30)).max().item()
            bad |= first > 1e-5
            for k in range(1, steps):
                run("--resume", ck[k], "--data", args.data, "--stop-after", "1", "--threads", "2", "--out", ck[k + 1])
                r = check_step(ck[k], ck[k + 1])
                (A, ma), (B, _) = load_checkpoint(ck[k]), load_checkpoint(ck[k + 1])
                off = bias_steps(A, B, ma["config"], gamma)
                ok = r["v_rel_err"] < 1e-4 and r["w_err_over_tol"] <= 1 and r["grad_norm"] < 1 + 1e-4 and off < 1e-3
                bad |= not ok
                print(f"| {steps}/{warmup} | {k}->{k + 1} | {r['lr']:.6g} | {r['lr_fit']:.6g} | {r['grad_norm']:.6f} | "
                      f"{r['v_rel_err']:.2e} | {r['w_err_over_lr']:.2e} | {r['w_err_over_tol']:.3f} | {off:.1e} |"
                      + ("" if ok else " FAIL"))
            # An uninterrupted run must end with the same weights as the chain of one-step resumes (§6).
            full = os.path.join(tmp, f"{name}_s{steps}_full.safetensors")
            run(*schedule_args, "--out", full)
            Wf, Wc = load_checkpoint(full)[0], load_checkpoint(ck[steps])[0]
            same = set(Wf) == set(Wc) and all(torch.equal(Wf[n], Wc[n]) for n in Wf)
            bad |= not same
            notes.append(f"{name}, steps {steps} warmup {warmup}: after step 0, max rel err of v = 5 m^2: {first:.2e}; "
                         f"uninterrupted run == chain of one-step resumes (all tensors, bitwise): {same}")
        bad |= exact_batch_check(args, run, tmp, name, two_windows, shape, extra, gamma, alpha, notes)
    print("\n" + "\n".join(notes))
    shutil.rmtree(tmp)
    sys.exit(1 if bad else 0)


def exact_batch_check(args, run, tmp, name, data, shape, extra, gamma, alpha, notes):
    """Part B of train_check (see there). Returns True on a failure.

    The training stream is T+2 tokens, so a window starts at 0 or 1 and a batch of B windows is one of B+1
    multisets (n1 windows at 1, the rest at 0; the loss does not depend on their order). Each step is checked
    against the candidate whose float64 gradient is closest to gpt's; the others differ by far more than float32
    rounding. A batch mixing both windows checks that counts, f_e and P_e are taken over the whole batch.
    At step 0 the weight check is circular (W_0 is rebuilt from that very step); its gradient and bias are not."""
    steps, warmup, bad = 4, 2, False
    ck = [os.path.join(tmp, f"{name}_w{k}.safetensors") for k in range(steps + 1)]
    run("--data", data, "--steps", str(steps), "--warmup", str(warmup), *shape, *extra, "--out", ck[1], "--stop-after", "1")
    for k in range(1, steps):
        run("--resume", ck[k], "--data", data, "--stop-after", "1", "--threads", "2", "--out", ck[k + 1])
    A1, meta = load_checkpoint(ck[1])
    c, tok, st = meta["config"], meta["tokenizer"], json.loads(meta["train_state"])
    stream = torch.tensor(encode_split(data, tok, "train"))
    T, nB = c["max_position_embeddings"], st["batch"]
    assert len(stream) == T + 2, (len(stream), T)
    batches = [(torch.stack([stream[i:i + T] for i in [0] * (nB - n1) + [1] * n1]),
                torch.stack([stream[i + 1:i + T + 1] for i in [0] * (nB - n1) + [1] * n1])) for n1 in range(nB + 1)]
    W0, z, norm_err, clones = init_check(A1, c, schedule(0, steps, st["lr"], warmup))
    init_ok = z < 5 and norm_err < 1e-5 and not clones
    bad |= not init_ok
    notes.append(f"{name}, init (§4) from the step-0 checkpoint: worst |z| of matrix std/mean {z:.2f} (< 5), "
                 f"worst |norm weight - 1| {norm_err:.1e}, two experts equal: {clones}" + ("" if init_ok else " FAIL"))
    print(f"\nPart B (a stream of T+2 = {T + 2} tokens: every window starts at 0 or 1; batch {nB})\n")
    print("| step k | windows at 1 | loss (float64) | grad norm before clip | gpt clipped norm | worst tensor grad rel err (L2) | "
          "next candidate | tensors with zero gradient | W err / tol | router bias err / gamma | choice margin |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in range(steps):
        A = W0 if k == 0 else load_checkpoint(ck[k])[0]
        B = load_checkpoint(ck[k + 1])[0]
        lr = schedule(k, steps, st["lr"], warmup)
        r, g_gpt, noise = check_adam(A, B, k, lr)
        tried = []
        for n1, (inputs, targets) in enumerate(batches):
            ref = reference_step(A, c, inputs, targets, alpha, gamma)
            dist = math.sqrt(sum(((g_gpt[n] - g) ** 2).sum().item() for n, g in ref[0].items()))
            tried.append((dist, n1, ref))
        tried.sort(key=lambda x: x[0])
        _, n1, (g_ref, norm, biases, margin, loss) = tried[0]
        runner_up = tried[1][0] / math.sqrt(sum((g * g).sum().item() for g in g_ref.values()))
        worst, worst_name, grad_ok, zero = 0.0, "", True, []
        for n, g in g_ref.items():
            err = (g_gpt[n] - g).norm().item()
            grad_ok &= err <= 1e-3 * g.norm().item() + 2 * noise[n].norm().item() + 1e-12
            if g.norm().item() <= 1e-12:  # zero up to float64 rounding, e.g. the router with sigmoid and K = 1
                zero.append(g_gpt[n].abs().max().item())
            elif err / g.norm().item() > worst:
                worst, worst_name = err / g.norm().item(), n
        b_err = 0.0
        for n, b in biases.items():
            tol = (k + 2) * 2.0 ** -23 * max(b.abs().max().item(), gamma)
            e = (B[n].double() - b).abs().max().item()
            b_err = max(b_err, e / gamma)
            grad_ok &= e <= tol
            for x in ("exp_avg", "exp_avg_sq"):  # moments kept for the bias must stay zero: it has no gradient
                grad_ok &= f"optimizer.{x}.{n}" not in B or not B[f"optimizer.{x}.{n}"].any().item()
        ok = grad_ok and r["w_err_over_tol"] <= 1 and r["v_rel_err"] < 1e-4
        bad |= not ok
        zeros = f"{len(zero)}: gpt max {max(zero):.1e}" if zero else "none"
        print(f"| {k}->{k + 1} | {n1} of {nB} | {loss:.9f} | {norm:.6f} | {r['grad_norm']:.6f} | {worst:.2e} {worst_name} | "
              f"{runner_up:.1e} | {zeros} | {r['w_err_over_tol']:.3f} | {b_err:.1e} | {margin:.1e} |" + ("" if ok else " FAIL")
              + (" (a choice gap under 1e-5: float32 may order it differently)" if margin < NEAR_TIE and not ok else ""))
    return bad


def tiny_config(scoring, E, K, S, k_dense, tie):
    return {"vocab_size": 7, "hidden_size": 8, "intermediate_size": 6, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 5, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": tie, "n_routed_experts": E, "num_experts_per_tok": K, "n_shared_experts": S,
            "moe_intermediate_size": 4, "scoring_func": scoring, "first_k_dense_replace": k_dense}


def random_weights(c, gen):
    """Weights large enough (std 0.5) that routing and the loss depend visibly on every tensor."""
    W = {}
    for n, shape in expected_shapes(c).items():
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        W[n] = 0.3 * x if n.endswith(BIAS) else (1 + 0.1 * x if len(shape) == 1 else 0.5 * x)
    return W


def moe_loop(W, c, p, x):
    """§3 MoE once more, token by token with Python lists: a second formulation to check moe() against."""
    E, K = c["n_routed_experts"], c["num_experts_per_tok"]
    out = []
    for t in range(len(x)):
        r = [W[f"{p}.gate.weight"][e] @ x[t] for e in range(E)]
        if c["scoring_func"] == "sigmoid":
            s = [1 / (1 + math.exp(-r[e].item())) for e in range(E)]
            key = [s[e] + W[f"{p}.gate.e_score_correction_bias"][e].item() for e in range(E)]
        else:
            z = sum(math.exp(v.item()) for v in r)
            s = [math.exp(v.item()) / z for v in r]
            key = s
        chosen = sorted(range(E), key=lambda e: (-key[e], e))[:K]
        y = sum(s[e] / sum(s[i] for i in chosen) * swiglu(W, f"{p}.experts.{e}", x[t:t + 1])[0] for e in chosen)
        if c["n_shared_experts"] > 0:
            y = y + swiglu(W, f"{p}.shared_experts", x[t:t + 1])[0]
        out.append(y)
    return torch.stack(out)


def self_test(args):
    """Checks of this file's MoE against §3, independent of any engine. Exit 1 on a failure."""
    gen, results = torch.Generator().manual_seed(5), []

    def report(what, value, ok):
        results.append(ok)
        print(f"| {what} | {value} | {'ok' if ok else 'FAIL'} |")

    print("| check | value | |\n|---|---|---|")
    # 1. The masked all-experts MoE equals a token-by-token loop, with a bias that changes some choices.
    for scoring, K, S in (("sigmoid", 1, 0), ("sigmoid", 2, 1), ("softmax", 1, 1), ("softmax", 2, 0)):
        c = tiny_config(scoring, 4, K, S, 0, False)
        W = random_weights(c, gen)
        x = torch.randn(12, 8, generator=gen, dtype=torch.float64)
        p = "model.layers.0.mlp"
        diff = (moe(W, c, p, x, []) - moe_loop(W, c, p, x)).abs().max().item()
        nobias = dict(W, **{f"{p}.gate.e_score_correction_bias": torch.zeros(4, dtype=torch.float64)})
        st_b, st_0 = [], []
        moe(W, c, p, x, st_b), moe(nobias, c, p, x, st_0)
        moved = not torch.equal(st_b[0]["counts"], st_0[0]["counts"])
        ok = diff < 1e-12 and (moved if scoring == "sigmoid" else not moved)
        report(f"moe() == per-token loop, {scoring} K={K} S={S}; the bias changes the choice: {moved}", f"{diff:.1e}", ok)
    # 2. E = 1, K = 1, no shared expert, sigmoid scoring is the dense MLP with the same weights (the gate is 1).
    c1 = tiny_config("sigmoid", 1, 1, 0, 0, False)
    W1 = random_weights(c1, gen)
    cd = {k: v for k, v in c1.items() if k not in MOE_KEYS}
    cd["intermediate_size"] = c1["moe_intermediate_size"]
    Wd = {n.replace("mlp.experts.0.", "mlp."): w for n, w in W1.items() if "mlp.gate." not in n}
    tokens = torch.randint(0, 7, (2, 5), generator=gen)
    diff = (forward(W1, c1, tokens) - forward(Wd, cd, tokens)).abs().max().item()
    report("E=1 K=1 S=0 sigmoid == dense SwiGLU, logits", f"{diff:.1e}", diff < 1e-12)
    # 3. A zero router: all scores tie, the lower indices win, and the auxiliary loss is exactly alpha (P_e = 1/E).
    for K in (1, 2):
        c = tiny_config("softmax", 4, K, 0, 0, False)
        W = random_weights(c, gen)
        W["model.layers.0.mlp.gate.weight"].zero_()
        stats = []
        moe(W, c, "model.layers.0.mlp", torch.randn(10, 8, generator=gen, dtype=torch.float64), stats)
        a = aux_loss(c, stats[0], 0.01).item()
        want = torch.tensor([10.0] * K + [0.0] * (4 - K), dtype=torch.float64)
        report(f"zero router K={K}: counts {stats[0]['counts'].tolist()}, aux loss == alpha", f"{a:.17g}",
               torch.equal(stats[0]["counts"], want) and abs(a - 0.01) < 1e-17)
    # 4. Gradients of the training loss (cross-entropy + auxiliary loss) by central finite differences.
    for scoring, K, S, k_dense, tie in (("sigmoid", 1, 0, 0, False), ("sigmoid", 2, 1, 1, True),
                                        ("sigmoid", 2, 2, 0, False), ("softmax", 1, 1, 0, True),
                                        ("softmax", 2, 0, 1, False), ("softmax", 2, 1, 0, False)):
        c = tiny_config(scoring, 3, K, S, k_dense, tie)
        while True:  # a choice closer than the finite-difference step would make the loss non-smooth there
            W = random_weights(c, gen)
            tokens = torch.randint(0, 7, (2, 5), generator=gen)
            stats = []
            forward(W, c, tokens[:, :4], stats)
            if min(st["margin"] for st in stats) > 1e-3:
                break
        names = [n for n in W if not n.endswith(BIAS)]
        fixed = {n: w for n, w in W.items() if n.endswith(BIAS)}

        def loss_of(*params):
            return training_loss(dict(fixed, **dict(zip(names, params))), c, tokens[:, :4], tokens[:, 1:], 0.5)[0]
        params = [W[n].clone().requires_grad_(True) for n in names]
        ok = torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)
        # The bias must get no gradient: it only chooses.
        Wb = {n: w.clone().requires_grad_(True) for n, w in W.items()}
        loss = training_loss(Wb, c, tokens[:, :4], tokens[:, 1:], 0.5)[0]
        bias_grads = torch.autograd.grad(loss, [Wb[n] for n in fixed], allow_unused=True)
        no_bias_grad = all(g is None or not g.any() for g in bias_grads)
        router = sum(p.numel() for n, p in zip(names, params) if n.endswith("mlp.gate.weight"))
        report(f"gradcheck {scoring} K={K} S={S} dense layers {k_dense} tied {tie} (alpha 0.5, {sum(p.numel() for p in params)} "
               f"parameters, {router} in routers); bias gets no gradient: {no_bias_grad}", "", ok and no_bias_grad)
    print(f"\n{sum(results)} passed, {len(results) - sum(results)} failed")
    sys.exit(0 if all(results) else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("eval", "compare", "train-check", "self-test"):
        p = sub.add_parser(cmd)
        if cmd == "self-test":
            continue
        p.add_argument("--data", required=True)
        if cmd != "eval":
            p.add_argument("--gpt", required=True, help="path to the gpt binary")
        if cmd != "train-check":
            p.add_argument("--model", required=True, help="safetensors checkpoint")
        if cmd == "eval":
            p.add_argument("--split", default="all", choices=["all", "train", "val"])
        if cmd == "train-check":
            p.add_argument("--configs", default="dense", help=f"'all' or comma-separated, of: {', '.join(CONFIGS)}")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.cmd == "eval":
        print(json.dumps(evaluate(args.model, args.data, args.split)))
    elif args.cmd == "compare":
        compare(args)
    elif args.cmd == "self-test":
        self_test(args)
    else:
        train_check(args)


if __name__ == "__main__":
    main()
