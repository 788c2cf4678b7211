//! The operations on an NVIDIA GPU: `kernels/model_ops.cu` launched through
//! cudarc on the [`Gpu`]'s stream, GEMMs through cuBLAS (f32 `sgemm`, or for
//! [`GemmPrecision::Bf16`] weights `cublasGemmEx` with bf16 A/B, f32 C and
//! `CUBLAS_COMPUTE_32F`), the WKV recurrence through
//! [`crate::wkv7::cuda::forward_dev`].
use std::sync::Arc;

use super::{need, Act, BonusBufs, DeviceOps, GemmPrecision, Geom};
use crate::cuda::{cuda_err, Gpu};
use crate::error::{Error, Result};
use crate::params::{
    ActParams, AddParams, EmbedParams, F32ToBf16Params, GroupNormParams, KkPrepParams,
    LayerNormParams, TokenShiftParams, ValueResidualParams,
};
use cudarc::cublas::{
    result::gemm_ex,
    sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t},
    CudaBlas, Gemm, GemmConfig,
};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

// SAFETY (all nine): #[repr(C)] plain-old-data structs generated from
// kernels/params.h (i32, f32 and u64 fields only), matching the C structs the
// kernels take by value; any bit pattern is valid.
unsafe impl DeviceRepr for LayerNormParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for GroupNormParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for KkPrepParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for TokenShiftParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for ActParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for ValueResidualParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AddParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for EmbedParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for F32ToBf16Params {}

fn addr<G>(o: &Option<(u64, G)>) -> u64 {
    o.as_ref().map_or(0, |(q, _)| *q)
}

/// A weight matrix on the GPU ([`DeviceOps::Mat`] of [`CudaOps`]).
pub enum DevMat {
    /// 32-bit float.
    F32(CudaSlice<f32>),
    /// bf16 elements (for cuBLAS `GemmEx`).
    Bf16(CudaSlice<bf16>),
}

impl DevMat {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            DevMat::F32(v) => v.len(),
            DevMat::Bf16(v) => v.len(),
        }
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The GPU backend of [`DeviceOps`].
pub struct CudaOps {
    gpu: Arc<Gpu>,
    blas: CudaBlas,
    /// Launch geometry of the `model_ops` kernels (default [`Geom::GPU`]).
    pub geom: Geom,
    /// Precision [`DeviceOps::upload_mat`] stores matrices in (default f32;
    /// [`DeviceOps::matmul_w`] follows the matrix it is given).
    pub gemm: GemmPrecision,
    /// WKV kernel version of [`DeviceOps::wkv`] and the WKV backward
    /// (default v1). With v2 the head size must be 32 or 64 (other sizes
    /// run v1) and every decay ≥ 0.5, which the x070 decays the model
    /// computes always are (`w = exp(−e^{−1/2}·σ(·)) > 0.545`); the GPU
    /// path does not check the decays.
    pub wkv: crate::wkv7::Version,
    counters: Arc<super::counters::Counters>,
}

impl CudaOps {
    /// The same backend with WKV kernel version `wkv`.
    pub fn with_wkv(mut self, wkv: crate::wkv7::Version) -> Self {
        self.wkv = wkv;
        self
    }

    /// The version that runs for head size `n` (v2 only for N = 32, 64). The
    /// model ops run the WKV with f32 I/O, so v3 (bf16 I/O only) runs as v2
    /// here, as [`crate::wkv7::Version::effective`] does for f32 host data.
    pub(crate) fn wkv_version(&self, n: usize) -> crate::wkv7::Version {
        use crate::wkv7::Version;
        match (self.wkv, n) {
            (Version::V2 | Version::V3 | Version::V3Exact, 32 | 64) => Version::V2,
            _ => Version::V1,
        }
    }

