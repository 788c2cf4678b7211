//! [`BackwardOps`] on the CPU emulator: `kernels/tune_ops.cu` compiled for
//! the CPU (see `crate::emu`), on host `Vec<f32>` buffers. The GEMM
//! [`BackwardOps::matmul_t`] runs in Rust ([`bref::matmul_t`], as
//! [`super::DeviceOps::matmul`] does on this backend) and the WKV backward runs the
//! emulated `kernels/wkv7_v1.cu`.
use super::backward::{
    host_wkv_bwd, BackwardOps, GnBwdBufs, GnBwdGrads, KkBwdBufs, SdtBwdBufs, UpBufs,
};
use super::backward_ref::{self as bref, AdamStep};
use super::emu::EmuOps;
use super::{Act, DeviceOps, Geom};
use crate::emu::{launch_ops, EmuParams};
use crate::error::Result;
use crate::params::{
    ActBwdParams, AdamParams, BatchedMatmulParams, GroupNormBwdParams, KkPrepBwdParams,
    LayerNormBwdParams, OuterAccParams, SoftmaxParams, SumBatchParams, SumsqParams,
    TokenShiftBwdParams, UpBwdParams, UpFwdParams, ValueResidualBwdParams, XentParams,
};
use crate::params::{DbpStepParams, EyeAxpyParams, LoraInParams, ReduceParams};
use crate::params::{MaskMulParams, SdtBwdParams};

type Dims3 = (u32, u32, u32);

/// Grid and block of the block-reduction kernels of `kernels/tune_ops.cu`
/// (`tune_xent_f32`: one block per row; `tune_sumsq_f32`: one partial per
/// block) for `blocks` blocks' worth of work: blocks of `geom.elem_block`
/// threads rounded down to a multiple of 32 within [32, 256] (the kernels'
/// block reductions and launch bounds need that), at most `geom.max_blocks`.
pub(super) fn block_geom(geom: &Geom, blocks: usize) -> (Dims3, Dims3) {
    let b = geom.elem_block.clamp(32, 256) / 32 * 32;
    let g = blocks.clamp(1, geom.max_blocks.max(1) as usize) as u32;
    ((g, 1, 1), (b, 1, 1))
}

/// Blocks of [`block_geom`] for a reduction over `n` elements.
pub(super) fn sumsq_blocks(geom: &Geom, n: usize) -> usize {
    let b = geom.elem_block.clamp(32, 256) / 32 * 32;
    n.div_ceil(b as usize)
}

fn ptr(s: &[f32]) -> u64 {
    s.as_ptr() as u64
}
fn ptr_mut(s: &mut [f32]) -> u64 {
    s.as_mut_ptr() as u64
}

/// # Safety
/// The pointers in `p` must satisfy what `kernels/params.h` documents for
/// `P` at its sizes (the provided [`BackwardOps`] methods check every
/// length before calling the hooks that launch).
unsafe fn run<P: EmuParams>(name: &str, g: (Dims3, Dims3), p: &P) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { launch_ops(name, g.0, g.1, p) }
}

impl BackwardOps for EmuOps {
    unsafe fn raw_matmul_t(
        &self,
        dy: &Vec<f32>,
        m: usize,
        w: &Vec<f32>,
        n: usize,
        k: usize,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        bref::matmul_t(dy, m, w, n, k, dx);
        Ok(())
    }

    unsafe fn raw_matmul_tn(
        &self,
        dy: &Vec<f32>,
        m: usize,
        n: usize,
        x: &Vec<f32>,
        x_off: usize,
        ldx: usize,
        k: usize,
        dw: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        // a GEMM: the Rust twin, as for matmul_t
        bref::matmul_tn(dy, m, n, &x[x_off..], ldx, k, dw, accumulate);
        Ok(())
    }

    unsafe fn raw_layer_norm_bwd(
        &self,
        x: &Vec<f32>,
        off: usize,
        rows: usize,
        c: usize,
        weight: &Vec<f32>,
        eps: f32,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        let p = LayerNormBwdParams {
            rows: rows as i32,
            C: c as i32,
            eps,
            x: ptr(&x[off..]),
            weight: ptr(weight),
            dy: ptr(dy),
            dx: ptr_mut(&mut dx[off..]),
        };
        // SAFETY: sizes checked by the caller: x and dx hold rows·C floats from
        // `off`, weight ≥ C, dy ≥ rows·C; dx is a distinct &mut borrow; all alive
        // for the synchronous call.
        unsafe { run("tune_layer_norm_bwd_f32", self.geom.rows(rows), &p) }
    }

