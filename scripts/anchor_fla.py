#!/usr/bin/env python3
"""Anchor harness (GPU machine only): times fla's chunk_rwkv7 on the same
shapes and random inputs as `rwkv-tune bench`, in the same run, and checks
rwkv-tune's CUDA outputs against fla's and against an fp64 reference.

Layout/argument mapping (see docs/kernels.md):
  * fla's state is [B, H, K, V] (key-major) = the transpose of ours
    ([B, H, N, N] value-major): pass h0.transpose(-1, -2), transpose sT back;
  * fla's decay argument is the log-decay: pass log(w); dw = d(log w) / w.

Usage (on the GPU machine, from the repo root, after .ci/gpu-build here):
  python3 scripts/anchor_fla.py --bin .gpu/rwkv-tune --out $OUT/anchor.json
Requires torch + triton (present on the GPU machines) and the
flash-linear-attention wheel (pip install --no-deps --target .gpu/pylib).
"""
import argparse, json, os, struct, subprocess, sys, tempfile, time

import torch


def model_like_inputs(B, T, H, N, seed, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    r, k, v = rnd(B, T, H, N) * 0.5, rnd(B, T, H, N) * 0.5, rnd(B, T, H, N) * 0.5
    w = 0.55 + 0.45 * torch.rand(B, T, H, N, generator=g)
    kap = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    alpha = 0.05 + 0.9 * torch.rand(B, T, H, N, generator=g)
    a, b = -kap, kap * alpha
    h0 = rnd(B, H, N, N) * 0.3
    dy = rnd(B, T, H, N)
    dhT = rnd(B, H, N, N)
    return {n: t.to(device) for n, t in dict(r=r, w=w, k=k, v=v, a=a, b=b, h0=h0, dy=dy, dhT=dhT).items()}


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().float().contiguous().cpu().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    import numpy as np
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, m in header.items():
        if name == "__metadata__":
            continue
        s, e = m["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[s:e], dtype=np.float32).copy()).reshape(m["shape"])
    return out


def reference_f64(x):
    """Sequential fp64 recurrence on the GPU (value-major state)."""
    d = {k: v.double() for k, v in x.items()}
    B, T, H, N = d["r"].shape
    S = d["h0"].clone()
    ys = []
    for t in range(T):
        r, w, k, v, a, b = (d[n][:, t] for n in "rwkvab")
        sa = torch.einsum("bhij,bhj->bhi", S, a)
        S = S * w[:, :, None, :] + sa[..., None] * b[:, :, None, :] + v[..., None] * k[:, :, None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", S, r))
    return torch.stack(ys, 1), S


def fla_run(x, dtype, backward):
    from fla.ops.rwkv7 import chunk_rwkv7
    p = {n: x[n].to(dtype).detach().requires_grad_(backward) for n in "rkvab"}
    logw = torch.log(x["w"]).to(dtype).detach().requires_grad_(backward)
    h0 = x["h0"].transpose(-1, -2).contiguous().float().detach().requires_grad_(backward)
    o, sT = chunk_rwkv7(r=p["r"], w=logw, k=p["k"], v=p["v"], a=p["a"], b=p["b"], scale=1.0,
                        initial_state=h0, output_final_state=True)
    out = {"y": o.float(), "hT": sT.transpose(-1, -2).float()}
    if backward:
        loss = (o.float() * x["dy"]).sum() + (sT.float() * x["dhT"].transpose(-1, -2)).sum()
        loss.backward()
        for n in "rkvab":
            out["d" + n] = p[n].grad.float()
        out["dw"] = logw.grad.float() / x["w"]
        out["dh0"] = h0.grad.transpose(-1, -2).float()
    return out


def time_cuda(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def rel_fro(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=".gpu/rwkv-tune")
    ap.add_argument("--out", default="anchor.json")
    ap.add_argument("--timing-shapes", default="8,4096,64,64;8,4096,12,64")
    ap.add_argument("--check-shape", default="2,300,4,64")
    a = ap.parse_args()
    dev = "cuda"
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "timing": [], "accuracy": {}}
    try:
        import fla
        res["fla"] = getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        print(f"fla not importable: {e}", file=sys.stderr)
        res["fla"] = None

    # accuracy: rwkv-tune (CLI, cuda, bf16) and fla (bf16) vs fp64 on the same inputs
    B, T, H, N = map(int, a.check_shape.split(","))
    x = model_like_inputs(B, T, H, N, 1, dev)
    with tempfile.TemporaryDirectory() as td:
        write_safetensors(os.path.join(td, "in.safetensors"), x)
        for dt in ["f32", "bf16"]:
            subprocess.run([a.bin, "wkv7", "--backend", "cuda", "--dtype", dt, "--input", os.path.join(td, "in.safetensors"),
                            "--output", os.path.join(td, f"out-{dt}.safetensors")], check=True)
        ours = {dt: read_safetensors(os.path.join(td, f"out-{dt}.safetensors")) for dt in ["f32", "bf16"]}
    y64, hT64 = reference_f64(x)
    res["accuracy"]["rwkv-tune f32 y"] = rel_fro(ours["f32"]["y"].to(dev), y64)
    res["accuracy"]["rwkv-tune bf16 y"] = rel_fro(ours["bf16"]["y"].to(dev), y64)
    res["accuracy"]["rwkv-tune bf16 hT"] = rel_fro(ours["bf16"]["hT"].to(dev), hT64)
    if res["fla"] is not None:
        f = fla_run(x, torch.bfloat16, True)
        res["accuracy"]["fla bf16 y"] = rel_fro(f["y"], y64)
        res["accuracy"]["fla bf16 hT"] = rel_fro(f["hT"], hT64)
        for n in ["dr", "dw", "dk", "dv", "da", "db", "dh0"]:
            res["accuracy"][f"rwkv-tune bf16 vs fla bf16 {n}"] = rel_fro(ours["bf16"][n].to(dev), f[n])

    # timing: fla in this run; rwkv-tune's own numbers come from `rwkv-tune bench` in the same job
    for s in a.timing_shapes.split(";"):
        B, T, H, N = map(int, s.split(","))
        x = model_like_inputs(B, T, H, N, 2, dev)
        row = {"B": B, "T": T, "H": H, "N": N, "dtype": "bf16"}
        if res["fla"] is not None:
            with torch.no_grad():
                row["fla_forward_ms"] = time_cuda(lambda: fla_run(x, torch.bfloat16, False))
            row["fla_forward_backward_ms"] = time_cuda(lambda: fla_run(x, torch.bfloat16, True))
        res["timing"].append(row)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
