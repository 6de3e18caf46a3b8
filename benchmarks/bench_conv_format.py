"""One resnet_tiny-sized 3x3 convolution alone (batch 128, one thread), forward and backward, channels-last
against NCHW: whether the thin layers would train faster in the other memory format.

    python benchmarks/bench_conv_format.py
"""

from __future__ import annotations

import time

import torch

LAYERS = [(3, 8, 32), (8, 8, 32), (8, 16, 16), (16, 16, 16), (16, 32, 8), (32, 32, 8)]  # in, out, height = width


def time_conv(cin: int, cout: int, hw: int, fmt: torch.memory_format, n: int = 20) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(128, cin, hw, hw).to(memory_format=fmt).requires_grad_()
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(memory_format=fmt)
    fwd = bwd = 0.0
    for i in range(n + 3):  # 3 warm-up passes
        t0 = time.perf_counter()
        y = conv(x)
        t1 = time.perf_counter()
        g = torch.randn_like(y)
        t2 = time.perf_counter()
        y.backward(g)
        t3 = time.perf_counter()
        if i >= 3:
            fwd, bwd = fwd + t1 - t0, bwd + t3 - t2
    return fwd / n * 1e3, bwd / n * 1e3


def main() -> None:
    torch.set_num_threads(1)
    for cin, cout, hw in LAYERS:
        for name, fmt in [("channels-last", torch.channels_last), ("NCHW", torch.contiguous_format)]:
            f, b = time_conv(cin, cout, hw, fmt)
            print(f"{cin:2d}->{cout:2d} at {hw:2d}x{hw:<2d} {name:13s} forward {f:6.2f} ms  backward {b:6.2f} ms")


if __name__ == "__main__":
    main()
