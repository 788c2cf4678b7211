//! The element-wise and normalisation operations of the RWKV-7 forward pass
//! (everything but the GEMMs and the WKV recurrence, which have their own
//! modules), behind one small device trait, [`DeviceOps`], with three
//! implementations that run the same calls:
//!
//! | impl | buffers | element-wise ops | GEMM | WKV |
//! |---|---|---|---|---|
//! | [`cpu::CpuOps`] | `Vec<f32>` / `Vec<f64>` | [`reference`](mod@reference) (Rust twins, generic over the float) | [`gemm`] | `wkv7` reference (f64) |
//! | [`emu::EmuOps`] | `Vec<f32>` | `kernels/model_ops.cu` on the CPU emulator | [`reference::matmul`] / [`reference::matmul_bf16`] | `wkv7` Emu |
//! | [`cuda::CudaOps`] | `CudaSlice<f32>` | `kernels/model_ops.cu` on the GPU | cuBLAS sgemm / `cublasGemmEx` bf16 | `wkv7::cuda::forward_dev` |
//!
//! The device forward (`model::device`) is written once, generic over
//! [`DeviceOps`].
//!
//! Weight GEMMs ([`DeviceOps::matmul_w`]) take their matrix from
//! [`DeviceOps::upload_mat`], stored in the backend's [`GemmPrecision`]:
//! f32 (the default, for checking), or bf16 (emu, cuda): weights rounded to
//! bf16 once at upload, the activation rows rounded to bf16 (round to nearest
//! even, `ops_f32_to_bf16`) before each GEMM, products accumulated in f32,
//! f32 output. The emulated bf16 GEMM computes exactly what cuBLAS computes
//! up to the order of the f32 summation.
//!
//! Conventions (all ops, f32): activations are row-major `[rows, C]` with
//! `C = H · N`; per-channel parameters are `[C]`; matrices are `[out, in]`
//! (`nn.Linear`), applied as `y = x Wᵀ`. A buffer may be longer than what an
//! op touches (the check is `len ≥ offset + needed`); a shorter one is an
//! [`Error::Shape`] naming the argument. Ops marked "in place" overwrite
//! their first buffer argument.
pub mod backward;
pub mod backward_cuda;
pub mod backward_emu;
// Per-field docs left out of issue 12: this module is being refactored in
// parallel; its structs document their fields in groups.
#[allow(missing_docs)]
pub mod backward_ref;
pub mod counters;
pub mod cpu;
pub mod cuda;
pub mod emu;
pub mod gemm;
pub mod reduce;
// Per-field docs left out of issue 12: this module is being refactored in
// parallel; its structs document their fields in groups.
#[allow(missing_docs)]
pub mod reference;

use crate::error::{Error, Result};

/// `e^{-1/2}`: the x070 decay is `w = exp(−e^{−1/2} · σ(d))`.
pub const DECAY_SCALE: f32 = 0.606_530_66;
/// LayerNorm epsilon (GroupNorm uses `LN_EPS · N`).
pub const LN_EPS: f32 = 1e-5;

/// Element-wise activations of [`DeviceOps::act`], applied to `x + bias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `tanh`
    Tanh,
    /// `σ(x) = 1 / (1 + e^{−x})`
    Sigmoid,
    /// `max(x, 0)²`
    ReluSq,
    /// the x070 decay `exp(−e^{−1/2} σ(x))`, in (0.545, 1)
    Decay,
}

impl Act {
    /// The `OPS_ACT_*` code of kernels/params.h.
    pub fn code(self) -> i32 {
        match self {
            Act::Tanh => 0,
            Act::Sigmoid => 1,
            Act::ReluSq => 2,
            Act::Decay => 3,
        }
    }
}

/// Operand precision of the weight GEMMs ([`DeviceOps::matmul_w`]);
/// accumulation and output are f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GemmPrecision {
    /// f32 operands (cuBLAS sgemm / the Rust f32 GEMM).
    #[default]
    F32,
    /// bf16 operands (weights stored as bf16, activations rounded to bf16
    /// per GEMM), f32 accumulation.
    Bf16,
}

impl GemmPrecision {
    /// `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            GemmPrecision::F32 => "f32",
            GemmPrecision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for GemmPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for GemmPrecision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(GemmPrecision::F32),
            "bf16" => Ok(GemmPrecision::Bf16),
            _ => Err(Error::Invalid(format!(
                "unknown GEMM precision {s:?} (expected f32 or bf16)"
            ))),
        }
    }
}

/// A weight matrix in host memory for [`DeviceOps::matmul_w`] (cpu, emu):
/// f32, or rounded to bf16 once at upload.
#[derive(Clone, Debug)]
pub enum HostMat {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements, rounded once at upload.
    Bf16(Vec<half::bf16>),
}

