//! The operations on the CPU emulator: `kernels/model_ops.cu` compiled for
//! the CPU (see `crate::emu`), on host `Vec<f32>` buffers. GEMMs run in Rust
//! ([`super::reference::matmul`], or with [`GemmPrecision::Bf16`] the
//! emulated `ops_f32_to_bf16` rounding of the activations and
//! [`super::reference::matmul_bf16`]); the WKV recurrence runs the emulated
//! `kernels/wkv7_v1.cu`.
use super::{
    host_buffer_ops, host_matmul, host_matmul_w, host_wkv, need, Act, BonusBufs, DeviceOps,
    GemmPrecision, Geom, HostMat,
};
use crate::emu::{launch_ops, EmuParams};
use crate::error::{Error, Result};
use crate::params::{
    ActParams, AddParams, EmbedParams, F32ToBf16Params, GroupNormParams, KkPrepParams,
    LayerNormParams, TokenShiftParams, ValueResidualParams,
};

/// The emulated backend. `geom` picks the launch geometry (default
/// [`Geom::EMU`]: one small block; [`Geom::GPU`] runs the GPU geometry);
/// `gemm` the precision of the weight GEMMs (default f32).
#[derive(Clone, Debug)]
pub struct EmuOps {
    /// Launch geometry of the emulated kernels.
    pub geom: Geom,
    /// Precision [`DeviceOps::upload_mat`] stores matrices in
    /// ([`DeviceOps::matmul_w`] follows the matrix it is given).
    pub gemm: GemmPrecision,
    /// WKV kernel version of [`DeviceOps::wkv`] and the WKV backward
    /// (default v1; v2 runs where `wkv7::v2::supports` the inputs, v1
    /// otherwise).
    pub wkv: crate::wkv7::Version,
    counters: std::sync::Arc<super::counters::Counters>,
}

impl Default for EmuOps {
    fn default() -> Self {
        EmuOps {
            geom: Geom::EMU,
            gemm: GemmPrecision::F32,
            wkv: crate::wkv7::Version::V1,
            counters: Default::default(),
        }
    }
}

impl EmuOps {
    /// With an explicit launch geometry (f32 GEMMs).
    pub fn with_geom(geom: Geom) -> Self {
        EmuOps {
            geom,
            ..EmuOps::default()
        }
    }

    /// The same backend with WKV kernel version `wkv`.
    pub fn with_wkv(self, wkv: crate::wkv7::Version) -> Self {
        EmuOps { wkv, ..self }
    }

    /// The same backend with weight GEMMs in precision `gemm`.
    pub fn with_gemm(self, gemm: GemmPrecision) -> Self {
        EmuOps { gemm, ..self }
    }

    /// The emulated `ops_f32_to_bf16`: rows `x[r·ld .. r·ld + cols]` for
    /// `r < rows`, rounded to bf16 (nearest even) into a dense `[rows, cols]`.
    pub fn f32_to_bf16(
        &self,
        x: &[f32],
        ld: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<half::bf16>> {
        if ld < cols {
            return Err(Error::Invalid(format!(
                "f32_to_bf16: ld {ld} < cols {cols}"
            )));
        }
        super::fits_i32("f32_to_bf16", &[rows, ld])?;
        if rows == 0 || cols == 0 {
            return Ok(Vec::new());
        }
        need("x", x.len(), 0, (rows - 1) * ld + cols)?;
        let mut y = vec![half::bf16::ZERO; rows * cols];
        let p = F32ToBf16Params {
            rows: rows as i32,
            cols: cols as i32,
            ld: ld as i32,
            x: ptr(x),
            y: y.as_mut_ptr() as u64,
        };
        // SAFETY: x holds (rows−1)·ld + cols floats (checked), y rows·cols
        // bf16 (allocated above, not aliased); both alive for the call.
        unsafe { run("ops_f32_to_bf16", self.geom.elems(rows * cols), &p)? };
        Ok(y)
    }
}

fn ptr(s: &[f32]) -> u64 {
    s.as_ptr() as u64
}
fn ptr_mut(s: &mut [f32]) -> u64 {
    s.as_mut_ptr() as u64
}
fn opt(s: Option<&Vec<f32>>) -> u64 {
    s.map_or(0, |v| ptr(v))
}

type Dims3 = (u32, u32, u32);

/// # Safety
/// The pointers in `p` must satisfy what `kernels/params.h` documents for
/// `P` at its sizes (the provided [`DeviceOps`] methods check every length
/// before calling the hooks that launch).
unsafe fn run<P: EmuParams>(name: &str, g: (Dims3, Dims3), p: &P) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { launch_ops(name, g.0, g.1, p) }
}

impl DeviceOps for EmuOps {
    type Buf = Vec<f32>;

