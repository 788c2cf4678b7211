//! The three device operations of training-free token reduction (issue 15,
//! docs/token-reduction.md) behind [`ReduceOps`], an extension of
//! [`DeviceOps`], with the usual three implementations:
//!
//! | impl | score / match / gather |
//! |---|---|
//! | [`super::cpu::CpuOps`] | the Rust twins in [`twin`] |
//! | [`super::emu::EmuOps`] | `kernels/reduce_ops.cu` on the CPU emulator |
//! | [`super::cuda::CudaOps`] | `kernels/reduce_ops.cu` on the GPU |
//!
//! The kernels sum in a fixed order (32 lane partials, then the
//! xor-butterfly of a warp) with separate multiplies and adds, and the twins
//! reproduce that order, so the emulated kernels equal the twins bit for
//! bit (tests/token_reduction.rs checks it on random data).
//!
//! Token indices cross to the device as exact f32 values; the provided
//! methods take them from the host, check them (every index in range, at
//! most 2^24 rows) and upload them, so a kernel never reads out of bounds.
//! Scores and matches come back to the host: the O(T log T) sort and the
//! choice of links are host work (see `model::reduce`).
use super::counters::Op;
use super::{need, DeviceOps};
use crate::error::{ReduceError, Result};

/// Largest row count (and CSR length) the f32-encoded indices hold exactly.
pub const MAX_ROWS: usize = 1 << 24;

/// How a token's feature row `[C]` becomes its importance score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// `mean_j max(0, x_j)`: the paper's "clip" score (Eq. 5).
    Clip,
    /// `mean_j |x_j|`.
    L1,
    /// `sqrt(mean_j x_j²)`.
    L2,
    /// `mean_j x_j` (unclipped).
    Mean,
    /// `mean_j (1 − x_j)`: "erase strength" when the row is the decay `w`.
    Erase,
}

impl Metric {
    /// The `metric` code of `TokScoreParams` (kernels/params.h).
    pub fn code(self) -> i32 {
        match self {
            Metric::Clip => 0,
            Metric::L1 => 1,
            Metric::L2 => 2,
            Metric::Mean => 3,
            Metric::Erase => 4,
        }
    }
}

/// The per-token vector of an anchor layer that scores (and, with
/// the `Similarity::Feature` of `model::reduce`, matches) the tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Source {
    /// The raw WKV output `y = S r` (all heads, before `ln_x`): the
    /// analogue of the paper's SSM output.
    #[default]
    Wkv,
    /// `(ln_x(y) + bonus) ⊙ g`, the input of the output projection.
    Gated,
    /// The time mix's output `dx` (after `W_o`, what the released code scores).
    Out,
    /// The decay `w` (with [`Metric::Erase`]: "erase strength" `mean(1 − w)`).
    Decay,
}

/// An order-preserving gather / weighted scatter-mean in CSR form: output
/// row `k` is the `w`-weighted mean of input rows `src[ptr[k]..ptr[k+1]]`,
/// summed in that order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GatherMap {
    /// Rows of the input.
    pub rows_in: usize,
    /// `[K + 1]` offsets into `src` / `w`, from 0 to `src.len()`.
    pub ptr: Vec<u32>,
    /// Input row of each term.
    pub src: Vec<u32>,
    /// Weight of each term (> 0).
    pub w: Vec<f32>,
}

impl GatherMap {
    /// Output rows.
    pub fn rows_out(&self) -> usize {
        self.ptr.len().saturating_sub(1)
    }

    /// The identity map on `rows` rows (weight 1 each).
    pub fn identity(rows: usize) -> Self {
        GatherMap {
            rows_in: rows,
            ptr: (0..=rows as u32).collect(),
            src: (0..rows as u32).collect(),
            w: vec![1.0; rows],
        }
    }