impl HostMat {
    /// `h` stored in precision `p` (bf16: round to nearest even).
    pub fn new(h: &[f32], p: GemmPrecision) -> Self {
        match p {
            GemmPrecision::F32 => HostMat::F32(h.to_vec()),
            GemmPrecision::Bf16 => {
                HostMat::Bf16(h.iter().map(|&v| half::bf16::from_f32(v)).collect())
            }
        }
    }
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            HostMat::F32(v) => v.len(),
            HostMat::Bf16(v) => v.len(),
        }
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The precision it is stored in.
    pub fn precision(&self) -> GemmPrecision {
        match self {
            HostMat::F32(_) => GemmPrecision::F32,
            HostMat::Bf16(_) => GemmPrecision::Bf16,
        }
    }
}

/// Token ids on the device: the `u32` bits of each id stored in an f32
/// buffer (the kernels read them as `int32`), every id `< bound`. Made only
/// by [`DeviceOps::ids`] / [`DeviceOps::write_ids`], which check the ids on
/// the host, so the ops that read them on the device can rely on the bound.
pub struct Ids<B> {
    buf: B,
    len: usize,
    bound: usize,
}

impl<B> Ids<B> {
    /// Number of ids.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no id.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Every id is below this.
    pub fn bound(&self) -> usize {
        self.bound
    }
}

/// The buffer behind `ids` (for the ops that read them).
pub(crate) fn ids_buf<B>(ids: &Ids<B>) -> &B {
    &ids.buf
}

/// The ids' bits as f32 (checked: each `< bound ≤ i32::MAX`).
fn id_bits(h: &[u32], bound: usize) -> Result<Vec<f32>> {
    if bound > i32::MAX as usize {
        return Err(Error::Invalid(format!("ids: bound {bound} exceeds i32")));
    }
    if let Some((i, &t)) = h.iter().enumerate().find(|(_, &t)| t as usize >= bound) {
        return Err(Error::Invalid(format!(
            "id {t} at position {i} is out of range (must be < {bound})"
        )));
    }
    Ok(h.iter().map(|&t| f32::from_bits(t)).collect())
}

/// Launch geometry policy of the `model_ops` kernels. Every kernel is
/// written with grid-stride loops, so any policy gives the same results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    /// Threads per block of the element-wise kernels (a multiple of 32).
    pub elem_block: u32,
    /// Upper bound on the number of blocks of every kernel.
    pub max_blocks: u32,
    /// Warps (rows) per block of the row kernels (LayerNorm, GroupNorm, L2 norm).
    pub rows_per_block: u32,
}

impl Geom {
    /// For the GPU: 256-thread element-wise blocks, 4 rows (128 threads) per row block.
    pub const GPU: Geom = Geom {
        elem_block: 256,
        max_blocks: 8192,
        rows_per_block: 4,
    };
    /// For the CPU emulator (one fiber per CUDA thread, one block at a
    /// time): one block of 64 threads, looping over everything.
    pub const EMU: Geom = Geom {
        elem_block: 64,
        max_blocks: 1,
        rows_per_block: 2,
    };

    /// Grid and block for `n` independent elements.
    pub fn elems(&self, n: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
        let b = self.elem_block.max(32);
        let g = n
            .div_ceil(b as usize)
            .clamp(1, self.max_blocks.max(1) as usize) as u32;
        ((g, 1, 1), (b, 1, 1))
    }

    /// Grid and block for `rows` rows, one warp each.
    pub fn rows(&self, rows: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
        let w = self.rows_per_block.clamp(1, 8);
        let g = rows
            .div_ceil(w as usize)
            .clamp(1, self.max_blocks.max(1) as usize) as u32;
        ((g, 1, 1), (32, w, 1))
    }
}

/// Checks that buffer `name` (length `len`) holds `off + need` elements.
pub fn need(name: &str, len: usize, off: usize, need: usize) -> Result<()> {
    if len < off + need {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: vec![off + need],
            got: vec![len],
        });
    }
    Ok(())
}

/// Checks that every size fits the kernels' `int32` fields.
pub fn fits_i32(what: &str, sizes: &[usize]) -> Result<()> {
    let total = sizes
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s.max(1)));
    match total {
        Some(t) if t <= i32::MAX as usize => Ok(()),
        _ => Err(Error::Invalid(format!(
            "{what}: sizes {sizes:?} too large for the kernels (2^31 elements)"
        ))),
    }
}

/// Head layout `(H, N)` check: both ≥ 1.
pub fn check_heads(h: usize, n: usize) -> Result<()> {
    if h == 0 || n == 0 {
        return Err(Error::Invalid(format!(
            "heads H={h} and head size N={n} must both be at least 1"
        )));
    }
    Ok(())
}

/// The r_k bonus inputs of [`DeviceOps::group_norm`]: r, k̃, v `[rows, C]`, r_k `[C]`.
pub struct BonusBufs<'a, B> {
    /// `[rows, C]` receptance.
    pub r: &'a B,
    /// `[rows, C]` k̃.
    pub k: &'a B,
    /// `[rows, C]` value.
    pub v: &'a B,
    /// `[C]` the r_k weight.
    pub r_k: &'a B,
}
/// A device that runs the forward-pass operations on its own buffers.
/// All sizes are checked (typed [`Error`]s, never a panic or an
/// out-of-bounds access); see the module docs for layouts.
///
/// Every public op that takes sizes is a provided method: it checks them
/// once, here, for all backends and then calls the backend's `raw_*` hook
/// (hidden from the docs), which may rely on those checks. Implementors write
/// the buffer management (`len`, `zeros`, `upload`, …) and the hooks.
#[allow(clippy::too_many_arguments)]
pub trait DeviceOps: Sync {
    /// An f32 buffer on the device.
    type Buf: Send + Sync;

