#!/usr/bin/env python3
"""The anchor of the GPU check (.ci/gpu-run): fla's chunk_rwkv7 beside
rwkv-tune's WKV-7 kernels on the same inputs, and both against an f64
reference. Two subcommands:

  inputs  --shape B,T,H,N --out FILE
      Writes model-like random inputs (r w k v a b dy in bf16; h0 dhT in f32)
      to a safetensors file. `rwkv-tune bench --inputs FILE` times our kernels
      on it and `anchor --inputs FILE` times fla on it, so both see the same
      values. With torch the tensors are drawn on the GPU; without torch (the
      dry run) in pure Python (tiny shapes only).

  anchor  --bin RWKV_TUNE --backend cuda|emu --inputs FILE --check-shape B,T,H,N --out JSON
      1. accuracy at the small check shape: rwkv-tune (`rwkv-tune wkv7`,
         kernels v1, v2, v3 and v3x, f32 and bf16 I/O) and fla (bf16, f32) against a
         sequential f64 forward + backward written here in pure Python, on
         inputs that are exactly representable in bf16 (so every
         implementation sees the same values); y, hT and every gradient
         (dr dw dk dv da db dh0), relative Frobenius error.
      2. timing of fla at the shape of FILE: forward (no grad) and
         forward + backward (gradients dy, dhT), CUDA events, median after
         warm-up, L2 flushed before each repetition; every conversion (bf16,
         log-decay, the transposed state) happens before the timed region.
         Triton's autotuning is restricted to at most --autotune-configs
         configurations per kernel (evenly spaced in fla's list); the JSON says
         so, with the numbers of configurations kept and offered.
      The JSON is rewritten after each part, so a timeout keeps what was done.
      Order: rwkv-tune vs f64, fla timing, fla vs f64 and vs rwkv-tune.

  report  --json anchor.json [--bench-json bench.json]
      Short lines for .ci/gpu-run's summary, with our bench rows as multiples
      of fla's time.

fla's conventions (docs/kernels.md): decay argument = log(w), state [B,H,K,V]
(key-major, the transpose of ours), scale = 1. Our dw = d(log w) / w.
fla lives in the fla-core wheel (+ einops, packaging), unzipped by .ci/gpu-run.
"""
import argparse
import array
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import time

SEQ = ["r", "w", "k", "v", "a", "b", "dy"]
STATE = ["h0", "dhT"]
OUTS = ["y", "hT", "dr", "dw", "dk", "dv", "da", "db", "dh0"]


def have_torch():
    try:
        import torch  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------- safetensors


def write_st(path, tensors):
    """tensors: name -> (dtype "F32"|"BF16", shape, raw little-endian bytes)."""
    header, off = {}, 0
    for name, (dt, shape, data) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, (_, _, data) in tensors.items():
            f.write(data)


def read_st(path):
    """name -> (dtype, shape, raw bytes)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, m in header.items():
        if name == "__metadata__":
            continue
        s, e = m["data_offsets"]
        out[name] = (m["dtype"], m["shape"], data[s:e])
    return out


def f32_list(raw, dt):
    if dt == "F32":
        a = array.array("f")
        a.frombytes(raw)
        return list(a)
    if dt == "BF16":
        a = array.array("H")
        a.frombytes(raw)
        return [struct.unpack("<f", struct.pack("<I", u << 16))[0] for u in a]
    raise ValueError(f"dtype {dt}")


def f32_bytes(xs):
    return array.array("f", xs).tobytes()


def bf16_round(x):
    """f32 -> nearest-even bf16, returned as a Python float."""
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    u = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000) & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", u))[0]


def f32_round(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


# ------------------------------------------------------------------- inputs


def python_inputs(B, T, H, N, seed):
    """Model-like inputs as flat lists; seq tensors bf16-representable."""
    g = random.Random(seed)
    sl, st = B * T * H * N, B * H * N * N
    bf = bf16_round
    d = {
        "r": [bf(g.gauss(0, 0.5)) for _ in range(sl)],
        "k": [bf(g.gauss(0, 0.5)) for _ in range(sl)],
        "v": [bf(g.gauss(0, 0.5)) for _ in range(sl)],
        "w": [bf(g.uniform(0.55, 1.0)) for _ in range(sl)],
        "a": [0.0] * sl,
        "b": [0.0] * sl,
    }
    for o in range(0, sl, N):
        kap = [g.gauss(0, 1) for _ in range(N)]
        nrm = math.sqrt(sum(x * x for x in kap)) or 1.0
        for j in range(N):
            kh = kap[j] / nrm
            d["a"][o + j] = bf(-kh)
            d["b"][o + j] = bf(kh * g.uniform(0.05, 0.95))
    d["h0"] = [f32_round(g.gauss(0, 0.3)) for _ in range(st)]
    d["dy"] = [bf(g.gauss(0, 1)) for _ in range(sl)]
    d["dhT"] = [f32_round(g.gauss(0, 1)) for _ in range(st)]
    return d


def torch_inputs(B, T, H, N, seed):
    """The same distributions drawn on the GPU: seq tensors bf16, states f32."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=g)
    s = (B, T, H, N)
    kap = torch.nn.functional.normalize(torch.randn(*s, **kw), dim=-1)
    alpha = 0.05 + 0.9 * torch.rand(*s, **kw)
    x = {
        "r": torch.randn(*s, **kw) * 0.5,
        "k": torch.randn(*s, **kw) * 0.5,
        "v": torch.randn(*s, **kw) * 0.5,
        "w": 0.55 + 0.45 * torch.rand(*s, **kw),
        "a": -kap,
        "b": kap * alpha,
        "dy": torch.randn(*s, **kw),
    }
    x = {n: t.to(torch.bfloat16) for n, t in x.items()}
    x["h0"] = torch.randn(B, H, N, N, **kw) * 0.3
    x["dhT"] = torch.randn(B, H, N, N, **kw)
    return x