    /// Checks the map: offsets from 0, non-decreasing, every output row
    /// non-empty, every source in range, every weight finite and > 0, at
    /// most [`MAX_ROWS`] rows and terms.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(ReduceError::Map(m).into());
        if self.ptr.first() != Some(&0) {
            return bad("ptr must start at 0".into());
        }
        if self.rows_in > MAX_ROWS || self.src.len() > MAX_ROWS {
            return bad(format!("more than {MAX_ROWS} rows or terms"));
        }
        if self.src.len() != self.w.len()
            || *self.ptr.last().unwrap_or(&0) as usize != self.src.len()
        {
            return bad(format!(
                "ptr ends at {:?} but there are {} sources and {} weights",
                self.ptr.last(),
                self.src.len(),
                self.w.len()
            ));
        }
        if let Some(k) = self.ptr.windows(2).position(|p| p[1] <= p[0]) {
            return bad(format!("output row {k} is empty or ptr decreases there"));
        }
        if let Some(&s) = self.src.iter().find(|&&s| s as usize >= self.rows_in) {
            return bad(format!(
                "source row {s} out of range ({} rows)",
                self.rows_in
            ));
        }
        if let Some(&w) = self.w.iter().find(|w| !(w.is_finite() && **w > 0.0)) {
            return bad(format!("weight {w} is not finite and positive"));
        }
        Ok(())
    }
}

/// The Rust twins of `kernels/reduce_ops.cu`, on host `f32` slices (also
/// what the CPU model runs).
pub mod twin {
    use super::{GatherMap, Metric};
    use rayon::prelude::*;

    /// The kernels' warp sum: lane partials `v[32]`, xor butterfly. After
    /// the round of offset `o` lanes `l` and `l ^ o` hold the same value
    /// (`a + b` and `b + a` round alike), so only lanes `l < o` are carried:
    /// the same 5 rounds, 31 additions.
    fn warp_sum(mut v: [f32; 32]) -> f32 {
        let mut o = 16;
        while o > 0 {
            for l in 0..o {
                v[l] += v[l + o];
            }
            o >>= 1;
        }
        v[0]
    }

    /// Lane partials of `f(j)` over `j < c`, each lane summing `j = lane,
    /// lane + 32, …` in order, then [`warp_sum`].
    fn lane_sum(c: usize, f: impl Fn(usize) -> f32) -> f32 {
        let mut v = [0f32; 32];
        for (lane, p) in v.iter_mut().enumerate() {
            let mut j = lane;
            while j < c {
                *p += f(j);
                j += 32;
            }
        }
        warp_sum(v)
    }

    /// `red_score_f32`: one score per row of `x [rows, C]`.
    pub fn score(x: &[f32], rows: usize, c: usize, metric: Metric) -> Vec<f32> {
        (0..rows)
            .map(|r| {
                let x = &x[r * c..(r + 1) * c];
                let s = lane_sum(c, |j| {
                    let v = x[j];
                    match metric {
                        Metric::Clip => {
                            if v > 0.0 {
                                v
                            } else {
                                0.0
                            }
                        }
                        Metric::L1 => v.abs(),
                        Metric::L2 => v * v,
                        Metric::Mean => v,
                        Metric::Erase => 1.0 - v,
                    }
                }) / c as f32;
                if metric == Metric::L2 {
                    s.sqrt()
                } else {
                    s
                }
            })
            .collect()
    }

    /// [`lane_sum`] of `p_j · q_j`, written lane-block by lane-block (32
    /// lanes at a time, the same order per lane) so that it vectorizes.
    fn lane_dot(p: &[f32], q: &[f32]) -> f32 {
        let mut v = [0f32; 32];
        let mut pc = p.chunks_exact(32);
        let mut qc = q.chunks_exact(32);
        for (pb, qb) in (&mut pc).zip(&mut qc) {
            for l in 0..32 {
                v[l] += pb[l] * qb[l];
            }
        }
        for (l, (x, y)) in pc.remainder().iter().zip(qc.remainder()).enumerate() {
            v[l] += x * y;
        }
        warp_sum(v)
    }