    fn name(&self) -> &'static str {
        "emu"
    }
    host_buffer_ops!();

    unsafe fn raw_embed(
        &self,
        t: usize,
        ids: &Vec<f32>,
        table: &Vec<f32>,
        c: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let p = EmbedParams {
            T: t as i32,
            C: c as i32,
            tokens: ptr(ids),
            table: ptr(table),
            out: ptr_mut(out),
        };
        // SAFETY: ids holds T in-range int32 ids (f32 bits), table V·C
        // floats, out ≥ T·C floats (checked by the caller); all alive for the
        // synchronous call.
        unsafe { run("ops_embed_f32", self.geom.elems(t * c), &p) }
    }

    unsafe fn raw_matmul(
        &self,
        x: &Vec<f32>,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &Vec<f32>,
        n: usize,
        k: usize,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        host_matmul(x, x_off, ldx, m, w, n, k, y)
    }

    type Mat = HostMat;
    fn gemm_precision(&self) -> GemmPrecision {
        self.gemm
    }
    fn upload_mat(&self, h: &[f32]) -> Result<HostMat> {
        Ok(HostMat::new(h, self.gemm))
    }
    fn mat_len(&self, w: &HostMat) -> usize {
        w.len()
    }
    unsafe fn raw_matmul_w(
        &self,
        x: &Vec<f32>,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &HostMat,
        n: usize,
        k: usize,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        host_matmul_w(x, x_off, ldx, m, w, n, k, y, |xs, ld, rows, cols| {
            self.f32_to_bf16(xs, ld, rows, cols)
        })
    }

    unsafe fn raw_layer_norm(
        &self,
        x: &Vec<f32>,
        x_off: usize,
        rows: usize,
        c: usize,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        eps: f32,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let p = LayerNormParams {
            rows: rows as i32,
            C: c as i32,
            eps,
            x: ptr(&x[x_off..]),
            weight: ptr(weight),
            bias: ptr(bias),
            y: ptr_mut(y),
        };
        // SAFETY: lengths checked by the caller (x from x_off, weight/bias ≥ C,
        // y ≥ rows·C).
        unsafe { run("ops_layer_norm_f32", self.geom.rows(rows), &p) }
    }

    unsafe fn raw_group_norm(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &mut Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        bonus: Option<BonusBufs<'_, Vec<f32>>>,
        g: Option<&Vec<f32>>,
    ) -> Result<()> {
        let xp = ptr_mut(x);
        let p = GroupNormParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            eps,
            x: xp,
            weight: ptr(weight),
            bias: ptr(bias),
            r: opt(bonus.as_ref().map(|b| b.r)),
            k: opt(bonus.as_ref().map(|b| b.k)),
            v: opt(bonus.as_ref().map(|b| b.v)),
            r_k: opt(bonus.as_ref().map(|b| b.r_k)),
            g: opt(g),
            y: xp,
        };
        // SAFETY: the caller checked every tensor to hold rows·H·N (or H·N)
        // floats; y = x is allowed (each lane rewrites only what it read).
        unsafe { run("ops_group_norm_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_kk_prep(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &Vec<f32>,
        da: &Vec<f32>,
        a0: &Vec<f32>,
        k_k: &Vec<f32>,
        k_a: &Vec<f32>,
        k_out: &mut Vec<f32>,
        a: &mut Vec<f32>,
        b: &mut Vec<f32>,
    ) -> Result<()> {
        let p = KkPrepParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            k: ptr(k),
            da: ptr(da),
            a0: ptr(a0),
            k_k: ptr(k_k),
            k_a: ptr(k_a),
            k_out: ptr_mut(k_out),
            a: ptr_mut(a),
            b: ptr_mut(b),
        };
        // SAFETY: lengths checked by the caller; the three outputs are
        // distinct &mut borrows, so they do not alias each other or the inputs.
        unsafe { run("ops_kk_prep_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_token_shift(
        &self,
        b: usize,
        t: usize,
        c: usize,
        x: &Vec<f32>,
        state: &mut Vec<f32>,
        mu: &Vec<f32>,
        n_mix: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let p = TokenShiftParams {
            B: b as i32,
            T: t as i32,
            C: c as i32,
            n_mix: n_mix as i32,
            x: ptr(x),
            state: ptr_mut(state),
            mu: ptr(mu),
            out: ptr_mut(out),
        };
        // SAFETY: lengths checked by the caller; state and out are distinct
        // &mut borrows.
        unsafe { run("ops_token_shift_f32", self.geom.elems(b * c), &p) }
    }

    unsafe fn raw_act(
        &self,
        mode: Act,
        x: &mut Vec<f32>,
        c: usize,
        bias: Option<&Vec<f32>>,
    ) -> Result<()> {
        let p = ActParams {
            n: x.len() as i32,
            C: c as i32,
            mode: mode.code(),
            x: ptr_mut(x),
            bias: opt(bias),
        };
        // SAFETY: x holds n floats, bias (if any) ≥ C floats (checked by the
        // caller).
        unsafe { run("ops_act_f32", self.geom.elems(x.len()), &p) }
    }

    unsafe fn raw_value_residual(
        &self,
        c: usize,
        v: &mut Vec<f32>,
        v_first: &Vec<f32>,
        v0: &Vec<f32>,
        dv: &Vec<f32>,
    ) -> Result<()> {
        let p = ValueResidualParams {
            rows: (v.len() / c) as i32,
            C: c as i32,
            v: ptr_mut(v),
            v_first: ptr(v_first),
            v0: ptr(v0),
            dv: ptr(dv),
        };
        // SAFETY: lengths checked by the caller.
        unsafe { run("ops_value_residual_f32", self.geom.elems(v.len()), &p) }
    }

    unsafe fn raw_add(&self, n: usize, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        super::fits_i32("add", &[n])?;
        let p = AddParams {
            n: n as i32,
            x: ptr_mut(x),
            y: ptr(y),
        };
        // SAFETY: x and y hold at least n floats (checked by the caller),
        // n fits i32 (checked above).
        unsafe { run("ops_add_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_wkv(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Vec<f32>; 6],
        state: &mut Vec<f32>,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        host_wkv(
            &crate::wkv7::Backend::Emu,
            self.wkv,
            t,
            h,
            n,
            rwkvab,
            state,
            y,
        )
    }
}