    /// Short name (`cpu`, `emu`, `cuda`).
    fn name(&self) -> &'static str;
    /// The backend's counters (launches, allocations, transfers), shared by
    /// its clones. `zeros`, `upload` and `download` count themselves; every
    /// op is counted by its provided method.
    fn counters(&self) -> &counters::Counters;
    /// Elements of a buffer.
    fn len(&self, b: &Self::Buf) -> usize;
    /// A zeroed buffer of `n` elements.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// A buffer holding a copy of `h`.
    fn upload(&self, h: &[f32]) -> Result<Self::Buf>;
    /// The whole buffer, copied to the host.
    fn download(&self, b: &Self::Buf) -> Result<Vec<f32>>;
    /// A buffer holding `h`, rounded to the backend's float type (f32 on
    /// every backend but `CpuOps<f64>`, which keeps it exactly).
    fn upload_f64(&self, h: &[f64]) -> Result<Self::Buf> {
        let h: Vec<f32> = h.iter().map(|&v| v as f32).collect();
        self.upload(&h)
    }
    /// [`Self::download`] widened to f64 (exact: no rounding on any backend).
    fn download_f64(&self, b: &Self::Buf) -> Result<Vec<f64>> {
        Ok(self.download(b)?.into_iter().map(f64::from).collect())
    }
    /// `dst[..h.len()] = h`.
    fn write(&self, h: &[f32], dst: &mut Self::Buf) -> Result<()> {
        need("dst", self.len(dst), 0, h.len())?;
        self.counters().upload(4 * h.len());
        // SAFETY: the size the hook relies on was checked just above.
        unsafe { self.raw_write(h, dst) }
    }
    /// # Safety
    /// `dst` must hold at least `h.len()` elements (what [`Self::write`]
    /// checks).
    #[doc(hidden)]
    unsafe fn raw_write(&self, h: &[f32], dst: &mut Self::Buf) -> Result<()>;
    /// `dst[dst_off..dst_off + n] = src[src_off..src_off + n]`.
    fn copy(
        &self,
        src: &Self::Buf,
        src_off: usize,
        dst: &mut Self::Buf,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        need("src", self.len(src), src_off, n)?;
        need("dst", self.len(dst), dst_off, n)?;
        self.counters().launch(counters::Op::Copy);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_copy(src, src_off, dst, dst_off, n) }
    }
    /// # Safety
    /// `src` must hold `src_off + n` elements and `dst` `dst_off + n` (what
    /// [`Self::copy`] checks).
    #[doc(hidden)]
    unsafe fn raw_copy(
        &self,
        src: &Self::Buf,
        src_off: usize,
        dst: &mut Self::Buf,
        dst_off: usize,
        n: usize,
    ) -> Result<()>;
    /// Sets every element of `x` to 0 (no allocation).
    fn zero(&self, x: &mut Self::Buf) -> Result<()> {
        self.counters().launch(counters::Op::Fill);
        // SAFETY: the hook writes exactly the buffer it is given.
        unsafe { self.raw_zero(x) }
    }
    /// # Safety
    /// None beyond the borrow (kept `unsafe` like every hook).
    #[doc(hidden)]
    unsafe fn raw_zero(&self, x: &mut Self::Buf) -> Result<()>;
    /// Waits for queued work (no-op on the CPU backends).
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// Parts a host backend's tuning step cuts a batch into, run at once
    /// on the host's threads (1 for a device, whose work is queued, not run
    /// by the caller). A constant, not the thread count, so results do not
    /// depend on the machine.
    fn host_parts(&self) -> usize {
        1
    }
    /// Refuses a plan of `bytes` more than the backend's memory can hold
    /// (host backends: the host's available memory; CUDA: the device's free
    /// memory), so a too-large problem is a clear error before anything is
    /// allocated; `what` names the plan.
    fn check_memory(&self, what: &str, bytes: u64) -> Result<()> {
        crate::guard::check_host_memory(what, bytes)
    }

    /// Token ids on the device (uploaded once; each id must be `< bound`).
    fn ids(&self, h: &[u32], bound: usize) -> Result<Ids<Self::Buf>> {
        let bits = id_bits(h, bound)?;
        Ok(Ids {
            buf: self.upload(&bits)?,
            len: h.len(),
            bound,
        })
    }
    /// Overwrites all of `dst` with `h` (same length; each id `< bound`):
    /// a transfer, no allocation.
    fn write_ids(&self, h: &[u32], bound: usize, dst: &mut Ids<Self::Buf>) -> Result<()> {
        if h.len() != dst.len {
            return Err(Error::Shape {
                name: "ids".into(),
                expected: vec![dst.len],
                got: vec![h.len()],
            });
        }
        let bits = id_bits(h, bound)?;
        self.write(&bits, &mut dst.buf)?;
        dst.bound = bound;
        Ok(())
    }

    /// `out[t, :] = table[tokens[t], :]`; table `[V, C]`, out `[T, C]`
    /// (the ids are uploaded first: [`Self::embed_ids`] reads device ids).
    fn embed(
        &self,
        tokens: &[u32],
        table: &Self::Buf,
        c: usize,
        out: &mut Self::Buf,
    ) -> Result<()> {
        check::embed(tokens, self.len(table), c, self.len(out))?;
        if tokens.is_empty() {
            return Ok(());
        }
        let ids = self.ids(tokens, self.len(table) / c)?;
        self.embed_ids(&ids, table, c, out)
    }
    /// [`Self::embed`] of device ids: `out[t, :] = table[ids[t], :]`.
    fn embed_ids(
        &self,
        ids: &Ids<Self::Buf>,
        table: &Self::Buf,
        c: usize,
        out: &mut Self::Buf,
    ) -> Result<()> {
        if c == 0 {
            return Err(Error::Invalid("embed: C must be at least 1".into()));
        }
        if ids.bound > self.len(table) / c {
            return Err(Error::Invalid(format!(
                "embed: ids up to {} but the table has {} rows",
                ids.bound,
                self.len(table) / c
            )));
        }
        fits_i32("embed", &[ids.len, c])?;
        need("out", self.len(out), 0, ids.len * c)?;
        if ids.len == 0 {
            return Ok(());
        }
        self.counters().launch(counters::Op::Embed);
        // SAFETY: every id is < the table's rows (the Ids bound, checked on
        // the host when written, against the table just above); out holds
        // T·C floats.
        unsafe { self.raw_embed(ids.len, &ids.buf, table, c, out) }
    }
    /// # Safety
    /// `ids` holds `t` int32 ids (as f32 bits), each a row of `table`
    /// `[V, C]`; out ≥ t·C (what [`Self::embed_ids`] checks).
    #[doc(hidden)]
    unsafe fn raw_embed(
        &self,
        t: usize,
        ids: &Self::Buf,
        table: &Self::Buf,
        c: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// `y[m, n] = x[m, k] · wᵀ`, w `[n, k]`, row i of x at `x_off + i·ldx`.
    fn matmul(
        &self,
        x: &Self::Buf,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &Self::Buf,
        n: usize,
        k: usize,
        y: &mut Self::Buf,
    ) -> Result<()> {
        check::matmul(self.len(x), x_off, ldx, m, self.len(w), n, k, self.len(y))?;
        self.counters().launch(counters::Op::Matmul);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_matmul(x, x_off, ldx, m, w, n, k, y) }
    }
    /// # Safety
    /// The sizes must pass `check::matmul` (what [`Self::matmul`] checks).
    #[doc(hidden)]
    unsafe fn raw_matmul(
        &self,
        x: &Self::Buf,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &Self::Buf,
        n: usize,
        k: usize,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// A weight matrix `[n, k]` for [`Self::matmul_w`], in the backend's
    /// GEMM precision.
    type Mat;
    /// The precision [`Self::upload_mat`] stores matrices in.
    fn gemm_precision(&self) -> GemmPrecision;
    /// Uploads a weight matrix (rounded to bf16 once when the precision is bf16).
    fn upload_mat(&self, h: &[f32]) -> Result<Self::Mat>;
    /// Elements of a matrix from [`Self::upload_mat`].
    fn mat_len(&self, w: &Self::Mat) -> usize;
    /// [`Self::matmul`] with a matrix from [`Self::upload_mat`]; for a bf16
    /// matrix the rows of x are rounded to bf16 first, products accumulate
    /// in f32 and y is f32.
    fn matmul_w(
        &self,
        x: &Self::Buf,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &Self::Mat,
        n: usize,
        k: usize,
        y: &mut Self::Buf,
    ) -> Result<()> {
        check::matmul(
            self.len(x),
            x_off,
            ldx,
            m,
            self.mat_len(w),
            n,
            k,
            self.len(y),
        )?;
        self.counters().launch(counters::Op::MatmulW);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_matmul_w(x, x_off, ldx, m, w, n, k, y) }
    }
    /// # Safety
    /// The sizes must pass `check::matmul` with `w`'s [`Self::mat_len`]
    /// (what [`Self::matmul_w`] checks).
    #[doc(hidden)]
    unsafe fn raw_matmul_w(
        &self,
        x: &Self::Buf,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &Self::Mat,
        n: usize,
        k: usize,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// LayerNorm of `rows` rows of `C` starting at `x_off`, into `y[..rows·C]`.
    fn layer_norm(
        &self,
        x: &Self::Buf,
        x_off: usize,
        rows: usize,
        c: usize,
        weight: &Self::Buf,
        bias: &Self::Buf,
        eps: f32,
        y: &mut Self::Buf,
    ) -> Result<()> {
        check::layer_norm(
            self.len(x),
            x_off,
            rows,
            c,
            [self.len(weight), self.len(bias)],
            self.len(y),
        )?;
        self.counters().launch(counters::Op::LayerNorm);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_layer_norm(x, x_off, rows, c, weight, bias, eps, y) }
    }
    /// # Safety
    /// The sizes must pass `check::layer_norm` (what [`Self::layer_norm`]
    /// checks).
    #[doc(hidden)]
    unsafe fn raw_layer_norm(
        &self,
        x: &Self::Buf,
        x_off: usize,
        rows: usize,
        c: usize,
        weight: &Self::Buf,
        bias: &Self::Buf,
        eps: f32,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// In place on x `[rows, H·N]`: per-head GroupNorm + affine, optional
    /// r_k bonus `(Σ r k̃ r_k)·v`, optional gate `· g`.
    fn group_norm(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &mut Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        bonus: Option<BonusBufs<'_, Self::Buf>>,
        g: Option<&Self::Buf>,
    ) -> Result<()> {
        check::group_norm(
            rows,
            h,
            n,
            self.len(x),
            self.len(weight),
            self.len(bias),
            &bonus,
            g,
            |b| self.len(b),
        )?;
        self.counters().launch(counters::Op::GroupNorm);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_group_norm(rows, h, n, eps, x, weight, bias, bonus, g) }
    }
    /// # Safety
    /// The sizes must pass `check::group_norm` (what [`Self::group_norm`]
    /// checks): `[rows, C]` tensors ≥ rows·H·N elements, `[C]` vectors ≥
    /// H·N, H, N ≥ 1.
    #[doc(hidden)]
    unsafe fn raw_group_norm(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &mut Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        bonus: Option<BonusBufs<'_, Self::Buf>>,
        g: Option<&Self::Buf>,
    ) -> Result<()>;

    /// α = σ(a0 + da), κ̂ = L2-normalize per head (k ⊙ k_k); writes
    /// `k_out = k ⊙ (1 + (α − 1) ⊙ k_a)`, `a = −κ̂`, `b = κ̂ ⊙ α`.
    fn kk_prep(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &Self::Buf,
        da: &Self::Buf,
        a0: &Self::Buf,
        k_k: &Self::Buf,
        k_a: &Self::Buf,
        k_out: &mut Self::Buf,
        a: &mut Self::Buf,
        b: &mut Self::Buf,
    ) -> Result<()> {
        check::rows_heads(
            "kk_prep",
            rows,
            h,
            n,
            &[
                ("k", self.len(k)),
                ("da", self.len(da)),
                ("k_out", self.len(k_out)),
                ("a", self.len(a)),
                ("b", self.len(b)),
            ],
            &[
                ("a0", self.len(a0)),
                ("k_k", self.len(k_k)),
                ("k_a", self.len(k_a)),
            ],
        )?;
        self.counters().launch(counters::Op::KkPrep);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_kk_prep(rows, h, n, k, da, a0, k_k, k_a, k_out, a, b) }
    }
    /// # Safety
    /// The sizes must pass the checks of [`Self::kk_prep`]: `[rows, C]`
    /// tensors ≥ rows·H·N elements, `[C]` vectors ≥ H·N, H, N ≥ 1.
    #[doc(hidden)]
    unsafe fn raw_kk_prep(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &Self::Buf,
        da: &Self::Buf,
        a0: &Self::Buf,
        k_k: &Self::Buf,
        k_a: &Self::Buf,
        k_out: &mut Self::Buf,
        a: &mut Self::Buf,
        b: &mut Self::Buf,
    ) -> Result<()>;

    /// Token shift + lerp for `n_mix` coefficient rows `mu [n_mix, C]`:
    /// `out [T, n_mix, C]`; `state [C]` is x_{−1} in and x_{T−1} out.
    fn token_shift(
        &self,
        t: usize,
        c: usize,
        x: &Self::Buf,
        state: &mut Self::Buf,
        mu: &Self::Buf,
        n_mix: usize,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.token_shift_b(1, t, c, x, state, mu, n_mix, out)
    }
    /// [`Self::token_shift`] over `b` sequences of `t` rows each: x
    /// `[B, T, C]`, state `[B, C]` (one shift state per sequence, updated),
    /// out `[B, T, n_mix, C]`.
    fn token_shift_b(
        &self,
        b: usize,
        t: usize,
        c: usize,
        x: &Self::Buf,
        state: &mut Self::Buf,
        mu: &Self::Buf,
        n_mix: usize,
        out: &mut Self::Buf,
    ) -> Result<()> {
        check::token_shift(
            b,
            t,
            c,
            self.len(x),
            self.len(state),
            self.len(mu),
            n_mix,
            self.len(out),
        )?;
        self.counters().launch(counters::Op::TokenShift);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_token_shift(b, t, c, x, state, mu, n_mix, out) }
    }
    /// # Safety
    /// The sizes must pass `check::token_shift` (what [`Self::token_shift_b`]
    /// checks).
    #[doc(hidden)]
    unsafe fn raw_token_shift(
        &self,
        b: usize,
        t: usize,
        c: usize,
        x: &Self::Buf,
        state: &mut Self::Buf,
        mu: &Self::Buf,
        n_mix: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// In place on all of x (a multiple of C): `x = f(x + bias)`.
    fn act(&self, mode: Act, x: &mut Self::Buf, c: usize, bias: Option<&Self::Buf>) -> Result<()> {
        check::per_channel("act", self.len(x), c)?;
        if let Some(b) = bias {
            need("bias", self.len(b), 0, c)?;
        }
        self.counters().launch(counters::Op::Act);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_act(mode, x, c, bias) }
    }
    /// # Safety
    /// x's length must pass `check::per_channel` and bias (if any) hold ≥ C
    /// elements (what [`Self::act`] checks).
    #[doc(hidden)]
    unsafe fn raw_act(
        &self,
        mode: Act,
        x: &mut Self::Buf,
        c: usize,
        bias: Option<&Self::Buf>,
    ) -> Result<()>;

    /// In place on all of v (a multiple of C): `v += (v_first − v) ⊙ σ(v0 + dv)`.
    fn value_residual(
        &self,
        c: usize,
        v: &mut Self::Buf,
        v_first: &Self::Buf,
        v0: &Self::Buf,
        dv: &Self::Buf,
    ) -> Result<()> {
        check::value_residual(
            c,
            self.len(v),
            self.len(v_first),
            self.len(v0),
            self.len(dv),
        )?;
        self.counters().launch(counters::Op::ValueResidual);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_value_residual(c, v, v_first, v0, dv) }
    }
    /// # Safety
    /// The sizes must pass `check::value_residual` (what
    /// [`Self::value_residual`] checks).
    #[doc(hidden)]
    unsafe fn raw_value_residual(
        &self,
        c: usize,
        v: &mut Self::Buf,
        v_first: &Self::Buf,
        v0: &Self::Buf,
        dv: &Self::Buf,
    ) -> Result<()>;

    /// In place on all of x: `x += y`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf) -> Result<()> {
        self.add_n(x, y, self.len(x))
    }
    /// In place on the first `n` elements: `x[..n] += y[..n]`.
    fn add_n(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) -> Result<()> {
        need("x", self.len(x), 0, n)?;
        need("y", self.len(y), 0, n)?;
        self.counters().launch(counters::Op::Add);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_add(n, x, y) }
    }
    /// # Safety
    /// `x` and `y` must hold at least `n` elements (what [`Self::add_n`]
    /// checks; the kernels' `int32` limit is the device backends' own check).
    #[doc(hidden)]
    unsafe fn raw_add(&self, n: usize, x: &mut Self::Buf, y: &Self::Buf) -> Result<()>;

    /// The WKV-7 recurrence for one sequence of `t` tokens: r … b, y
    /// `[T, H, N]` (exact lengths), `state [H, N, N]` value-major, updated.
    fn wkv(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Self::Buf; 6],
        state: &mut Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()> {
        check::wkv(
            t,
            h,
            n,
            rwkvab.map(|b| self.len(b)),
            self.len(state),
            self.len(y),
        )?;
        self.counters().launch(counters::Op::WkvFwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_wkv(t, h, n, rwkvab, state, y) }
    }
    /// # Safety
    /// The sizes must pass `check::wkv` (what [`Self::wkv`] checks): valid
    /// dims, every `[T, H, N]` / `[H, N, N]` buffer of exact length.
    #[doc(hidden)]
    unsafe fn raw_wkv(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Self::Buf; 6],
        state: &mut Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;
}