    /// `red_match_f32`: for each row `a[i]` of `x [·, C]`, the position in
    /// `b` of its most cosine-similar row (first on ties) and that cosine.
    pub fn matching(x: &[f32], c: usize, a: &[u32], b: &[u32]) -> (Vec<u32>, Vec<f32>) {
        let row = |i: u32| &x[i as usize * c..(i as usize + 1) * c];
        let norm = |r: &[f32]| lane_dot(r, r).sqrt();
        // the kernel computes |b| per pair; the value is the same, so once here
        let nbs: Vec<f32> = b.iter().map(|&bi| norm(row(bi))).collect();
        let out: Vec<(u32, f32)> = a
            .par_iter()
            .map(|&ai| {
                let xa = row(ai);
                let na = norm(xa);
                let mut best = f32::NEG_INFINITY;
                let mut arg = 0u32;
                for (bj, &bi) in b.iter().enumerate() {
                    let xb = row(bi);
                    let d = lane_dot(xa, xb);
                    let nb = nbs[bj];
                    let cs = d / (na * nb).max(1e-12);
                    if cs > best {
                        best = cs;
                        arg = bj as u32;
                    }
                }
                (arg, best)
            })
            .collect();
        out.into_iter().unzip()
    }

    /// `red_gather_f32`: `out [K, C]` from `x [rows_in, C]` through `map`.
    pub fn gather(x: &[f32], c: usize, map: &GatherMap) -> Vec<f32> {
        let k = map.rows_out();
        let mut out = vec![0f32; k * c];
        out.par_chunks_mut(c.max(1)).enumerate().for_each(|(r, o)| {
            let (e0, e1) = (map.ptr[r] as usize, map.ptr[r + 1] as usize);
            for (j, oj) in o.iter_mut().enumerate() {
                let (mut acc, mut ws) = (0f32, 0f32);
                for e in e0..e1 {
                    let w = map.w[e];
                    acc += w * x[map.src[e] as usize * c + j];
                    ws += w;
                }
                *oj = acc / ws;
            }
        });
        out
    }
}

