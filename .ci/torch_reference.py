#!/usr/bin/env python3
"""Independent float64 PyTorch reference for gpt.cpp, written from DESIGN.md (§1-§4, §6) only.

  torch_reference.py eval --model M --data F [--split all|train|val]   -> JSON {loss, perplexity, tokens}
  torch_reference.py compare --gpt BIN --model M --data F              -> table; exit 1 on a mismatch
  torch_reference.py train-check --gpt BIN --data F                    -> checks one AdamW step at a time
"""
import argparse, json, math, os, re, shutil, struct, subprocess, sys, tempfile
import torch
import torch.nn.functional as F

CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings"]


def fail(msg):
    sys.exit(f"torch_reference: {msg}")


def expected_shapes(c):
    """§6: every model tensor name with its shape, from the config (dense models: gpt.cpp has no MoE yet)."""
    V, D, L = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]
    H, G, Fd = c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    hd = D // H
    out = {"model.embed_tokens.weight": [V, D], "model.norm.weight": [D]}
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = [V, D]
    for l in range(L):
        p = f"model.layers.{l}"
        out.update({f"{p}.input_layernorm.weight": [D], f"{p}.post_attention_layernorm.weight": [D],
                    f"{p}.self_attn.q_proj.weight": [H * hd, D], f"{p}.self_attn.k_proj.weight": [G * hd, D],
                    f"{p}.self_attn.v_proj.weight": [G * hd, D], f"{p}.self_attn.o_proj.weight": [D, H * hd],
                    f"{p}.mlp.gate_proj.weight": [Fd, D], f"{p}.mlp.up_proj.weight": [Fd, D],
                    f"{p}.mlp.down_proj.weight": [D, Fd]})
    return out


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
    if sorted(cfg) != sorted(CONFIG_KEYS):
        fail(f"config keys {sorted(cfg)} != {sorted(CONFIG_KEYS)} (MoE configs are not supported here)")
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
    return (F.silu(x @ W[f"{p}.gate_proj.weight"].T) * (x @ W[f"{p}.up_proj.weight"].T)) @ W[f"{p}.down_proj.weight"].T


def forward(W, c, tokens):
    """§3 on a batch of windows [B, T] -> logits [B, T, V], float64."""
    B, T = tokens.shape
    D, H, G, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd = D // H
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
        x = x + swiglu(W, f"{p}.mlp", rms_norm(x, W[f"{p}.post_attention_layernorm.weight"], eps))
    head = W["model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"]
    return rms_norm(x, W["model.norm.weight"], eps) @ head.T


def evaluate(model, data, split):
    tensors, meta = load_checkpoint(model)
    c = meta["config"]
    W = {k: v.double() for k, v in tensors.items() if not k.startswith("optimizer.")}
    s = torch.tensor(encode_split(data, meta["tokenizer"], split))
    T, n = c["max_position_embeddings"], len(s)
    full = (n - 1) // T  # windows with T targets; the rest (if any) is one shorter window
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for j in range(0, full, 256):
            j2 = min(full, j + 256)
            x, y = s[j * T:j2 * T].view(-1, T), s[j * T + 1:j2 * T + 1].view(-1, T)
            total += F.cross_entropy(forward(W, c, x).reshape(-1, c["vocab_size"]), y.reshape(-1), reduction="sum")
        if full * T < n - 1:
            x, y = s[full * T:n - 1][None], s[full * T + 1:n][None]
            total += F.cross_entropy(forward(W, c, x)[0], y[0], reduction="sum")
    loss = total.item() / (n - 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n - 1}