def torch_raw(t):
    import ctypes

    c = t.detach().contiguous().cpu()
    return ctypes.string_at(c.data_ptr(), c.numel() * c.element_size())


def cmd_inputs(a):
    B, T, H, N = map(int, a.shape.split(","))
    t0 = time.time()
    if have_torch() and not a.pure_python:
        import torch

        x = torch_inputs(B, T, H, N, a.seed)
        tensors = {n: ("BF16" if x[n].dtype == torch.bfloat16 else "F32", list(x[n].shape), torch_raw(x[n])) for n in SEQ + STATE}
        how = "torch (GPU generator)"
    else:
        x = python_inputs(B, T, H, N, a.seed)
        shp = {n: [B, T, H, N] for n in SEQ} | {n: [B, H, N, N] for n in STATE}
        tensors = {n: ("F32", shp[n], f32_bytes(x[n])) for n in SEQ + STATE}
        how = "pure Python"
    write_st(a.out, tensors)
    mb = os.path.getsize(a.out) / 2**20
    print(f"inputs {B},{T},{H},{N} seed {a.seed} via {how}: {a.out} ({mb:.1f} MiB, {time.time() - t0:.1f} s)")


# ------------------------------------------------------------ f64 reference


def reference_f64(x, dims):
    """Sequential f64 forward + backward; value-major state S[i][j]
    (i = value, j = key): S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ,
    y_t = S_t r_t; loss = Σ y·dy + Σ S_T·dhT."""
    B, T, H, N = dims
    sl, st = B * T * H * N, B * H * N * N
    out = {n: [0.0] * sl for n in ["y", "dr", "dw", "dk", "dv", "da", "db"]}
    out["hT"], out["dh0"] = [0.0] * st, [0.0] * st
    rn = range(N)
    for b in range(B):
        for h in range(H):
            so = (b * H + h) * N * N

            def vec(name, t, _b=b, _h=h):
                o = ((_b * T + t) * H + _h) * N
                return x[name][o : o + N]

            S = [[x["h0"][so + i * N + j] for j in rn] for i in rn]
            Ss = [S]
            for t in range(T):
                r, w, k, v, aa, bb = (vec(n, t) for n in "rwkvab")
                sa = [sum(S[i][j] * aa[j] for j in rn) for i in rn]
                S = [[S[i][j] * w[j] + sa[i] * bb[j] + v[i] * k[j] for j in rn] for i in rn]
                Ss.append(S)
                o = ((b * T + t) * H + h) * N
                for i in rn:
                    out["y"][o + i] = sum(S[i][j] * r[j] for j in rn)
            for i in rn:
                for j in rn:
                    out["hT"][so + i * N + j] = S[i][j]
            G = [[x["dhT"][so + i * N + j] for j in rn] for i in rn]
            for t in reversed(range(T)):
                r, w, k, v, aa, bb, dy = (vec(n, t) for n in ["r", "w", "k", "v", "a", "b", "dy"])
                St, Sp = Ss[t + 1], Ss[t]
                o = ((b * T + t) * H + h) * N
                G = [[G[i][j] + dy[i] * r[j] for j in rn] for i in rn]
                for j in rn:
                    out["dr"][o + j] = sum(St[i][j] * dy[i] for i in rn)
                    out["dk"][o + j] = sum(G[i][j] * v[i] for i in rn)
                    out["dw"][o + j] = sum(Sp[i][j] * G[i][j] for i in rn)
                gb = [sum(G[i][j] * bb[j] for j in rn) for i in rn]
                sa = [sum(Sp[i][j] * aa[j] for j in rn) for i in rn]
                for i in rn:
                    out["dv"][o + i] = sum(G[i][j] * k[j] for j in rn)
                for j in rn:
                    out["da"][o + j] = sum(Sp[i][j] * gb[i] for i in rn)
                    out["db"][o + j] = sum(sa[i] * G[i][j] for i in rn)
                G = [[G[i][j] * w[j] + gb[i] * aa[j] for j in rn] for i in rn]
            for i in rn:
                for j in rn:
                    out["dh0"][so + i * N + j] = G[i][j]
    return out