/// Token-reduction operations on a [`DeviceOps`] backend's buffers.
///
/// The public methods are provided: they check sizes and indices once, here,
/// move the small index / score vectors between host and device, and call
/// the backend's `raw_*` hook, which may rely on those checks.
pub trait ReduceOps: DeviceOps {
    /// The score of each of the `rows` rows of `x [rows, C]` (to the host).
    fn tok_score(&self, rows: usize, c: usize, metric: Metric, x: &Self::Buf) -> Result<Vec<f32>> {
        check_dims("tok_score", rows, c)?;
        need("x", self.len(x), 0, rows * c)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let mut s = self.zeros(rows)?;
        self.counters().launch(Op::TokScore);
        // SAFETY: x holds rows·C floats and s rows (checked / allocated just above).
        unsafe { self.raw_tok_score(rows, c, metric, x, &mut s)? };
        let mut h = self.download(&s)?;
        h.truncate(rows);
        Ok(h)
    }
    /// # Safety
    /// `x` ≥ rows·C and `out` ≥ rows elements, C ≥ 1 (what
    /// [`Self::tok_score`] checks).
    #[doc(hidden)]
    unsafe fn raw_tok_score(
        &self,
        rows: usize,
        c: usize,
        metric: Metric,
        x: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// For each row index in `a`, the position in `b` of the most
    /// cosine-similar row of `x [rows, C]` (first on ties) and the cosine
    /// (to the host).
    fn tok_match(
        &self,
        rows: usize,
        c: usize,
        x: &Self::Buf,
        a: &[u32],
        b: &[u32],
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        check_dims("tok_match", rows, c)?;
        need("x", self.len(x), 0, rows * c)?;
        if let Some(&i) = a.iter().chain(b).find(|&&i| i as usize >= rows) {
            return Err(ReduceError::Map(format!("row {i} out of range ({rows} rows)")).into());
        }
        if a.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if b.is_empty() {
            return Err(ReduceError::Map("no candidate to match against".into()).into());
        }
        let ab = self.upload(&as_f32(a))?;
        let bb = self.upload(&as_f32(b))?;
        let mut best = self.zeros(a.len())?;
        let mut sim = self.zeros(a.len())?;
        self.counters().launch(Op::TokMatch);
        // SAFETY: every index of a and b is < rows (checked above), x holds
        // rows·C floats, best and sim |a| each.
        unsafe { self.raw_tok_match(a.len(), b.len(), c, x, &ab, &bb, &mut best, &mut sim)? };
        let best = self.download(&best)?;
        let mut sim = self.download(&sim)?;
        sim.truncate(a.len());
        Ok((best[..a.len()].iter().map(|&v| v as u32).collect(), sim))
    }
    /// # Safety
    /// `a_idx` / `b_idx` hold `na` / `nb` indices (as f32) of rows of `x`
    /// `[·, C]`, all in range; `best`, `sim` ≥ na (what
    /// [`Self::tok_match`] checks).
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_tok_match(
        &self,
        na: usize,
        nb: usize,
        c: usize,
        x: &Self::Buf,
        a_idx: &Self::Buf,
        b_idx: &Self::Buf,
        best: &mut Self::Buf,
        sim: &mut Self::Buf,
    ) -> Result<()>;

    /// `out[..K·C]` = the gather / weighted scatter-mean `map` of
    /// `x [map.rows_in, C]` (`out` distinct from `x`).
    fn tok_gather(
        &self,
        c: usize,
        x: &Self::Buf,
        map: &GatherMap,
        out: &mut Self::Buf,
    ) -> Result<()> {
        map.check()?;
        check_dims("tok_gather", map.rows_in, c)?;
        need("x", self.len(x), 0, map.rows_in * c)?;
        let k = map.rows_out();
        need("out", self.len(out), 0, k * c)?;
        if k == 0 {
            return Ok(());
        }
        let ptr = self.upload(&as_f32(&map.ptr))?;
        let src = self.upload(&as_f32(&map.src))?;
        let w = self.upload(&map.w)?;
        self.counters().launch(Op::TokGather);
        // SAFETY: the map was checked (offsets, sources < rows_in, at most
        // 2^24 of each, so exact as f32); x holds rows_in·C, out K·C.
        unsafe { self.raw_tok_gather(k, c, x, &ptr, &src, &w, out) }
    }
    /// # Safety
    /// `ptr`, `src`, `w` form a checked [`GatherMap`] of `k` output rows
    /// over rows of `x [·, C]`; out ≥ K·C and distinct from x.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_tok_gather(
        &self,
        k: usize,
        c: usize,
        x: &Self::Buf,
        ptr: &Self::Buf,
        src: &Self::Buf,
        w: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()>;
}

fn check_dims(what: &str, rows: usize, c: usize) -> Result<()> {
    if c == 0 {
        return Err(crate::Error::Invalid(format!(
            "{what}: C must be at least 1"
        )));
    }
    if rows > MAX_ROWS {
        return Err(ReduceError::Map(format!("{what}: more than {MAX_ROWS} rows")).into());
    }
    super::fits_i32(what, &[rows, c])
}

fn as_f32(v: &[u32]) -> Vec<f32> {
    v.iter().map(|&i| i as f32).collect()
}

// ---- CPU: the twins -------------------------------------------------------

mod cpu_impl {
    use super::{twin, GatherMap, Metric, ReduceOps};
    use crate::error::Result;
    use crate::ops::cpu::{CpuOps, CpuReal};

    fn f32s<R: CpuReal>(x: &[R]) -> Vec<f32> {
        x.iter().map(|v| v.to_f32()).collect()
    }
    fn put<R: CpuReal>(dst: &mut [R], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = <R as crate::real::Real>::from_f64(s as f64);
        }
    }
    fn idx<R: CpuReal>(x: &[R], n: usize) -> Vec<u32> {
        x[..n].iter().map(|v| v.to_f32() as u32).collect()
    }

    impl<R: CpuReal> ReduceOps for CpuOps<R> {
        unsafe fn raw_tok_score(
            &self,
            rows: usize,
            c: usize,
            metric: Metric,
            x: &Vec<R>,
            out: &mut Vec<R>,
        ) -> Result<()> {
            put(out, &twin::score(&f32s(&x[..rows * c]), rows, c, metric));
            Ok(())
        }