    /// Opens cuBLAS on the GPU's stream. Errors (never panics) when the
    /// cuBLAS library is missing.
    pub fn new(gpu: Arc<Gpu>) -> Result<Self> {
        // SAFETY: only tries to dlopen libcublas under its known names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::CudaUnavailable(
                "the cuBLAS library (libcublas.so) was not found".into(),
            ));
        }
        let blas = CudaBlas::new(gpu.stream.clone()).map_err(cuda_err)?;
        Ok(CudaOps {
            gpu,
            blas,
            geom: Geom::GPU,
            gemm: GemmPrecision::F32,
            wkv: crate::wkv7::Version::V1,
            counters: Default::default(),
        })
    }

    /// The same backend with weight GEMMs in precision `gemm`.
    pub fn with_gemm(mut self, gemm: GemmPrecision) -> Self {
        self.gemm = gemm;
        self
    }

    /// `ops_f32_to_bf16` on the GPU: rows `x[x_off + r·ld ..][..cols]`,
    /// `r < rows`, rounded to bf16 into a new dense `[rows, cols]` buffer.
    pub fn f32_to_bf16(
        &self,
        x: &CudaSlice<f32>,
        x_off: usize,
        ld: usize,
        rows: usize,
        cols: usize,
    ) -> Result<CudaSlice<bf16>> {
        if ld < cols {
            return Err(Error::Invalid(format!(
                "f32_to_bf16: ld {ld} < cols {cols}"
            )));
        }
        super::fits_i32("f32_to_bf16", &[rows, ld])?;
        if rows > 0 && cols > 0 {
            need("x", x.len(), x_off, (rows - 1) * ld + cols)?;
        }
        let st = &self.gpu.stream;
        let mut y = st
            .alloc_zeros::<bf16>((rows * cols).max(1))
            .map_err(cuda_err)?;
        if rows == 0 || cols == 0 {
            return Ok(y);
        }
        {
            let (xp, _g1) = x.device_ptr(st);
            let (yp, _g2) = y.device_ptr_mut(st);
            let p = F32ToBf16Params {
                rows: rows as i32,
                cols: cols as i32,
                ld: ld as i32,
                x: xp + x_off as u64 * F32_BYTES,
                y: yp,
            };
            // SAFETY: x from x_off holds (rows−1)·ld + cols floats (checked),
            // y rows·cols bf16 (allocated above); guards alive until queued.
            unsafe { self.launch("ops_f32_to_bf16", self.geom.elems(rows * cols), &p)? };
        }
        Ok(y)
    }

    /// The GPU.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The cuBLAS handle (on the GPU's stream).
    pub(super) fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// # Safety
    /// The device addresses in `p` must satisfy what kernels/params.h
    /// documents for `P` at its sizes (the provided [`DeviceOps`] methods
    /// check every length before calling the hooks that launch).
    unsafe fn launch<P: DeviceRepr>(
        &self,
        name: &str,
        g: ((u32, u32, u32), (u32, u32, u32)),
        p: &P,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_in("model_ops", name, g, p) }
    }

    /// [`Self::launch`] for a kernel of `kernels/<stem>.cu`.
    ///
    /// # Safety
    /// As for [`Self::launch`].
    pub(super) unsafe fn launch_in<P: DeviceRepr>(
        &self,
        stem: &'static str,
        name: &str,
        g: ((u32, u32, u32), (u32, u32, u32)),
        p: &P,
    ) -> Result<()> {
        let f = self.gpu.function(stem, name)?;
        let cfg = LaunchConfig {
            grid_dim: g.0,
            block_dim: g.1,
            shared_mem_bytes: 0,
        };
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(p);
        // SAFETY: forwarded from the caller; the geometry comes from `Geom`,
        // which the grid-stride kernels accept in any shape.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
    }
}

const F32_BYTES: u64 = 4;

impl DeviceOps for CudaOps {
    type Buf = CudaSlice<f32>;