    unsafe fn raw_token_shift_bwd(
        &self,
        b: usize,
        t: usize,
        c: usize,
        dmix: &[&Vec<f32>],
        mu: &Vec<f32>,
        dstate: &mut Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        let mut d = [0u64; 6];
        for (slot, b) in d.iter_mut().zip(dmix) {
            *slot = ptr(b);
        }
        let p = TokenShiftBwdParams {
            B: b as i32,
            T: t as i32,
            C: c as i32,
            n_mix: dmix.len() as i32,
            d0: d[0],
            d1: d[1],
            d2: d[2],
            d3: d[3],
            d4: d[4],
            d5: d[5],
            mu: ptr(mu),
            dstate: ptr_mut(dstate),
            dx: ptr_mut(dx),
        };
        // SAFETY: sizes checked by the caller: 1 ≤ n_mix ≤ 6 mixes of ≥ B·T·C
        // floats (the kernel reads only d0..d{n_mix−1}), mu ≥ n_mix·C, dstate ≥
        // B·C, dx ≥ B·T·C; dstate and dx are distinct &mut borrows.
        unsafe { run("tune_token_shift_bwd_f32", self.geom.elems(b * c), &p) }
    }

    unsafe fn raw_sum_batch(
        &self,
        b: usize,
        n: usize,
        src: &Vec<f32>,
        dst: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        let p = SumBatchParams {
            B: b as i32,
            n: n as i32,
            accumulate: accumulate as i32,
            src: ptr(src),
            dst: ptr_mut(dst),
        };
        // SAFETY: src ≥ B·n and dst ≥ n floats (checked by the caller); dst is
        // a distinct &mut borrow.
        unsafe { run("tune_sum_batch_f32", self.geom.elems(n), &p) }
    }

    fn wkv_ws_len(&self, b: usize, t: usize, h: usize, n: usize) -> (usize, usize) {
        super::backward::kernel_wkv_ws_len(b, t, h, n)
    }