        unsafe fn raw_tok_match(
            &self,
            na: usize,
            nb: usize,
            c: usize,
            x: &Vec<R>,
            a_idx: &Vec<R>,
            b_idx: &Vec<R>,
            best: &mut Vec<R>,
            sim: &mut Vec<R>,
        ) -> Result<()> {
            let (f, g) = twin::matching(&f32s(x), c, &idx(a_idx, na), &idx(b_idx, nb));
            put(best, &f.iter().map(|&v| v as f32).collect::<Vec<_>>());
            put(sim, &g);
            Ok(())
        }

        unsafe fn raw_tok_gather(
            &self,
            k: usize,
            c: usize,
            x: &Vec<R>,
            ptr: &Vec<R>,
            src: &Vec<R>,
            w: &Vec<R>,
            out: &mut Vec<R>,
        ) -> Result<()> {
            let ptr = idx(ptr, k + 1);
            let n = ptr[k] as usize;
            let map = GatherMap {
                rows_in: 0, // unused by the twin
                ptr,
                src: idx(src, n),
                w: f32s(&w[..n]),
            };
            put(out, &twin::gather(&f32s(x), c, &map));
            Ok(())
        }
    }
}

// ---- the emulator: kernels/reduce_ops.cu on the CPU -----------------------

mod emu_impl {
    use super::{Metric, ReduceOps};
    use crate::emu::launch_ops;
    use crate::error::Result;
    use crate::ops::emu::EmuOps;
    use crate::params::{TokGatherParams, TokMatchParams, TokScoreParams};

    fn ptr(s: &[f32]) -> u64 {
        s.as_ptr() as u64
    }
    fn ptr_mut(s: &mut [f32]) -> u64 {
        s.as_mut_ptr() as u64
    }

    impl ReduceOps for EmuOps {
        unsafe fn raw_tok_score(
            &self,
            rows: usize,
            c: usize,
            metric: Metric,
            x: &Vec<f32>,
            out: &mut Vec<f32>,
        ) -> Result<()> {
            let p = TokScoreParams {
                rows: rows as i32,
                C: c as i32,
                metric: metric.code(),
                x: ptr(x),
                score: ptr_mut(out),
            };
            // SAFETY: x ≥ rows·C and out ≥ rows floats (checked by the
            // caller); out is a distinct &mut borrow; both alive for the call.
            unsafe {
                launch_ops(
                    "red_score_f32",
                    self.geom.rows(rows).0,
                    self.geom.rows(rows).1,
                    &p,
                )
            }
        }

        unsafe fn raw_tok_match(
            &self,
            na: usize,
            nb: usize,
            c: usize,
            x: &Vec<f32>,
            a_idx: &Vec<f32>,
            b_idx: &Vec<f32>,
            best: &mut Vec<f32>,
            sim: &mut Vec<f32>,
        ) -> Result<()> {
            let p = TokMatchParams {
                na: na as i32,
                nb: nb as i32,
                C: c as i32,
                x: ptr(x),
                a_idx: ptr(a_idx),
                b_idx: ptr(b_idx),
                best: ptr_mut(best),
                sim: ptr_mut(sim),
            };
            let g = self.geom.rows(na);
            // SAFETY: the indices are in range rows of x (checked by the
            // caller), best and sim hold na floats and are distinct &mut
            // borrows; all alive for the call.
            unsafe { launch_ops("red_match_f32", g.0, g.1, &p) }
        }

        unsafe fn raw_tok_gather(
            &self,
            k: usize,
            c: usize,
            x: &Vec<f32>,
            ptr_b: &Vec<f32>,
            src: &Vec<f32>,
            w: &Vec<f32>,
            out: &mut Vec<f32>,
        ) -> Result<()> {
            let p = TokGatherParams {
                K: k as i32,
                C: c as i32,
                x: ptr(x),
                ptr: ptr(ptr_b),
                src: ptr(src),
                w: ptr(w),
                out: ptr_mut(out),
            };
            let g = self.geom.elems(k * c);
            // SAFETY: a checked map (sources in range of x), out ≥ K·C and a
            // distinct &mut borrow; all alive for the call.
            unsafe { launch_ops("red_gather_f32", g.0, g.1, &p) }
        }
    }
}