// ---- shape checks shared by the implementations ---------------------------

pub(crate) mod check {
    use super::{check_heads, fits_i32, need, BonusBufs};
    use crate::error::{Error, Result};

    pub fn embed(tokens: &[u32], table: usize, c: usize, out: usize) -> Result<()> {
        if c == 0 {
            return Err(Error::Invalid("embed: C must be at least 1".into()));
        }
        let v = table / c;
        if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= v) {
            return Err(Error::Invalid(format!(
                "token {t} at position {i} is out of range (table has {v} rows)"
            )));
        }
        fits_i32("embed", &[tokens.len(), c])?;
        need("out", out, 0, tokens.len() * c)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        x: usize,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: usize,
        n: usize,
        k: usize,
        y: usize,
    ) -> Result<()> {
        if ldx < k {
            return Err(Error::Invalid(format!("matmul: ldx {ldx} < k {k}")));
        }
        fits_i32("matmul", &[m, ldx])?;
        fits_i32("matmul", &[n, k])?;
        fits_i32("matmul", &[m, n])?;
        if m > 0 {
            need("x", x, x_off, (m - 1) * ldx + k)?;
        }
        need("w", w, 0, n * k)?;
        need("y", y, 0, m * n)
    }

    pub fn layer_norm(
        x: usize,
        x_off: usize,
        rows: usize,
        c: usize,
        wb: [usize; 2],
        y: usize,
    ) -> Result<()> {
        if c == 0 {
            return Err(Error::Invalid("layer_norm: C must be at least 1".into()));
        }
        fits_i32("layer_norm", &[rows, c])?;
        need("x", x, x_off, rows * c)?;
        need("weight", wb[0], 0, c)?;
        need("bias", wb[1], 0, c)?;
        need("y", y, 0, rows * c)
    }

    /// `rows_c` lengths of [rows, C] tensors, `c_vecs` lengths of [C] vectors.
    pub fn rows_heads(
        what: &str,
        rows: usize,
        h: usize,
        n: usize,
        rows_c: &[(&str, usize)],
        c_vecs: &[(&str, usize)],
    ) -> Result<()> {
        check_heads(h, n)?;
        fits_i32(what, &[rows, h, n])?;
        let c = h * n;
        for (name, len) in rows_c {
            need(name, *len, 0, rows * c)?;
        }
        for (name, len) in c_vecs {
            need(name, *len, 0, c)?;
        }
        Ok(())
    }

    pub fn per_channel(what: &str, n: usize, c: usize) -> Result<()> {
        if c == 0 || n % c != 0 {
            return Err(Error::Invalid(format!(
                "{what}: length {n} is not a multiple of C = {c}"
            )));
        }
        fits_i32(what, &[n])
    }

    #[allow(clippy::too_many_arguments)]
    pub fn group_norm<B>(
        rows: usize,
        h: usize,
        n: usize,
        x: usize,
        w: usize,
        b: usize,
        bonus: &Option<BonusBufs<'_, B>>,
        g: Option<&B>,
        len: impl Fn(&B) -> usize,
    ) -> Result<()> {
        let mut rc = vec![("x", x)];
        let mut cv = vec![("weight", w), ("bias", b)];
        if let Some(bb) = bonus {
            rc.extend([("r", len(bb.r)), ("k", len(bb.k)), ("v", len(bb.v))]);
            cv.push(("r_k", len(bb.r_k)));
        }
        if let Some(g) = g {
            rc.push(("g", len(g)));
        }
        rows_heads("group_norm", rows, h, n, &rc, &cv)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn token_shift(
        b: usize,
        t: usize,
        c: usize,
        x: usize,
        state: usize,
        mu: usize,
        n_mix: usize,
        out: usize,
    ) -> Result<()> {
        if c == 0 || n_mix == 0 || b == 0 {
            return Err(Error::Invalid(
                "token_shift: B, C and n_mix must be at least 1".into(),
            ));
        }
        fits_i32("token_shift", &[b, t, n_mix, c])?;
        need("x", x, 0, b * t * c)?;
        need("state", state, 0, b * c)?;
        need("mu", mu, 0, n_mix * c)?;
        need("out", out, 0, b * t * n_mix * c)
    }

    pub fn value_residual(c: usize, v: usize, v_first: usize, v0: usize, dv: usize) -> Result<()> {
        per_channel("value_residual", v, c)?;
        need("v_first", v_first, 0, v)?;
        need("dv", dv, 0, v)?;
        need("v0", v0, 0, c)
    }

    /// Sizes of [`super::DeviceOps::wkv`] (B = 1): valid dims, r … b and y
    /// exactly `[1, T, H, N]`, the state exactly `[1, H, N, N]` (named `h0`,
    /// the initial state it is to `wkv7`). The errors are those of `wkv7`'s
    /// own checks: the expected shape, the length got.
    pub fn wkv(
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [usize; 6],
        state: usize,
        y: usize,
    ) -> Result<()> {
        let d = crate::wkv7::Dims { b: 1, t, h, n };
        d.validate()?;
        let names = ["r", "w", "k", "v", "a", "b", "y"];
        let [r, w, k, v, a, b] = rwkvab;
        for (name, len) in names.into_iter().zip([r, w, k, v, a, b, y]) {
            exact(name, len, d.seq_shape())?;
        }
        exact("h0", state, d.state_shape())
    }

    fn exact(name: &str, len: usize, shape: Vec<usize>) -> Result<()> {
        if len != shape.iter().product::<usize>() {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shape,
                got: vec![len],
            });
        }
        Ok(())
    }
}

