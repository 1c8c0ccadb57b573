"""Times torch.nn.functional.scaled_dot_product_attention (causal, bf16, [B, H, T, d], the flash
backend when available, else PyTorch's default choice) on the shapes of bench/attention/bench_attention.cpp
and prints lines in the same format. Usage: python3 bench/attention/sdpa.py [B T]..."""
import contextlib
import sys

import torch
import torch.nn.functional as F


def flash_context():
    """A fresh context manager restricting SDPA to the flash backend (contextmanagers are single-use)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def run(B, T, H=16, d=128):
    torch.manual_seed(B * 1000003 + T)
    dev = "cuda"
    q, k, v = (torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwdbwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.backward(do)
        q.grad = k.grad = v.grad = None

    make_ctx, backend = flash_context, "flash"
    try:
        with make_ctx():
            fwdbwd()
    except (ImportError, RuntimeError):  # no torch.nn.attention, or the flash backend refused: PyTorch chooses
        make_ctx, backend = contextlib.nullcontext, "default"
    res = []
    with make_ctx():
        for f in (fwd, fwdbwd):
            f()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            iters = 10
            e0.record()
            for _ in range(iters):
                f()
            e1.record()
            torch.cuda.synchronize()
            res.append(e0.elapsed_time(e1) / iters)
    flops = 2.0 * B * H * T * T * d
    print(f"sdpa B={B} T={T} H={H} d={d} fwd_ms={res[0]:.3f} fwdbwd_ms={res[1]:.3f} "
          f"fwd_tflops={flops / (res[0] * 1e9):.1f} fwdbwd_tflops={3.5 * flops / (res[1] * 1e9):.1f} "
          f"backend={backend}", flush=True)


if __name__ == "__main__":
    a = [int(x) for x in sys.argv[1:]]
    shapes = list(zip(a[0::2], a[1::2])) or [(8, 4096), (2, 16384), (1, 32768)]
    for B, T in shapes:
        run(B, T)
