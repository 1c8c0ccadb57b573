"""The MoE FFN layer of bench/moe/bench_moe.cpp in PyTorch, timed the same way, printing lines in the
same format (prefix `torch`). bench/moe/run.sh runs both in one call.

Layer (trainer/layer_moe.h, bf16 activations and weights; weights as HF qwen3_moe stores them):
    logits = x.float() @ W_r.float().T          (f32 router, as ours)
    s = softmax(logits) | sigmoid(logits);  w, e = topk(s, k);  w /= sum(w) if norm_topk_prob
    out[t] = sum_j w_tj FFN_{e_tj}(x_t) + sum_s FFN^shared_s(x_t),
    FFN_e(x) = (silu(x G_e^T) * (x U_e^T)) W_down_e^T,  gate_up [E, 2F, D] = [G; U],  down [E, D, F]
Dispatch: the N k (token, slot) pairs sorted stably by expert (argsort), the token rows gathered in
that order, every expert's SwiGLU on its contiguous rows, the rows gathered back to (token, slot) order
and combined with w (one batched [1, k] x [k, D] product per token: f32 accumulation, no atomics).
Experts, two paths (--path; `auto` takes the first that works here and the line says which ran):
  grouped_mm: torch._grouped_mm(rows [M, D], weights.transpose(-2, -1) [E, D, 2F], offs=int32 cumulative
              row ends) for gate_up and down, autograd backward (PyTorch's grouped GEMM, bf16, sm90 on
              CUDA). Each expert's rows are padded to a multiple of --align (zero rows): the weight
              gradient contracts over the rows of a group and its TMA loads need 16-byte aligned group
              starts (8 bf16 rows; 16 is the safe choice); the slack rows go to the last expert.
  loop:       one torch.mm per expert with rows (the counts go to the host once per step).
Backward: autograd with a fixed random upstream gradient, into x and every weight (bf16 gradients,
where ours accumulates f32 ones). Timing: CUDA events around each iteration after --warmup untimed ones,
the median; on the CPU (smoke checks only) perf_counter. Peak memory: torch.cuda.max_memory_allocated
over the timed steps, weights, inputs and gradients included.
FLOPs as in bench_moe.cpp: fwd = 2 N k D 3F + 2 N D E + 2 N S D 3F_s, fwd+bwd = 3 fwd.

Usage: python3 bench/moe/torch_moe.py [--tokens N] [--hidden D] [--experts E] [--top_k k] [--ffn F]
           [--shared S] [--shared_ffn F_s] [--score softmax|sigmoid] [--norm_topk 0|1] [--iters I]
           [--warmup W] [--device cuda|cpu] [--path auto|grouped_mm|loop] [--align A] [--check]
CPU smoke check: python3 bench/moe/torch_moe.py --device cpu --tokens 64 --hidden 64 --experts 8 --top_k 2
                     --ffn 32 --iters 2 --check
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--shared", type=int, default=0)
    p.add_argument("--shared_ffn", type=int, default=0, help="0: the routed experts' ffn")
    p.add_argument("--score", choices=["softmax", "sigmoid"], default="softmax")
    p.add_argument("--norm_topk", type=int, choices=[0, 1], default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--path", choices=["auto", "grouped_mm", "loop"], default="auto")
    p.add_argument("--align", type=int, default=16, help="rows per expert group padded to a multiple (grouped_mm)")
    p.add_argument("--check", action="store_true",
                   help="compare output and gradients of both paths with a dense per-token reference (tiny shapes)")
    a = p.parse_args(argv)
    if a.shared_ffn == 0:
        a.shared_ffn = a.ffn
    if not 0 < a.top_k <= a.experts:
        p.error(f"--top_k must be in [1, --experts], got {a.top_k}")
    if a.align < 1 or a.iters < 1 or a.warmup < 0:
        p.error("--align and --iters must be >= 1, --warmup >= 0")
    return a


class TorchMoe:
    """Parameters (leaf tensors, requires_grad) and the forward of one MoE FFN layer."""

    def __init__(self, a, device, dtype, seed=0):
        torch.manual_seed(seed)
        E, D, F_, S, Fs = a.experts, a.hidden, a.ffn, a.shared, a.shared_ffn

        def normal(*shape):
            return (torch.randn(*shape, device=device, dtype=dtype) * 0.02).requires_grad_()

        self.router = normal(E, D)
        self.gate_up = normal(E, 2 * F_, D)
        self.down = normal(E, D, F_)
        self.shared_gate_up = normal(S, 2 * Fs, D) if S > 0 else None
        self.shared_down = normal(S, D, Fs) if S > 0 else None
        self.a = a
        self.path = "loop"

    def params(self):
        return [p for p in (self.router, self.gate_up, self.down, self.shared_gate_up, self.shared_down)
                if p is not None]

    def route(self, x):
        """Combine weights w [N, k] f32 and experts e [N, k] (descending score)."""
        logits = x.float() @ self.router.float().t()
        s = logits.softmax(-1) if self.a.score == "softmax" else logits.sigmoid()
        w, e = s.topk(self.a.top_k, dim=-1)
        if self.a.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        return w, e

    def dispatch(self, e, align):
        """The expert-major layout of the N k pairs (pair q = t k + j).
        Returns src_token [M] (token of each expert-major row; N marks a zero padding row),
        pair_row [N k] (the row holding pair q), offs int32 [E] (cumulative row ends), counts [E]."""
        N, k, E = e.shape[0], e.shape[1], self.a.experts
        flat = e.reshape(-1)
        order = torch.argsort(flat, stable=True)  # sorted position p -> pair q
        counts = torch.bincount(flat, minlength=E)
        nk = flat.numel()
        if align == 1:
            rows = nk
            dest = torch.arange(nk, device=e.device)
            offs = torch.cumsum(counts, 0)
        else:
            padded = (counts + align - 1) // align * align
            ends = torch.cumsum(padded, 0)
            e_sorted = flat[order]
            start_unpadded = torch.cumsum(counts, 0) - counts
            dest = torch.arange(nk, device=e.device) - start_unpadded[e_sorted] + (ends - padded)[e_sorted]
            rows = (nk + E * (align - 1) + align - 1) // align * align  # an upper bound: no host sync
            offs = ends.clone()
            offs[-1] = rows  # the slack rows (zero) belong to the last expert
        src_token = torch.full((rows,), N, dtype=torch.long, device=e.device)
        src_token[dest] = torch.div(order, k, rounding_mode="floor")
        pair_row = torch.empty_like(dest)
        pair_row[order] = dest
        return src_token, pair_row, offs.to(torch.int32), counts

    def experts_grouped(self, xp, offs):
        F_ = self.a.ffn
        h = torch._grouped_mm(xp, self.gate_up.transpose(-2, -1), offs=offs)
        act = F.silu(h[:, :F_]) * h[:, F_:]
        return torch._grouped_mm(act, self.down.transpose(-2, -1), offs=offs)

    def experts_loop(self, xp, counts):
        F_ = self.a.ffn
        ys, start = [], 0
        for ex, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            h = xp[start:start + c] @ self.gate_up[ex].t()
            ys.append((F.silu(h[:, :F_]) * h[:, F_:]) @ self.down[ex].t())
            start += c
        return torch.cat(ys)

    def forward(self, x):
        N, D, k = x.shape[0], x.shape[1], self.a.top_k
        w, e = self.route(x)
        grouped = self.path == "grouped_mm"
        src_token, pair_row, offs, counts = self.dispatch(e, self.a.align if grouped else 1)
        x_src = F.pad(x, (0, 0, 0, 1)) if src_token.numel() > N * k else x  # row N: zeros for padding rows
        xp = x_src.index_select(0, src_token)
        yp = self.experts_grouped(xp, offs) if grouped else self.experts_loop(xp, counts)
        y_pairs = yp.index_select(0, pair_row).view(N, k, D)
        out = torch.bmm(w.to(x.dtype).unsqueeze(1), y_pairs).squeeze(1)
        for sh in range(self.a.shared):
            h = x @ self.shared_gate_up[sh].t()
            Fs = self.a.shared_ffn
            out = out + (F.silu(h[:, :Fs]) * h[:, Fs:]) @ self.shared_down[sh].t()
        return out

    def forward_dense(self, x):
        """Every expert on every token, then the chosen ones combined: the definition (tiny shapes only)."""
        F_ = self.a.ffn
        w, e = self.route(x)
        h = torch.einsum("nd,efd->enf", x, self.gate_up)
        y_all = torch.einsum("enf,edf->end", F.silu(h[..., :F_]) * h[..., F_:], self.down)  # [E, N, D]
        tok = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(e)
        out = (y_all[e, tok] * w.to(x.dtype).unsqueeze(-1)).sum(1)
        for sh in range(self.a.shared):
            hs = x @ self.shared_gate_up[sh].t()
            Fs = self.a.shared_ffn
            out = out + (F.silu(hs[:, :Fs]) * hs[:, Fs:]) @ self.shared_down[sh].t()
        return out


def grouped_mm_status(device, dtype):
    """(works, why not): a tiny aligned grouped product, forward and backward, against torch.mm."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        a = torch.randn(32, 64, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(2, 48, 64, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
        o = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
        o.backward(torch.ones_like(o))
        ref = torch.cat([a[:16] @ b[0].t(), a[16:] @ b[1].t()])
        if not torch.allclose(o.float(), ref.float(), rtol=2e-2, atol=2e-1) or b.grad is None:
            return False, "torch._grouped_mm disagrees with torch.mm"
    except (RuntimeError, NotImplementedError, TypeError) as err:
        return False, f"torch._grouped_mm failed: {str(err).splitlines()[0]}"
    return True, ""


