#!/usr/bin/env python3
"""PyTorch eager CPU yardstick for `./gpt bench`: the DESIGN.md §3 model trained with §4's AdamW in float32.

  torch_yardstick.py [--threads N] [--configs tiny,small,medium] [--seconds 3] [--json]

Each config: random token batches (vocab 32), a few warm-up steps, then steps are timed one by one until at
least --seconds have passed; ms/step is the median (the mean is shown too), tokens/s = B*T / median.
A step is forward + cross-entropy + backward + clip_grad_norm_(1.0) + AdamW.
"""
import argparse, json, math, os, sys, time

# torch.set_num_threads does not reach the BLAS of every build: Debian's torch 1.13 (BLAS_INFO=generic) calls an
# OpenBLAS that starts one thread per core whatever torch is told, so "--threads 1" used both cores of a 2-core
# machine. The BLAS reads its thread count from the environment when it loads, so it is set before torch is imported.
_threads = next((a.split("=", 1)[1] if "=" in a else sys.argv[i + 1]
                 for i, a in enumerate(sys.argv) if a.startswith("--threads") and ("=" in a or i + 1 < len(sys.argv))), "1")
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = _threads
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 32
CONFIGS = {  # name: (L, D, H, G, F, T, B), as gpt bench's rows
    "tiny": (1, 16, 4, 4, 64, 16, 1),
    "small": (4, 64, 4, 4, 256, 32, 32),
    "medium": (6, 192, 6, 2, 512, 128, 16),
}
HAS_SDPA = hasattr(F, "scaled_dot_product_attention")  # torch >= 2.0


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def linear(n_in, n_out, std):
    layer = nn.Linear(n_in, n_out, bias=False)
    nn.init.normal_(layer.weight, 0.0, std)
    return layer


class Block(nn.Module):
    def __init__(self, L, D, H, G, Fh):
        super().__init__()
        self.H, self.G, self.hd = H, G, D // H
        out_std = 0.02 / math.sqrt(2 * L)  # §4: projections into the residual stream
        self.attn_norm, self.ffn_norm = RMSNorm(D), RMSNorm(D)
        self.q, self.k, self.v = linear(D, D, 0.02), linear(D, G * self.hd, 0.02), linear(D, G * self.hd, 0.02)
        self.o = linear(D, D, out_std)
        self.gate, self.up, self.down = linear(D, Fh, 0.02), linear(D, Fh, 0.02), linear(Fh, D, out_std)

    def attention(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.H, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.G, self.hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.G, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.G != self.H:  # query head h reads key/value head h // (H/G)
            k, v = k.repeat_interleave(self.H // self.G, 1), v.repeat_interleave(self.H // self.G, 1)
        if HAS_SDPA:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.hd))
            o = torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ v
        return self.o(o.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.attn_norm(x), cos, sin, mask)
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class GPT(nn.Module):
    def __init__(self, L, D, H, G, Fh, T):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        self.blocks = nn.ModuleList(Block(L, D, H, G, Fh) for _ in range(L))
        self.norm, self.head = RMSNorm(D), linear(D, VOCAB, 0.02)
        hd = D // H
        a = torch.arange(T).float()[:, None] * (10000.0 ** (-torch.arange(0, hd // 2).float() * 2 / hd))[None]
        self.register_buffer("cos", torch.cos(a))
        self.register_buffer("sin", torch.sin(a))
        self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).triu(1))

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin, self.mask)
        return self.head(self.norm(x))


def bench(name, seconds):
    L, D, H, G, Fh, T, B = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(L, D, H, G, Fh, T)
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]  # decoupled weight decay on matrices only
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    batches = [torch.randint(0, VOCAB, (B, T + 1)) for _ in range(8)]

    def step(i):
        batch = batches[i % len(batches)]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    t0 = time.perf_counter()
    warm = 0
    while warm < 3 or time.perf_counter() - t0 < 0.5:
        step(warm)
        warm += 1
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step(len(times))
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]  # the median resists the noise of a shared machine
    return {"config": name, "L": L, "D": D, "H": H, "G": G, "F": Fh, "T": T, "B": B,
            "params": sum(p.numel() for p in params), "steps": len(times), "ms_per_step": dt * 1e3,
            "mean_ms_per_step": sum(times) / len(times) * 1e3, "tokens_per_s": B * T / dt}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads(N), and the BLAS's threads")
    ap.add_argument("--configs", default="tiny,small,medium")
    ap.add_argument("--seconds", type=float, default=3.0, help="least time spent timing each config")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(name, args.seconds) for name in args.configs.split(",")]
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": args.threads, "sdpa": HAS_SDPA, "results": rows}))
        return
    print(f"PyTorch {torch.__version__} eager CPU, float32, {args.threads} thread(s), "
          f"attention: {'scaled_dot_product_attention' if HAS_SDPA else 'explicit masked softmax'}\n")
    print("| config | L D H G F | T x B | params | steps timed | ms/step (median) | ms/step (mean) | tokens/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['L']} {r['D']} {r['H']} {r['G']} {r['F']} | {r['T']} x {r['B']} | {r['params']} | "
              f"{r['steps']} | {r['ms_per_step']:.2f} | {r['mean_ms_per_step']:.2f} | {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