def compare(args):
    bad, rows = False, []
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
    print("| split | quantity   | gpt | torch float64 | rel diff | |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    sys.exit(1 if bad else 0)


def schedule(s, N, lr, warmup):
    """§4 learning rate at 0-based step s of N."""
    if s < warmup:
        return lr * (s + 1) / warmup
    if N - 1 - warmup <= 0:  # the formula is 0/0 here; DESIGN.md says lr at s = warmup
        return lr
    return 0.1 * lr + 0.9 * lr * (1 + math.cos(math.pi * (s - warmup) / (N - 1 - warmup))) / 2


def check_step(path_a, path_b):
    """Checks that checkpoint b is one §4 AdamW step after checkpoint a. Returns the max errors."""
    (A, ma), (B, mb) = load_checkpoint(path_a), load_checkpoint(path_b)
    sa, sb = json.loads(ma["train_state"]), json.loads(mb["train_state"])
    k = sa["step"]
    assert sb["step"] == k + 1, (sa["step"], sb["step"])
    lr = schedule(k, sa["steps"], sa["lr"], sa["warmup"])
    t, wd, b1, b2, eps = k + 1, 0.1, 0.9, 0.95, 1e-8
    names = [n for n in A if not n.startswith("optimizer.")]
    d = lambda T, n: T[n].double()
    err_v = err_w = err_raw = sq = num = den = 0.0
    for n in names:
        m0, m1 = d(A, "optimizer.exp_avg." + n), d(B, "optimizer.exp_avg." + n)
        v0, v1 = d(A, "optimizer.exp_avg_sq." + n), d(B, "optimizer.exp_avg_sq." + n)
        g = (m1 - b1 * m0) / (1 - b1)  # the clipped gradient of step k
        sq += (g * g).sum().item()
        err_v = max(err_v, ((b2 * v0 + (1 - b2) * g * g - v1).abs() / v1.abs().clamp_min(1e-30)).max().item())
        step = (m1 / (1 - b1 ** t)) / ((v1 / (1 - b2 ** t)).sqrt() + eps)
        if A[n].dim() >= 2:
            step = step + wd * d(A, n)  # decoupled decay, matrices only
        dw = d(B, n) - d(A, n)
        # W is float32: allow 1e-4 of the step plus one float32 ulp of W (it dominates on norm weights ~1).
        tol = 1e-4 * lr + 2.0 ** -23 * torch.maximum(d(A, n).abs(), d(B, n).abs())
        err_w = max(err_w, ((dw + lr * step).abs() / tol).max().item())
        err_raw = max(err_raw, ((dw + lr * step).abs().max() / lr).item())
        num, den = num - (dw * step).sum().item(), den + (step * step).sum().item()
    return {"step": k, "lr": lr, "lr_fit": num / den, "grad_norm": math.sqrt(sq), "v_rel_err": err_v,
            "w_err_over_lr": err_raw, "w_err_over_tol": err_w}


def train_check(args):
    tmp, notes = tempfile.mkdtemp(prefix="train_check_"), []
    shape = ["--batch", "4", "--ctx", "16", "--layers", "2", "--dim", "32", "--heads", "4", "--kv-heads", "2",
             "--ffn", "64", "--eval-every", "1", "--threads", "2"]
    run = lambda *a: subprocess.run([args.gpt, "train", *a], check=True, capture_output=True, text=True)
    bad = False
    print("| steps/warmup | step k | lr (§4) | lr fitted | clipped grad norm | v rel err | W err / lr | W err / tol |")
    print("|---|---|---|---|---|---|---|---|")
    for steps, warmup in ((3, 2), (6, 2)):
        ck = [os.path.join(tmp, f"s{steps}_{k}.safetensors") for k in range(steps + 1)]
        schedule_args = ["--data", args.data, "--steps", str(steps), "--warmup", str(warmup), *shape]
        run(*schedule_args, "--out", ck[1], "--stop-after", "1")
        T1 = load_checkpoint(ck[1])[0]  # after step 0: m = 0.1 g and v = 0.05 g^2, so v = 5 m^2
        m, v = (torch.cat([T1[f"optimizer.{x}.{n}"].double().flatten() for n in T1 if not n.startswith("optimizer.")])
                for x in ("exp_avg", "exp_avg_sq"))
        first = ((v - 5 * m * m).abs() / v.clamp_min(1e-30)).max().item()
        bad |= first > 1e-5
        for k in range(1, steps):
            run("--resume", ck[k], "--data", args.data, "--stop-after", "1", "--threads", "2", "--out", ck[k + 1])
            r = check_step(ck[k], ck[k + 1])
            ok = r["v_rel_err"] < 1e-4 and r["w_err_over_tol"] <= 1 and r["grad_norm"] < 1 + 1e-4
            bad |= not ok
            print(f"| {steps}/{warmup} | {k}->{k + 1} | {r['lr']:.6g} | {r['lr_fit']:.6g} | {r['grad_norm']:.6f} | "
                  f"{r['v_rel_err']:.2e} | {r['w_err_over_lr']:.2e} | {r['w_err_over_tol']:.3f} |"
                  + ("" if ok else " FAIL"))
        # An uninterrupted run must end with the same weights as the chain of one-step resumes (§6).
        full = os.path.join(tmp, f"s{steps}_full.safetensors")
        run(*schedule_args, "--out", full)
        Wf, Wc = load_checkpoint(full)[0], load_checkpoint(ck[steps])[0]
        same = set(Wf) == set(Wc) and all(torch.equal(Wf[n], Wc[n]) for n in Wf)
        bad |= not same
        notes.append(f"steps {steps} warmup {warmup}: after step 0, max rel err of v = 5 m^2: {first:.2e}; "
                     f"uninterrupted run == chain of one-step resumes (all tensors, bitwise): {same}")
    print("\n" + "\n".join(notes))
    shutil.rmtree(tmp)
    sys.exit(1 if bad else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("eval", "compare", "train-check"):
        p = sub.add_parser(cmd)
        p.add_argument("--data", required=True)
        if cmd != "eval":
            p.add_argument("--gpt", required=True, help="path to the gpt binary")
        if cmd != "train-check":
            p.add_argument("--model", required=True, help="safetensors checkpoint")
        if cmd == "eval":
            p.add_argument("--split", default="all", choices=["all", "train", "val"])
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.cmd == "eval":
        print(json.dumps(evaluate(args.model, args.data, args.split)))
    elif args.cmd == "compare":
        compare(args)
    else:
        train_check(args)


if __name__ == "__main__":
    main()