    unsafe fn raw_wkv_fwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Vec<f32>; 6],
        h0: &Vec<f32>,
        y: &mut Vec<f32>,
        ckpt: &mut Vec<f32>,
        h_t: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let d = crate::wkv7::Dims { b, t, h, n };
        let sl = d.seq_len();
        let [r, w, k, v, a, bb] = rwkvab.map(|x| &x[..sl]);
        let x = crate::wkv7::Inputs {
            r,
            w,
            k,
            v,
            a,
            b: bb,
            h0: Some(&h0[..d.state_len()]),
        };
        crate::wkv7::emu::forward_ckpt(self.wkv, &d, &x, y, ckpt, h_t.map(|v| v.as_mut_slice()))
    }

    unsafe fn raw_wkv_bwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Vec<f32>; 6],
        h0: &Vec<f32>,
        ckpt: &Vec<f32>,
        dy: &Vec<f32>,
        grads: [&mut Vec<f32>; 6],
        dh0: &mut Vec<f32>,
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        let d = crate::wkv7::Dims { b, t, h, n };
        let sl = d.seq_len();
        let [r, w, k, v, a, bb] = rwkvab.map(|x| &x[..sl]);
        let x = crate::wkv7::Inputs {
            r,
            w,
            k,
            v,
            a,
            b: bb,
            h0: Some(&h0[..d.state_len()]),
        };
        let [g0, g1, g2, g3, g4, g5] = grads;
        crate::wkv7::emu::backward_ckpt(
            self.wkv,
            &d,
            &x,
            ckpt,
            dy,
            [g0, g1, g2, g3, g4, g5].map(|g| g.as_mut_slice()),
            dh0,
            scratch,
        )
    }

    unsafe fn raw_act_bwd(
        &self,
        mode: Act,
        n: usize,
        c: usize,
        pre: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        dy: &mut Vec<f32>,
    ) -> Result<()> {
        let p = ActBwdParams {
            n: n as i32,
            C: c as i32,
            mode: mode.code(),
            pre: ptr(pre),
            bias: bias.map_or(0, |b| ptr(b)),
            dy: ptr_mut(dy),
        };
        // SAFETY: sizes checked by the caller: pre and dy ≥ n floats, bias (if
        // any) ≥ C.
        unsafe { run("tune_act_bwd_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_kk_prep_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &KkBwdBufs<'_, Vec<f32>>,
        dk: &mut Vec<f32>,
        dda: &mut Vec<f32>,
    ) -> Result<()> {
        let p = KkPrepBwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            k: ptr(x.k),
            da: ptr(x.da),
            a0: ptr(x.a0),
            k_k: ptr(x.k_k),
            k_a: ptr(x.k_a),
            d_kout: ptr(x.d_kout),
            d_a: ptr(x.d_a),
            d_b: ptr(x.d_b),
            dk: ptr_mut(dk),
            dda: ptr_mut(dda),
        };
        // SAFETY: sizes checked by the caller ([rows, C] tensors ≥ rows·H·N
        // floats, [C] vectors ≥ H·N); the two outputs are distinct &mut borrows.
        unsafe { run("tune_kk_prep_bwd_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_value_residual_bwd(
        &self,
        n: usize,
        c: usize,
        vraw: &Vec<f32>,
        v_first: &Vec<f32>,
        v0: &Vec<f32>,
        dvp: &Vec<f32>,
        dv: &mut Vec<f32>,
        dvf: &mut Vec<f32>,
        ddv: &mut Vec<f32>,
    ) -> Result<()> {
        let p = ValueResidualBwdParams {
            n: n as i32,
            C: c as i32,
            vraw: ptr(vraw),
            v_first: ptr(v_first),
            v0: ptr(v0),
            dvp: ptr(dvp),
            dv: ptr_mut(dv),
            dvf: ptr_mut(dvf),
            ddv: ptr_mut(ddv),
        };
        // SAFETY: sizes checked by the caller (every [n] buffer ≥ n floats, v0 ≥
        // C); the three outputs are distinct &mut borrows.
        unsafe { run("tune_value_residual_bwd_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_group_norm_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &GnBwdBufs<'_, Vec<f32>>,
        g: GnBwdGrads<'_, Vec<f32>>,
    ) -> Result<()> {
        let p = GroupNormBwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            eps,
            y: ptr(x.y),
            weight: ptr(x.weight),
            bias: ptr(x.bias),
            r: ptr(x.r),
            k: ptr(x.k),
            v: ptr(x.v),
            r_k: ptr(x.r_k),
            g: ptr(x.g),
            dout: ptr(x.dout),
            dy: ptr_mut(g.dy),
            dr: ptr_mut(g.dr),
            dk: ptr_mut(g.dk),
            dv: ptr_mut(g.dv),
            dg: ptr_mut(g.dg),
        };
        // SAFETY: sizes checked by the caller ([rows, C] tensors ≥ rows·H·N
        // floats, [C] vectors ≥ H·N); the five outputs are distinct &mut borrows.
        unsafe { run("tune_group_norm_bwd_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_wkv_bwd(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Vec<f32>; 6],
        h0: &Vec<f32>,
        dy: &Vec<f32>,
        grads: [&mut Vec<f32>; 6],
        dh0: &mut Vec<f32>,
    ) -> Result<()> {
        host_wkv_bwd(
            &crate::wkv7::Backend::Emu,
            self.wkv,
            t,
            h,
            n,
            rwkvab,
            h0,
            dy,
            grads,
            dh0,
        )
    }

    unsafe fn raw_xent(
        &self,
        r0: usize,
        rows: usize,
        v: usize,
        logits: &mut Vec<f32>,
        targets: &Vec<f32>,
        mask: &Vec<f32>,
        soft: Option<&Vec<f32>>,
        lam: f32,
        loss: &mut Vec<f32>,
    ) -> Result<()> {
        // every target < V ≤ i32::MAX (the Ids bound, checked by the caller)
        let p = XentParams {
            rows: rows as i32,
            V: v as i32,
            lam,
            logits: ptr_mut(logits),
            targets: ptr(&targets[r0..]),
            mask: ptr(&mask[r0..]),
            soft: soft.map_or(0, |s| ptr(s)),
            loss: ptr_mut(loss),
        };
        // SAFETY: sizes checked by the caller: logits (and soft, if any) ≥ rows·V
        // floats, targets from r0 hold rows in-range int32 ids (f32 bits), mask
        // from r0 ≥ rows, loss ≥ rows; logits and loss are distinct &mut
        // borrows; all alive for the call.
        unsafe { run("tune_xent_f32", block_geom(&self.geom, rows), &p) }
    }

    unsafe fn raw_softmax(
        &self,
        rows: usize,
        v: usize,
        inv_temp: f32,
        x: &mut Vec<f32>,
    ) -> Result<()> {
        let p = SoftmaxParams {
            rows: rows as i32,
            V: v as i32,
            inv_temp,
            x: ptr_mut(x),
        };
        // SAFETY: x ≥ rows·V floats (checked by the caller), a distinct &mut
        // borrow alive for the call.
        unsafe { run("tune_softmax_f32", block_geom(&self.geom, rows), &p) }
    }

    unsafe fn raw_outer_acc(
        &self,
        off: usize,
        rows: usize,
        h: usize,
        n: usize,
        r: &Vec<f32>,
        acc: &mut Vec<f32>,
    ) -> Result<()> {
        let p = OuterAccParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            r: ptr(&r[off..]),
            acc: ptr_mut(acc),
        };
        // SAFETY: sizes checked by the caller: r ≥ rows·H·N floats, acc ≥ H·N·N (a
        // distinct &mut borrow).
        unsafe { run("tune_outer_acc_f32", self.geom.elems(h * n * n), &p) }
    }

    unsafe fn raw_up_fwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Vec<f32>>,
        r: &Vec<f32>,
        phi: &mut Vec<f32>,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let p = UpFwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            M: k.m as i32,
            r: ptr(r),
            centres: ptr(k.centres),
            gamma: ptr(k.gamma),
            u: ptr(k.u),
            phi: ptr_mut(phi),
            y: ptr_mut(y),
            linear: k.linear as i32,
        };
        // SAFETY: sizes checked by the caller: r, y ≥ rows·H·N floats, centres ≥
        // H·M·N, gamma ≥ H, u ≥ H·N·M, phi ≥ rows·H·M; phi and y are distinct &mut
        // borrows (so they alias nothing); all alive for the call.
        unsafe { run("tune_up_fwd_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_up_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Vec<f32>>,
        r: &Vec<f32>,
        phi: &Vec<f32>,
        dy: &Vec<f32>,
        du: &mut Vec<f32>,
        dr: &mut Vec<f32>,
    ) -> Result<()> {
        let p = UpBwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            M: k.m as i32,
            r: ptr(r),
            centres: ptr(k.centres),
            gamma: ptr(k.gamma),
            u: ptr(k.u),
            phi: ptr(phi),
            dy: ptr(dy),
            du: ptr_mut(du),
            dr: ptr_mut(dr),
            linear: k.linear as i32,
        };
        // SAFETY: sizes checked by the caller: r, dy, dr ≥ rows·H·N floats, phi ≥
        // rows·H·M, centres ≥ H·M·N, gamma ≥ H, u and du ≥ H·N·M; du and dr are
        // distinct &mut borrows; all alive for the two calls.
        unsafe {
            run("tune_up_bwd_du_f32", self.geom.elems(h * n * k.m), &p)?;
            run("tune_up_bwd_dr_f32", self.geom.rows(rows * h), &p)
        }
    }

    unsafe fn raw_batched_matmul(
        &self,
        groups: usize,
        n: usize,
        a: &Vec<f32>,
        b: &Vec<f32>,
        trans_b: bool,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let p = BatchedMatmulParams {
            groups: groups as i32,
            N: n as i32,
            trans_b: trans_b as i32,
            a: ptr(a),
            b: ptr(b),
            out: ptr_mut(out),
        };
        // SAFETY: sizes checked by the caller: a, b, out ≥ groups·N·N floats; out
        // is a &mut borrow, so it aliases neither a nor b.
        unsafe {
            run(
                "tune_batched_matmul_f32",
                self.geom.elems(groups * n * n),
                &p,
            )
        }
    }

    unsafe fn raw_adam(
        &self,
        n: usize,
        s: &AdamStep,
        clip: f32,
        stats: Option<&Vec<f32>>,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        let q = AdamParams {
            n: n as i32,
            lr: s.lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
            bc1: s.bc1,
            bc2: s.bc2,
            grad_scale: s.grad_scale,
            clip,
            stats: stats.map_or(0, |x| ptr(x)),
            p: ptr_mut(p),
            g: ptr(g),
            m: ptr_mut(m),
            v: ptr_mut(v),
        };
        // SAFETY: sizes checked by the caller: p, g, m, v ≥ n floats; p, m, v are
        // distinct &mut borrows.
        unsafe { run("tune_adam_f32", self.geom.elems(n), &q) }
    }

    unsafe fn raw_dbp_step(
        &self,
        groups: usize,
        n: usize,
        scale: f32,
        eta: f32,
        kappa: f32,
        max_norm: f32,
        z: &Vec<f32>,
        m: &mut Vec<f32>,
    ) -> Result<()> {
        let p = DbpStepParams {
            groups: groups as i32,
            N: n as i32,
            scale,
            eta,
            kappa,
            max_norm,
            z: ptr(z),
            m: ptr_mut(m),
        };
        // SAFETY: z, m ≥ groups·N·N floats, N ≤ 1024 (checked by the caller);
        // m is a distinct &mut borrow.
        unsafe { run("tune_dbp_step_f32", block_geom(&self.geom, groups), &p) }
    }

    unsafe fn raw_eye_axpy(
        &self,
        groups: usize,
        n: usize,
        alpha: f32,
        beta: f32,
        x: Option<&Vec<f32>>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let op = ptr_mut(out);
        let p = EyeAxpyParams {
            groups: groups as i32,
            N: n as i32,
            alpha,
            beta,
            x: x.map_or(op, |x| ptr(x)),
            out: op,
        };
        // SAFETY: x (or out itself, element-wise in place) and out hold
        // groups·N·N floats (checked by the caller).
        unsafe { run("tune_eye_axpy_f32", self.geom.elems(groups * n * n), &p) }
    }

    unsafe fn raw_sdt_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &SdtBwdBufs<'_, Vec<f32>>,
        dkk: &mut Vec<f32>,
        dka: &mut Vec<f32>,
        drk: &mut Vec<f32>,
    ) -> Result<()> {
        let p = SdtBwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            k: ptr(x.kk.k),
            da: ptr(x.kk.da),
            a0: ptr(x.kk.a0),
            k_k: ptr(x.kk.k_k),
            d_kout: ptr(x.kk.d_kout),
            d_a: ptr(x.kk.d_a),
            d_b: ptr(x.kk.d_b),
            r: ptr(x.r),
            kt: ptr(x.kt),
            v: ptr(x.v),
            g: ptr(x.g),
            dout: ptr(x.dout),
            dkk: ptr_mut(dkk),
            dka: ptr_mut(dka),
            drk: ptr_mut(drk),
        };
        // SAFETY: sizes checked by the caller ([rows, C] tensors ≥ rows·H·N
        // floats, [C] vectors ≥ H·N); the outputs are distinct &mut borrows.
        unsafe { run("tune_sdt_bwd_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_mask_mul(&self, n: usize, m: &Vec<f32>, x: &mut Vec<f32>) -> Result<()> {
        let p = MaskMulParams {
            n: n as i32,
            m: ptr(m),
            x: ptr_mut(x),
        };
        // SAFETY: m and x hold ≥ n floats (checked by the caller); x is a
        // distinct &mut borrow.
        unsafe { run("tune_mask_mul_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_lora_in(
        &self,
        rows: usize,
        k: usize,
        x: &Vec<f32>,
        x_off: usize,
        ldx: usize,
        seqs: (usize, usize),
        seed: u32,
        keep: f32,
        scale: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let p = LoraInParams {
            rows: rows as i32,
            K: k as i32,
            ldx: ldx as i32,
            T: seqs.0 as i32,
            seq0: seqs.1 as i32,
            seed: seed as i32,
            keep,
            scale,
            x: ptr(x) + 4 * x_off as u64,
            out: ptr_mut(out),
        };
        // SAFETY: x from x_off holds (rows−1)·ldx + k floats and out rows·k
        // (checked by the caller); out is a distinct &mut borrow.
        unsafe { run("tune_lora_in_f32", self.geom.elems(rows * k), &p) }
    }

    unsafe fn raw_reduce_acc(
        &self,
        squares: bool,
        n: usize,
        x: &Vec<f32>,
        out: &mut Vec<f32>,
        slot: usize,
    ) -> Result<()> {
        let p = ReduceParams {
            n: n as i32,
            mode: squares as i32,
            slot: slot as i32,
            x: ptr(x),
            out: ptr_mut(out),
        };
        // SAFETY: x ≥ n and out ≥ slot + 1 floats (checked by the caller);
        // one block as the kernel requires; out is a distinct &mut borrow.
        unsafe { run("tune_reduce_f32", block_geom(&self.geom, 1), &p) }
    }

    unsafe fn raw_sumsq(&self, n: usize, x: &Vec<f32>) -> Result<f64> {
        super::fits_i32("sumsq", &[n])?;
        let g = block_geom(&self.geom, sumsq_blocks(&self.geom, n));
        let mut partial = vec![0f32; g.0 .0 as usize];
        let p = SumsqParams {
            n: n as i32,
            x: ptr(x),
            partial: ptr_mut(&mut partial),
        };
        // SAFETY: x ≥ n floats (checked by the caller), partial holds one float
        // per block of the grid launched (allocated above from the same geometry).
        unsafe { run("tune_sumsq_f32", g, &p)? };
        // as on a GPU: a partials buffer, then its download
        self.counters().alloc(4 * partial.len());
        self.counters().download(4 * partial.len());
        Ok(partial.iter().map(|&v| v as f64).sum())
    }
}