    fn check_memory(&self, what: &str, bytes: u64) -> Result<()> {
        self.gpu().check_memory(what, bytes)
    }

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn len(&self, b: &CudaSlice<f32>) -> usize {
        b.len()
    }
    fn counters(&self) -> &super::counters::Counters {
        &self.counters
    }
    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.counters.alloc(4 * n.max(1));
        self.gpu
            .stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(cuda_err)
    }
    fn upload(&self, h: &[f32]) -> Result<CudaSlice<f32>> {
        if h.is_empty() {
            return self.zeros(0);
        }
        self.counters.alloc(4 * h.len());
        self.counters.upload(4 * h.len());
        self.gpu.stream.clone_htod(h).map_err(cuda_err)
    }
    fn download(&self, b: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.counters.download(4 * b.len());
        self.gpu.stream.clone_dtoh(b).map_err(cuda_err)
    }
    unsafe fn raw_zero(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        self.gpu.stream.memset_zeros(x).map_err(cuda_err)
    }
    unsafe fn raw_write(&self, h: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        if h.is_empty() {
            return Ok(());
        }
        self.gpu
            .stream
            .memcpy_htod(h, &mut dst.slice_mut(..h.len()))
            .map_err(cuda_err)
    }
    unsafe fn raw_copy(
        &self,
        src: &CudaSlice<f32>,
        src_off: usize,
        dst: &mut CudaSlice<f32>,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.gpu
            .stream
            .memcpy_dtod(
                &src.slice(src_off..src_off + n),
                &mut dst.slice_mut(dst_off..dst_off + n),
            )
            .map_err(cuda_err)
    }
    fn sync(&self) -> Result<()> {
        self.gpu.sync()
    }

    unsafe fn raw_embed(
        &self,
        t: usize,
        ids: &CudaSlice<f32>,
        table: &CudaSlice<f32>,
        c: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu.stream;
        let (tp, _g1) = ids.device_ptr(st);
        let (tb, _g2) = table.device_ptr(st);
        let (op, _g3) = out.device_ptr_mut(st);
        let p = EmbedParams {
            T: t as i32,
            C: c as i32,
            tokens: tp,
            table: tb,
            out: op,
        };
        // SAFETY: device buffers of lengths checked by the caller (ids are
        // in-range int32 bits); the guards keep them alive until queued.
        unsafe { self.launch("ops_embed_f32", self.geom.elems(t * c), &p) }
    }

    unsafe fn raw_matmul(
        &self,
        x: &CudaSlice<f32>,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &CudaSlice<f32>,
        n: usize,
        k: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Row-major y[m, n] = x[m, k] · wᵀ is column-major
        // y_cm[n, m] = (w_cm[k, n])ᵀ · x_cm[k, m]: op(A) = Aᵀ with A = w
        // (lda = k), B = x (ldb = ldx), C = y (ldc = n).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: k as i32,
            ldb: ldx as i32,
            beta: 0.0f32,
            ldc: n as i32,
        };
        let xv = x.slice(x_off..);
        // SAFETY: the caller checked the sizes: w holds n·k floats, x from
        // x_off holds (m−1)·ldx + k, y holds m·n; all on this stream.
        unsafe { self.blas.gemm(cfg, w, &xv, y) }.map_err(cuda_err)
    }

    type Mat = DevMat;
    fn gemm_precision(&self) -> GemmPrecision {
        self.gemm
    }
    fn upload_mat(&self, h: &[f32]) -> Result<DevMat> {
        Ok(match self.gemm {
            GemmPrecision::F32 => DevMat::F32(self.upload(h)?),
            GemmPrecision::Bf16 => {
                let hb: Vec<bf16> = h.iter().map(|&v| bf16::from_f32(v)).collect();
                let st = &self.gpu.stream;
                DevMat::Bf16(if hb.is_empty() {
                    st.alloc_zeros::<bf16>(1).map_err(cuda_err)?
                } else {
                    st.clone_htod(&hb).map_err(cuda_err)?
                })
            }
        })
    }
    fn mat_len(&self, w: &DevMat) -> usize {
        w.len()
    }
    unsafe fn raw_matmul_w(
        &self,
        x: &CudaSlice<f32>,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &DevMat,
        n: usize,
        k: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let w = match w {
            // SAFETY: the caller checked these sizes for `matmul` (the same
            // check, on the same matrix length).
            DevMat::F32(w) => return unsafe { self.raw_matmul(x, x_off, ldx, m, w, n, k, y) },
            DevMat::Bf16(w) => w,
        };
        if m == 0 || n == 0 {
            return Ok(());
        }
        // x rows → dense bf16 [m, k] (ldb = k); then the column-major mapping
        // of `matmul`: C[n, m] = Aᵀ B with A = w (lda = k), C = y (ldc = n).
        let xb = self.f32_to_bf16(x, x_off, ldx, m, k)?;
        let st = &self.gpu.stream;
        let (wp, _g1) = w.device_ptr(st);
        let (xp, _g2) = xb.device_ptr(st);
        let (yp, _g3) = y.device_ptr_mut(st);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: w holds n·k bf16 and y ≥ m·n f32 (checked by the caller),
        // xb m·k bf16 (from f32_to_bf16), all on the stream the cuBLAS handle
        // uses; alpha/beta are host f32 as CUBLAS_COMPUTE_32F requires; the
        // guards keep the buffers alive until the GEMM is queued.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k as i32,
                xp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k as i32,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                cudaDataType_t::CUDA_R_32F,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cuda_err)
    }

    unsafe fn raw_layer_norm(
        &self,
        x: &CudaSlice<f32>,
        x_off: usize,
        rows: usize,
        c: usize,
        weight: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        eps: f32,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu.stream;
        let (xp, _g1) = x.device_ptr(st);
        let (wp, _g2) = weight.device_ptr(st);
        let (bp, _g3) = bias.device_ptr(st);
        let (yp, _g4) = y.device_ptr_mut(st);
        let p = LayerNormParams {
            rows: rows as i32,
            C: c as i32,
            eps,
            x: xp + x_off as u64 * F32_BYTES,
            weight: wp,
            bias: bp,
            y: yp,
        };
        // SAFETY: lengths checked by the caller; guards alive until queued.
        unsafe { self.launch("ops_layer_norm_f32", self.geom.rows(rows), &p) }
    }

    unsafe fn raw_group_norm(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &mut CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        bonus: Option<BonusBufs<'_, CudaSlice<f32>>>,
        g: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        let st = &self.gpu.stream;
        let (wp, _g1) = weight.device_ptr(st);
        let (bp, _g2) = bias.device_ptr(st);
        let r = bonus.as_ref().map(|b| b.r.device_ptr(st));
        let k = bonus.as_ref().map(|b| b.k.device_ptr(st));
        let v = bonus.as_ref().map(|b| b.v.device_ptr(st));
        let rk = bonus.as_ref().map(|b| b.r_k.device_ptr(st));
        let gp = g.map(|b| b.device_ptr(st));
        let (xp, _g3) = x.device_ptr_mut(st);
        let p = GroupNormParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            eps,
            x: xp,
            weight: wp,
            bias: bp,
            r: addr(&r),
            k: addr(&k),
            v: addr(&v),
            r_k: addr(&rk),
            g: addr(&gp),
            y: xp,
        };
        // SAFETY: lengths checked by the caller; y = x is allowed by the
        // kernel.
        unsafe { self.launch("ops_group_norm_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_kk_prep(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &CudaSlice<f32>,
        da: &CudaSlice<f32>,
        a0: &CudaSlice<f32>,
        k_k: &CudaSlice<f32>,
        k_a: &CudaSlice<f32>,
        k_out: &mut CudaSlice<f32>,
        a: &mut CudaSlice<f32>,
        b: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu.stream;
        let (kp, _g1) = k.device_ptr(st);
        let (dap, _g2) = da.device_ptr(st);
        let (a0p, _g3) = a0.device_ptr(st);
        let (kkp, _g4) = k_k.device_ptr(st);
        let (kap, _g5) = k_a.device_ptr(st);
        let (kop, _g6) = k_out.device_ptr_mut(st);
        let (ap, _g7) = a.device_ptr_mut(st);
        let (bp, _g8) = b.device_ptr_mut(st);
        let p = KkPrepParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            k: kp,
            da: dap,
            a0: a0p,
            k_k: kkp,
            k_a: kap,
            k_out: kop,
            a: ap,
            b: bp,
        };
        // SAFETY: lengths checked by the caller; outputs are distinct
        // buffers.
        unsafe { self.launch("ops_kk_prep_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_token_shift(
        &self,
        b: usize,
        t: usize,
        c: usize,
        x: &CudaSlice<f32>,
        state: &mut CudaSlice<f32>,
        mu: &CudaSlice<f32>,
        n_mix: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu.stream;
        let (xp, _g1) = x.device_ptr(st);
        let (mp, _g2) = mu.device_ptr(st);
        let (sp, _g3) = state.device_ptr_mut(st);
        let (op, _g4) = out.device_ptr_mut(st);
        let p = TokenShiftParams {
            B: b as i32,
            T: t as i32,
            C: c as i32,
            n_mix: n_mix as i32,
            x: xp,
            state: sp,
            mu: mp,
            out: op,
        };
        // SAFETY: lengths checked by the caller; state and out are distinct
        // buffers.
        unsafe { self.launch("ops_token_shift_f32", self.geom.elems(b * c), &p) }
    }

    unsafe fn raw_act(
        &self,
        mode: Act,
        x: &mut CudaSlice<f32>,
        c: usize,
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        let st = &self.gpu.stream;
        let n = x.len();
        let bp = bias.map(|b| b.device_ptr(st));
        let (xp, _g1) = x.device_ptr_mut(st);
        let p = ActParams {
            n: n as i32,
            C: c as i32,
            mode: mode.code(),
            x: xp,
            bias: addr(&bp),
        };
        // SAFETY: x holds n floats, bias ≥ C (checked by the caller).
        unsafe { self.launch("ops_act_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_value_residual(
        &self,
        c: usize,
        v: &mut CudaSlice<f32>,
        v_first: &CudaSlice<f32>,
        v0: &CudaSlice<f32>,
        dv: &CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu.stream;
        let n = v.len();
        let (fp, _g1) = v_first.device_ptr(st);
        let (v0p, _g2) = v0.device_ptr(st);
        let (dvp, _g3) = dv.device_ptr(st);
        let (vp, _g4) = v.device_ptr_mut(st);
        let p = ValueResidualParams {
            rows: (n / c) as i32,
            C: c as i32,
            v: vp,
            v_first: fp,
            v0: v0p,
            dv: dvp,
        };
        // SAFETY: lengths checked by the caller.
        unsafe { self.launch("ops_value_residual_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_add(&self, n: usize, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        super::fits_i32("add", &[n])?;
        let st = &self.gpu.stream;
        let (yp, _g1) = y.device_ptr(st);
        let (xp, _g2) = x.device_ptr_mut(st);
        let p = AddParams {
            n: n as i32,
            x: xp,
            y: yp,
        };
        // SAFETY: x holds n floats, y at least n (checked by the caller), n
        // fits i32 (checked above).
        unsafe { self.launch("ops_add_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_wkv(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&CudaSlice<f32>; 6],
        state: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = crate::wkv7::Dims { b: 1, t, h, n };
        let [r, w, k, v, a, b] = rwkvab;
        let mut h_t = self.zeros(d.state_len())?;
        crate::wkv7::cuda::forward_dev_v(
            &self.gpu,
            self.wkv_version(n),
            &d,
            &crate::wkv7::cuda::DevInputs {
                r,
                w,
                k,
                v,
                a,
                b,
                h0: Some(state),
            },
            y,
            Some(&mut h_t),
            None,
        )?;
        std::mem::swap(state, &mut h_t);
        Ok(())
    }
}