// ---- the CPU implementation (the Rust twins) -------------------------------

/// Rows per parallel piece of the CPU twins' row-wise ops: pieces of at
/// least this many elements (below it one thread does all).
const PAR_ELEMS: usize = 1 << 15;

/// Runs `f(r0, n, y_rows)` over pieces of the `rows` rows of `y` (`ld`
/// elements per row) in parallel: each piece is rows `r0 .. r0 + n`, a
/// whole number of rows of at least [`PAR_ELEMS`] elements (one piece,
/// on this thread, when the op is smaller or there is one thread). The
/// caller slices its inputs at row `r0`.
pub(crate) fn par_rows<T: Send>(
    rows: usize,
    ld: usize,
    y: &mut [T],
    f: impl Fn(usize, usize, &mut [T]) + Sync + Send,
) {
    use rayon::prelude::*;
    let per = (PAR_ELEMS / ld.max(1)).max(1);
    if rows <= per || rayon::current_num_threads() < 2 {
        f(0, rows, &mut y[..rows * ld]);
        return;
    }
    y[..rows * ld]
        .par_chunks_mut(per * ld)
        .enumerate()
        .for_each(|(i, yc)| f(i * per, yc.len() / ld.max(1), yc));
}

/// The row pieces [`par_rows`] uses for `rows` rows of `ld` elements:
/// `(first row, rows)`, contiguous from row 0 (one piece when the op is
/// small or there is one thread).
pub(crate) fn row_pieces(rows: usize, ld: usize) -> Vec<(usize, usize)> {
    let per = (PAR_ELEMS / ld.max(1)).max(1);
    if rows <= per || rayon::current_num_threads() < 2 {
        return vec![(0, rows)];
    }
    (0..rows)
        .step_by(per)
        .map(|r0| (r0, per.min(rows - r0)))
        .collect()
}

