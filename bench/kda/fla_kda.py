"""Times flash-linear-attention's chunk_kda on the shapes of bench/kda/bench_kda.cpp, same inputs
(q, k unit-norm with q pre-scaled so scale=1.0, v ~ N(0,1), g in [-0.5, -0.01] fp32, beta fp32),
and prints lines in the same format. Peak memory: torch.cuda.max_memory_allocated over the run,
inputs included (peak_gib), and torch.cuda.max_memory_reserved (reserved_gib: the caching allocator's high-water
mark, its free blocks included; reset only with the process, so it covers earlier shapes of the same run). Usage: python3 bench/kda/fla_kda.py [B T]..."""
import sys

import torch
from fla.ops.kda import chunk_kda


def run(B, T, H=16, d=128):
    torch.manual_seed(B * 1000003 + T)
    dev = "cuda"
    q = torch.nn.functional.normalize(torch.randn(B, T, H, d, device=dev), dim=-1) * d ** -0.5
    k = torch.nn.functional.normalize(torch.randn(B, T, H, d, device=dev), dim=-1)
    q, k = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
    v = torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = (torch.rand(B, T, H, d, device=dev) * 0.49 - 0.5).requires_grad_()
    beta = (torch.rand(B, T, H, device=dev) * 0.96 + 0.02).requires_grad_()
    do = torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            chunk_kda(q, k, v, g, beta, scale=1.0)

    def fwdbwd():
        o, _ = chunk_kda(q, k, v, g, beta, scale=1.0)
        o.backward(do)
        q.grad = k.grad = v.grad = g.grad = beta.grad = None

    iters = 3 if B * T >= 65536 else 10
    res = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for f in (fwd, fwdbwd):
        f()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(iters):
            f()
        e1.record()
        torch.cuda.synchronize()
        res.append(e0.elapsed_time(e1) / iters)
    peak = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30  # what the caching allocator held from the device
    print(f"fla B={B} T={T} H={H} d={d} fwd_ms={res[0]:.3f} fwdbwd_ms={res[1]:.3f} peak_gib={peak:.2f} "
          f"reserved_gib={reserved:.2f}", flush=True)


if __name__ == "__main__":
    a = [int(x) for x in sys.argv[1:]]
    shapes = list(zip(a[0::2], a[1::2])) or [(8, 4096), (2, 16384), (1, 32768), (1, 131072)]
    for B, T in shapes:
        run(B, T)
