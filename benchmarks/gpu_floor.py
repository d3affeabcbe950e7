# ruff: noqa  (a verbatim copy of shared/tools/gpu_floor.py, kept identical to compare floors)
"""Physical-floor probe for SlimGPT on one GPU: time the unavoidable work of
pruning a LLaMA-7B-shaped model layer by layer (random weights; compute is the
same as for real ones). Prints one JSON line per measurement."""
import json, time, torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

def t(fn, n=3):
    fn(); torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / n

dev = "cuda"
cfg = LlamaConfig()  # 7B shape: 4096 hidden, 11008 ffn, 32 heads, 32 layers
cfg._attn_implementation = "sdpa"
NS, L, B = 128, 2048, 8  # calibration: 128 samples x 2048 tokens, batch 8
layer = LlamaDecoderLayer(cfg, 0).to(dev, torch.bfloat16).eval()
rope = LlamaRotaryEmbedding(cfg).to(dev)
x = torch.randn(B, L, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
pos = torch.arange(L, device=dev)[None].expand(B, L)
pe = rope(x, pos)
@torch.no_grad()
def fwd():
    out = layer(x, position_embeddings=pe, position_ids=pos)
    return out
tf = t(fwd) * (NS // B)
print(json.dumps({"what": "layer forward, 128x2048 tokens, bf16 sdpa", "s_per_layer": round(tf, 4)}))

tok = NS * L
for name, d in [("attn_in", 4096), ("o_in", 4096), ("mlp_in", 4096), ("down_in", 11008)]:
    X = torch.randn(B * L, d, device=dev, dtype=torch.bfloat16)
    H32 = torch.zeros(d, d, device=dev)
    Xf = X.float()
    def acc_bf16():  # bf16 inputs, fp32 accumulate and output
        H32.add_(torch.mm(X.t(), X, out_dtype=torch.float32))
    def acc_bf16_out():  # throughput reference: bf16 output
        return X.t() @ X
    print(json.dumps({"what": f"bf16-out gemm {name}", "s": round(t(acc_bf16_out) * (NS // B), 4)}))
    def acc_fp32():
        H32.addmm_(Xf.t(), Xf)
    try:
        a = t(acc_bf16) * (NS // B)
    except Exception as e:
        a = None; print(json.dumps({"bf16_err": str(e)[:200]}))
    torch.backends.cuda.matmul.allow_tf32 = False
    b = t(acc_fp32) * (NS // B)
    torch.backends.cuda.matmul.allow_tf32 = True
    c = t(acc_fp32) * (NS // B)
    torch.backends.cuda.matmul.allow_tf32 = False
    print(json.dumps({"what": f"hessian {name} d={d}", "bf16in_s": a and round(a, 4), "fp32_s": round(b, 4), "tf32_s": round(c, 4)}))

for d in (4096, 11008):
    A = torch.randn(d, d, device=dev, dtype=torch.float64)
    H = (A @ A.t() / d + torch.eye(d, device=dev, dtype=torch.float64))
    for dt in (torch.float32, torch.float64):
        Hd = H.to(dt)
        def inv():
            Lc = torch.linalg.cholesky(Hd)
            return torch.cholesky_inverse(Lc)
        print(json.dumps({"what": f"cholesky+inverse d={d} {dt}", "s": round(t(inv), 4)}))
    W = torch.randn(4096, d, device=dev)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H.float()))
    g = 128
    def upd():
        Q = slice(0, g)
        M = torch.linalg.inv(Hinv[Q, Q])
        W.sub_(W[:, Q] @ M @ Hinv[Q, :])
        Hinv.sub_(Hinv[:, Q] @ M @ Hinv[Q, :])
    print(json.dumps({"what": f"group-{g} OBS update W 4096x{d}", "s": round(t(upd), 5)}))

props = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": props.name, "torch": torch.__version__, "mem_GiB": round(props.total_memory / 2**30)}))