def check(model, x, dout):
    """Both paths and the dense definition agree on out, dx and every weight gradient."""
    results = {}
    for path in ("dense", "loop", "grouped_mm"):
        if path == "grouped_mm" and not grouped_mm_status(x.device, x.dtype)[0]:
            continue
        model.path = path
        xg = x.detach().clone().requires_grad_()
        for p in model.params():
            p.grad = None
        out = model.forward_dense(xg) if path == "dense" else model.forward(xg)
        out.backward(dout)
        results[path] = [out.detach(), xg.grad] + [p.grad for p in model.params()]
    names = ["out", "dx"] + ["router", "gate_up", "down", "shared_gate_up", "shared_down"][:len(model.params())]
    tol = 1e-4 if x.dtype == torch.float32 else 3e-2
    ok = True
    for path, res in results.items():
        if path == "dense":
            continue
        for name, got, want in zip(names, res, results["dense"]):
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
            good = err <= tol
            ok &= good
            print(f"check path={path} {name} max_rel_err={err:.2e} {'ok' if good else 'FAIL'}")
    return ok


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    cuda = device.type == "cuda"
    model = TorchMoe(a, device, dtype)
    x = torch.randn(a.tokens, a.hidden, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(a.tokens, a.hidden, device=device, dtype=dtype)

    if a.check and not check(model, x, dout):
        print("torch_moe: the paths disagree", file=sys.stderr)
        return 1

    works, why = grouped_mm_status(device, dtype)
    if a.path == "grouped_mm" and not works:
        print(f"torch_moe: --path grouped_mm: {why}", file=sys.stderr)
        return 1
    model.path = a.path if a.path != "auto" else ("grouped_mm" if works else "loop")
    if a.path == "auto" and not works:
        print(f"torch_moe: {why}; timing the per-expert loop", file=sys.stderr)
    with torch.no_grad():
        counts = torch.bincount(model.route(x)[1].reshape(-1), minlength=a.experts)

    def fwd():
        with torch.no_grad():
            model.forward(x)

    def fwdbwd():
        model.forward(x).backward(dout)
        x.grad = None
        for p in model.params():
            p.grad = None

    def median_ms(f):
        for _ in range(a.warmup):
            f()
        if not cuda:
            times = []
            for _ in range(a.iters):
                t0 = time.perf_counter()
                f()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(a.iters + 1)]
        torch.cuda.synchronize()
        ev[0].record()
        for i in range(a.iters):
            f()
            ev[i + 1].record()
        torch.cuda.synchronize()
        return statistics.median(ev[i].elapsed_time(ev[i + 1]) for i in range(a.iters))

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    f_ms = median_ms(fwd)
    fb_ms = median_ms(fwdbwd)
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    N, D, E, k = a.tokens, a.hidden, a.experts, a.top_k
    fwd_flops = 2.0 * N * k * D * 3 * a.ffn + 2.0 * N * D * E + 2.0 * N * a.shared * D * 3 * a.shared_ffn
    print(f"torch tokens={N} hidden={D} experts={E} top_k={k} ffn={a.ffn} shared={a.shared} score={a.score} "
          f"fwd_ms={f_ms:.3f} fwdbwd_ms={fb_ms:.3f} fwd_tflops={fwd_flops / (f_ms * 1e9):.1f} "
          f"fwdbwd_tflops={3 * fwd_flops / (fb_ms * 1e9):.1f} peak_mib={peak_mib:.0f} "
          f"load_min={int(counts.min())} load_max={int(counts.max())} path={model.path} "
          f"align={a.align if model.path == 'grouped_mm' else 1} torch={torch.__version__} device={device.type}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
