"""Per-layer forward+backward times of FCN-8s (paper, VGG16) at a 64x64 input, batch 1: JAX vs PyTorch."""
import os, sys, time, statistics
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
import jax, jax.numpy as jnp, numpy as np, torch
torch.set_num_threads(2)
size = int(sys.argv[1]) if len(sys.argv) > 1 else 64

def shapes():
    h = size + 200 - 2   # conv1_1: padding 100, 3x3
    layers = [("conv1_1", size + 200, 3, 64, 3, 0)]
    chans = [(64, 1), (128, 2), (256, 3), (512, 3), (512, 3)]
    cin = 64; first = True
    for stage, (c, n) in enumerate(chans):
        for i in range(n):
            if first:
                first = False; continue
            layers.append((f"conv{stage+1}_{i+1 if stage else 2}", h, cin, c, 3, 1)); cin = c
        h = -(-h // 2)
    layers.append(("fc6", h, 512, 4096, 7, 0))
    h6 = h - 6
    layers.append(("fc7", h6, 4096, 4096, 1, 0))
    layers.append(("score_fr", h6, 4096, 21, 1, 0))
    return layers

def timeit(f, n=5):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3

tot_j = tot_t = 0
for name, h, cin, cout, k, pad in shapes():
    x = np.random.default_rng(0).standard_normal((1, h, h, cin), np.float32)
    w = np.random.default_rng(1).standard_normal((k, k, cin, cout), np.float32) * 0.01
    def jf(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, vjp = jax.vjp(jf, x, w)
    g = np.ones(y.shape, np.float32)
    fwd = jax.jit(jf); bwd = jax.jit(lambda x, w, g: jax.vjp(jf, x, w)[1](g))
    tj_f = timeit(lambda: fwd(x, w).block_until_ready())
    tj_b = timeit(lambda: jax.block_until_ready(bwd(x, w, g)))
    tx = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
    tw = torch.tensor(w).permute(3, 2, 0, 1).contiguous().requires_grad_()
    tg = torch.tensor(g).permute(0, 3, 1, 2).contiguous()
    def tfwd():
        with torch.no_grad(): torch.nn.functional.conv2d(tx, tw, padding=pad)
    def tbwd():
        y = torch.nn.functional.conv2d(tx, tw, padding=pad); torch.autograd.grad(y, (tx, tw), tg)
    tt_f = timeit(tfwd); tt_fb = timeit(tbwd)
    tot_j += tj_f + tj_b; tot_t += tt_fb
    print(f"{name:9s} in {h}x{h}x{cin} -> {cout} k{k}: JAX fwd {tj_f:7.1f} bwd {tj_b:7.1f} | torch fwd {tt_f:7.1f} fwd+bwd {tt_fb:7.1f} ms | ratio {(tj_f+tj_b)/tt_fb:.2f}", flush=True)
print(f"total JAX fwd+bwd {tot_j:.0f} ms, torch {tot_t:.0f} ms")