def rel_fro(a, ref):
    num = sum((float(p) - q) ** 2 for p, q in zip(a, ref))
    den = sum(q * q for q in ref)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# ------------------------------------------------------------------ fla


def restrict_autotune(k):
    """Keeps ≤ k configs (evenly spaced) in every Triton autotuner created
    from now on: fla decorates with triton.autotune and with its own
    fla_cache_autotune, both build a triton Autotuner, so its constructor is
    the one place to cut. Returns [(offered, kept)] per autotuned kernel."""
    from triton.runtime.autotuner import Autotuner

    stats = []
    orig = Autotuner.__init__

    def init(self, fn, arg_names, *args, **kw):
        args = list(args)
        configs = kw.pop("configs") if "configs" in kw else args.pop(0)
        n = len(configs)
        if n > k:
            idx = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
            configs = [configs[i] for i in idx]
        stats.append((n, len(configs)))
        orig(self, fn, arg_names, configs, *args, **kw)

    Autotuner.__init__ = init
    return stats


def fla_outputs(x64, dims, dtype):
    """fla chunk_rwkv7 forward + backward on the check inputs (flat lists)."""
    import torch
    from fla.ops.rwkv7 import chunk_rwkv7

    B, T, H, N = dims
    t = lambda n, shp: torch.tensor(x64[n], dtype=torch.float64, device="cuda").reshape(shp)  # noqa: E731
    s, stt = (B, T, H, N), (B, H, N, N)
    p = {n: t(n, s).to(dtype).requires_grad_(True) for n in "rkvab"}
    w = t("w", s)
    logw = torch.log(w).to(dtype).requires_grad_(True)
    h0 = t("h0", stt).transpose(-1, -2).contiguous().float().requires_grad_(True)
    o, sT = chunk_rwkv7(r=p["r"], w=logw, k=p["k"], v=p["v"], a=p["a"], b=p["b"], scale=1.0, initial_state=h0, output_final_state=True)
    torch.autograd.backward([o, sT], [t("dy", s).to(o.dtype), t("dhT", stt).transpose(-1, -2).contiguous().to(sT.dtype)])
    res = {"y": o, "hT": sT.transpose(-1, -2)}
    for n in "rkvab":
        res["d" + n] = p[n].grad
    res["dw"] = logw.grad.double() / w
    res["dh0"] = h0.grad.transpose(-1, -2)
    return {n: v.double().contiguous().flatten().cpu().tolist() for n, v in res.items()}