/// The rows of each piece of `pieces` (from [`row_pieces`]) in `buf`, `ld`
/// elements per row, as disjoint mutable slices (for twins with several
/// outputs split over threads together).
pub(crate) fn split_rows<'a, T>(
    buf: &'a mut [T],
    pieces: &[(usize, usize)],
    ld: usize,
) -> Vec<&'a mut [T]> {
    let mut rest = buf;
    pieces
        .iter()
        .map(|&(_, nr)| {
            let (p, r) = std::mem::take(&mut rest).split_at_mut(nr * ld);
            rest = r;
            p
        })
        .collect()
}

/// The buffer-management methods of [`DeviceOps`] for backends whose buffers
/// are host `Vec<f32>` ([`emu::EmuOps`]). The hooks slice
/// safely (a size the provided method did not check would panic, never read
/// out of bounds).
macro_rules! host_buffer_ops {
    () => {
        fn len(&self, b: &Vec<f32>) -> usize {
            b.len()
        }
        fn counters(&self) -> &$crate::ops::counters::Counters {
            &self.counters
        }
        fn zeros(&self, n: usize) -> Result<Vec<f32>> {
            self.counters.alloc(4 * n);
            Ok(vec![0.0; n])
        }
        fn upload(&self, h: &[f32]) -> Result<Vec<f32>> {
            self.counters.alloc(4 * h.len());
            self.counters.upload(4 * h.len());
            Ok(h.to_vec())
        }
        fn download(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
            self.counters.download(4 * b.len());
            Ok(b.clone())
        }
        unsafe fn raw_write(&self, h: &[f32], dst: &mut Vec<f32>) -> Result<()> {
            dst[..h.len()].copy_from_slice(h);
            Ok(())
        }
        unsafe fn raw_zero(&self, x: &mut Vec<f32>) -> Result<()> {
            x.fill(0.0);
            Ok(())
        }
        unsafe fn raw_copy(
            &self,
            src: &Vec<f32>,
            src_off: usize,
            dst: &mut Vec<f32>,
            dst_off: usize,
            n: usize,
        ) -> Result<()> {
            dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
            Ok(())
        }
    };
}
pub(crate) use host_buffer_ops;