// ---- CUDA ------------------------------------------------------------------

mod cuda_impl {
    use super::{Metric, ReduceOps};
    use crate::error::Result;
    use crate::ops::cuda::CudaOps;
    use crate::params::{TokGatherParams, TokMatchParams, TokScoreParams};
    use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};

    // SAFETY (all three): #[repr(C)] plain-old-data structs generated from
    // kernels/params.h (i32 and u64 fields only), matching the C structs the
    // kernels take by value; any bit pattern is valid.
    unsafe impl DeviceRepr for TokScoreParams {}
    // SAFETY: as above.
    unsafe impl DeviceRepr for TokMatchParams {}
    // SAFETY: as above.
    unsafe impl DeviceRepr for TokGatherParams {}

    const STEM: &str = "reduce_ops";

    impl ReduceOps for CudaOps {
        unsafe fn raw_tok_score(
            &self,
            rows: usize,
            c: usize,
            metric: Metric,
            x: &CudaSlice<f32>,
            out: &mut CudaSlice<f32>,
        ) -> Result<()> {
            let st = &self.gpu().stream;
            let (xp, _g1) = x.device_ptr(st);
            let (op, _g2) = out.device_ptr_mut(st);
            let p = TokScoreParams {
                rows: rows as i32,
                C: c as i32,
                metric: metric.code(),
                x: xp,
                score: op,
            };
            // SAFETY: x ≥ rows·C, out ≥ rows floats (checked by the caller);
            // the guards keep both alive until the launch is queued.
            unsafe { self.launch_in(STEM, "red_score_f32", self.geom.rows(rows), &p) }
        }

        unsafe fn raw_tok_match(
            &self,
            na: usize,
            nb: usize,
            c: usize,
            x: &CudaSlice<f32>,
            a_idx: &CudaSlice<f32>,
            b_idx: &CudaSlice<f32>,
            best: &mut CudaSlice<f32>,
            sim: &mut CudaSlice<f32>,
        ) -> Result<()> {
            let st = &self.gpu().stream;
            let (xp, _g1) = x.device_ptr(st);
            let (ap, _g2) = a_idx.device_ptr(st);
            let (bp, _g3) = b_idx.device_ptr(st);
            let (fp, _g4) = best.device_ptr_mut(st);
            let (sp, _g5) = sim.device_ptr_mut(st);
            let p = TokMatchParams {
                na: na as i32,
                nb: nb as i32,
                C: c as i32,
                x: xp,
                a_idx: ap,
                b_idx: bp,
                best: fp,
                sim: sp,
            };
            // SAFETY: indices in range of x (checked by the caller), best and
            // sim ≥ na floats, distinct buffers; guards alive until queued.
            unsafe { self.launch_in(STEM, "red_match_f32", self.geom.rows(na), &p) }
        }

        unsafe fn raw_tok_gather(
            &self,
            k: usize,
            c: usize,
            x: &CudaSlice<f32>,
            ptr: &CudaSlice<f32>,
            src: &CudaSlice<f32>,
            w: &CudaSlice<f32>,
            out: &mut CudaSlice<f32>,
        ) -> Result<()> {
            let st = &self.gpu().stream;
            let (xp, _g1) = x.device_ptr(st);
            let (pp, _g2) = ptr.device_ptr(st);
            let (sp, _g3) = src.device_ptr(st);
            let (wp, _g4) = w.device_ptr(st);
            let (op, _g5) = out.device_ptr_mut(st);
            let p = TokGatherParams {
                K: k as i32,
                C: c as i32,
                x: xp,
                ptr: pp,
                src: sp,
                w: wp,
                out: op,
            };
            // SAFETY: a checked map (sources in range of x), out ≥ K·C and
            // distinct from x; guards alive until queued.
            unsafe { self.launch_in(STEM, "red_gather_f32", self.geom.elems(k * c), &p) }
        }
    }
}