def time_fla(path, warmup, reps):
    import torch
    from fla.ops.rwkv7 import chunk_rwkv7

    raw = read_st(path)

    def tens(n):
        dt, shape, data = raw[n]
        tdt = {"F32": torch.float32, "BF16": torch.bfloat16}[dt]
        return torch.frombuffer(bytearray(data), dtype=tdt).reshape(shape).to("cuda")

    x = {n: tens(n) for n in SEQ + STATE}
    B, T, H, N = x["r"].shape
    bf = torch.bfloat16
    # every conversion before the timed region
    p = {n: x[n].to(bf).contiguous() for n in "rkvab"}
    logw = torch.log(x["w"].float()).to(bf).contiguous()
    h0 = x["h0"].transpose(-1, -2).contiguous().float()
    dy = x["dy"].to(bf).contiguous()
    dhT = x["dhT"].transpose(-1, -2).contiguous().float()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (50 << 20)
    flush = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")
    leaves = [p[n].requires_grad_(True) for n in "rkvab"] + [logw.requires_grad_(True), h0.requires_grad_(True)]

    def fwd():
        with torch.no_grad():
            chunk_rwkv7(r=p["r"], w=logw, k=p["k"], v=p["v"], a=p["a"], b=p["b"], scale=1.0, initial_state=h0, output_final_state=True)

    def fwd_bwd():
        o, sT = chunk_rwkv7(r=p["r"], w=logw, k=p["k"], v=p["v"], a=p["a"], b=p["b"], scale=1.0, initial_state=h0, output_final_state=True)
        torch.autograd.backward([o, sT], [dy.to(o.dtype), dhT.to(sT.dtype)])

    def timed(fn):
        ts = []
        for i in range(warmup + reps):
            for leaf in leaves:
                leaf.grad = None
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            if i >= warmup:
                ts.append(s.elapsed_time(e))
        ts.sort()
        return {"median_ms": ts[len(ts) // 2], "min_ms": ts[0], "reps": reps, "warmup": warmup}

    t0 = time.time()
    row = {"B": B, "T": T, "H": H, "N": N, "dtype": "bf16", "inputs": path}
    row["forward"] = timed(fwd)
    row["forward_backward"] = timed(fwd_bwd)
    row["wall_s"] = round(time.time() - t0, 1)
    return row


# ------------------------------------------------------------------ anchor


def cmd_anchor(a):
    t_start = time.time()
    res = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "backend": a.backend, "check_shape": a.check_shape}

    def save():
        res["wall_s"] = round(time.time() - t_start, 1)
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)

    res["fla"] = None
    stats = None
    if have_torch():
        import torch

        res["torch"] = torch.__version__
        res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        try:
            stats = restrict_autotune(a.autotune_configs)
            import fla
            from fla.ops.rwkv7 import chunk_rwkv7  # noqa: F401

            res["fla"] = getattr(fla, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            res["fla_error"] = f"{type(e).__name__}: {e}"[:400]
    else:
        res["fla_error"] = "torch not importable (dry run / no GPU stack): fla skipped"

    def autotune_stats():
        if stats is not None:
            res["autotune"] = {
                "restricted_to": a.autotune_configs,
                "kernels": len(stats),
                "configs_offered": sum(n for n, _ in stats),
                "configs_kept": sum(k for _, k in stats),
            }

    autotune_stats()
    save()

    # 1. rwkv-tune against the f64 reference at the check shape
    dims = tuple(map(int, a.check_shape.split(",")))
    B, T, H, N = dims
    x = python_inputs(B, T, H, N, 1)
    t0 = time.time()
    ref = reference_f64(x, dims)
    res["reference_f64_s"] = round(time.time() - t0, 1)
    res["accuracy_note"] = "relative Frobenius error against the sequential f64 recurrence (this script), inputs exactly representable in bf16"
    acc, vs, outs = {}, {}, {}
    res["accuracy_vs_f64"], res["rwkv_tune_vs_fla"] = acc, vs
    with tempfile.TemporaryDirectory() as td:
        shp = {n: [B, T, H, N] for n in SEQ} | {n: [B, H, N, N] for n in STATE}
        inp = os.path.join(td, "in.safetensors")
        write_st(inp, {n: ("F32", shp[n], f32_bytes(x[n])) for n in SEQ + STATE})
        for ker in ["v1", "v2", "v3", "v3x"]:
            for dt in ["f32", "bf16"]:
                name = f"rwkv-tune {a.backend} {ker} {dt}"
                o = os.path.join(td, f"out-{ker}-{dt}.safetensors")
                cmd = [a.bin, "wkv7", "--backend", a.backend, "--kernel", ker, "--dtype", dt, "--input", inp, "--output", o]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    acc[name] = {"error": p.stderr.strip()[-400:]}
                    continue
                got = read_st(o)
                got = {n: f32_list(got[n][2], got[n][0]) for n in OUTS}
                acc[name] = {n: rel_fro(got[n], ref[n]) for n in OUTS}
                if dt == "bf16":
                    outs[ker] = got
    save()

    # 2. fla timed at the shape of the inputs file (first: the number the
    # anchor exists for; its Triton compiles happen here)
    if res["fla"] is not None:
        res["fla_timing"] = {"error": "not run: no --inputs file"}
        if a.inputs and os.path.exists(a.inputs):
            try:
                res["fla_timing"] = time_fla(a.inputs, a.warmup, a.reps)
                res["fla_timing"]["autotune_note"] = f"Triton autotuning restricted to <= {a.autotune_configs} configs per kernel (evenly spaced in fla's list)"
            except Exception as e:  # noqa: BLE001
                res["fla_timing"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        autotune_stats()
        save()

    # 3. fla against the f64 reference and against rwkv-tune
    if res["fla"] is not None:
        import torch

        for dt, tdt in [("bf16", torch.bfloat16), ("f32", torch.float32)]:
            name = f"fla chunk_rwkv7 {dt}"
            try:
                f = fla_outputs(x, dims, tdt)
                acc[name] = {n: rel_fro(f[n], ref[n]) for n in OUTS}
                if dt == "bf16":
                    for ker, o in outs.items():
                        vs[f"rwkv-tune {a.backend} {ker} bf16 vs fla bf16"] = {n: rel_fro(o[n], f[n]) for n in OUTS}
            except Exception as e:  # noqa: BLE001
                acc[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
            autotune_stats()
            save()
    save()
    return 0


def cmd_report(a):
    """Short lines for the summary from anchor.json (and bench.json)."""
    if not os.path.exists(a.json):
        print(f"anchor: no {a.json}")
        return 1
    res = json.load(open(a.json))
    fla = res.get("fla")
    print(f"anchor: fla {fla or 'unavailable'}" + (f" ({res.get('fla_error')})" if not fla else "") + f"; check shape {res.get('check_shape')}; f64 reference {res.get('reference_f64_s', '?')} s; wall {res.get('wall_s')} s")
    at = res.get("autotune")
    if at:
        print(f"anchor: Triton autotune restricted to <= {at['restricted_to']} configs/kernel: {at['configs_kept']} of {at['configs_offered']} kept over {at['kernels']} kernels")
    print(f"  {'implementation':<30} {'y':>9} {'hT':>9} {'worst grad':>10}  (rel. Frobenius error vs f64)")
    for name, e in res.get("accuracy_vs_f64", {}).items():
        if "error" in e:
            print(f"  {name:<30} ERROR {e['error'][:160]}")
        else:
            g = max(e[n] for n in OUTS[2:])
            print(f"  {name:<30} {e['y']:9.2e} {e['hT']:9.2e} {g:10.2e}")
    for name, e in res.get("rwkv_tune_vs_fla", {}).items():
        print(f"  {name}: y {e['y']:.2e} hT {e['hT']:.2e} worst grad {max(e[n] for n in OUTS[2:]):.2e} (rel. difference)")
    ft = res.get("fla_timing")
    if ft and "error" not in ft:
        print(f"anchor: fla bf16 B={ft['B']} T={ft['T']} H={ft['H']} N={ft['N']}: forward {ft['forward']['median_ms']:.3f} ms, forward+backward {ft['forward_backward']['median_ms']:.3f} ms (median of {ft['forward']['reps']}, restricted autotune)")
        if a.bench_json and os.path.exists(a.bench_json):
            for r in json.load(open(a.bench_json)):
                key = {"forward": "forward", "forward+backward": "forward_backward"}.get(r["pass"])
                if key and (r["b"], r["t"], r["h"], r["n"]) == (ft["B"], ft["T"], ft["H"], ft["N"]):
                    print(f"  rwkv-tune {r['kernel']} {r['pass']}: {r['median_ms']:.3f} ms = {r['median_ms'] / ft[key]['median_ms']:.2f}x fla")
    elif ft:
        print(f"anchor: fla timing ERROR {ft['error'][:200]}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("inputs")
    pi.add_argument("--shape", default="8,4096,64,64")
    pi.add_argument("--seed", type=int, default=2)
    pi.add_argument("--out", required=True)
    pi.add_argument("--pure-python", action="store_true")
    pa = sub.add_parser("anchor")
    pa.add_argument("--bin", default="target/release/rwkv-tune")
    pa.add_argument("--backend", default="cuda", choices=["cuda", "emu", "cpu"])
    pa.add_argument("--inputs", help="safetensors from `inputs` (fla is timed on it)")
    pa.add_argument("--bench-json", help="rwkv-tune bench JSON on the same inputs (for the ratio lines)")
    pa.add_argument("--check-shape", default="1,64,2,64")
    pa.add_argument("--autotune-configs", type=int, default=2)
    pa.add_argument("--warmup", type=int, default=3)
    pa.add_argument("--reps", type=int, default=10)
    pa.add_argument("--out", required=True)
    pr = sub.add_parser("report")
    pr.add_argument("--json", required=True)
    pr.add_argument("--bench-json")
    a = ap.parse_args()
    return {"inputs": cmd_inputs, "anchor": cmd_anchor, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main() or 0)