/// [`DeviceOps::matmul`] on host buffers; the caller checked the sizes
/// (`check::matmul`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn host_matmul(
    x: &[f32],
    x_off: usize,
    ldx: usize,
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    y: &mut [f32],
) -> Result<()> {
    if m > 0 {
        reference::matmul(&x[x_off..], ldx, m, w, n, k, y);
    }
    Ok(())
}

/// [`DeviceOps::matmul_w`] on host buffers: f32, or bf16 with the rows of x
/// rounded by `round` (the emulated kernel or its Rust twin) into a dense
/// `[m, k]` bf16 copy; the caller checked the sizes (`check::matmul`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn host_matmul_w(
    x: &[f32],
    x_off: usize,
    ldx: usize,
    m: usize,
    w: &HostMat,
    n: usize,
    k: usize,
    y: &mut [f32],
    round: impl FnOnce(&[f32], usize, usize, usize) -> Result<Vec<half::bf16>>,
) -> Result<()> {
    match w {
        HostMat::F32(w) => host_matmul(x, x_off, ldx, m, w, n, k, y),
        HostMat::Bf16(w) => {
            if m == 0 {
                return Ok(());
            }
            let xb = round(&x[x_off..], ldx, m, k)?;
            let xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            reference::matmul_bf16(&xf, k, m, w, n, k, y);
            Ok(())
        }
    }
}

/// WKV on host buffers through a `wkv7` backend (Cpu or Emu); the caller
/// checked the sizes ([`DeviceOps::wkv`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn host_wkv(
    be: &crate::wkv7::Backend,
    ver: crate::wkv7::Version,
    t: usize,
    h: usize,
    n: usize,
    x: [&Vec<f32>; 6],
    state: &mut Vec<f32>,
    y: &mut Vec<f32>,
) -> Result<()> {
    let d = crate::wkv7::Dims { b: 1, t, h, n };
    let out = be.forward_v(
        ver,
        &d,
        &crate::wkv7::Inputs {
            r: x[0],
            w: x[1],
            k: x[2],
            v: x[3],
            a: x[4],
            b: x[5],
            h0: Some(state),
        },
    )?;
    *y = out.y;
    *state = out.h_t;
    Ok(())
}
