//! Packed f32 GEMM / GEMV and the WKV-7 recurrence rows, with runtime CPU
//! feature dispatch (AVX-512, AVX2+FMA, or portable code the compiler
//! vectorises for the baseline target).
//!
//! Weights are packed once into panels of [`NR`] output columns:
//! `panel p = W[k][p*NR .. p*NR+NR]` for `k = 0..K`, contiguous, zero-padded
//! at the right edge. The micro-kernel keeps an `MR × NR` tile of outputs in
//! registers and streams one panel, so both operands are read sequentially.
use std::sync::OnceLock;

use rayon::prelude::*;

/// Output columns per packed panel (one AVX-512 or two AVX2 registers).
pub(crate) const NR: usize = 16;
/// Rows per register tile.
const MR: usize = 6;
/// Below this many multiply-adds a GEMM runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 18;

/// Instruction set chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Generic,
    Avx2,
    Avx512,
}

/// The instruction set used by the kernels: the best one the CPU has, or the
/// one named by `RWKV_TUNE_CPU` (`generic`, `avx2`, `avx512`) if it is supported.
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let has512 = std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma");
            let has2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            let want = std::env::var("RWKV_TUNE_CPU").unwrap_or_default();
            match want.as_str() {
                "generic" => Isa::Generic,
                "avx2" if has2 => Isa::Avx2,
                _ if has512 && want != "avx2" => Isa::Avx512,
                _ if has2 => Isa::Avx2,
                _ => Isa::Generic,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Isa::Generic
        }
    })
}

/// Defines a dispatching function `$name` over an `#[inline(always)]`
/// implementation `$imp::<FMA>` compiled three times.
macro_rules! dispatch {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) => $imp:ident) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v512($($arg: $ty),*) { $imp::<true>($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v2($($arg: $ty),*) { $imp::<true>($($arg),*) }
                match isa() {
                    // SAFETY: `isa()` returns Avx512 only when the CPU reports
                    // avx512f, avx2 and fma.
                    Isa::Avx512 => return unsafe { v512($($arg),*) },
                    // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
                    Isa::Avx2 => return unsafe { v2($($arg),*) },
                    Isa::Generic => {}
                }
            }
            $imp::<false>($($arg),*)
        }
    };
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// A weight matrix packed for `y[m, n] = x[m, k] · W[k, n]`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Packed {
    /// Input width K.
    pub k: usize,
    /// Output width N.
    pub n: usize,
    data: Vec<f32>,
}

impl Packed {
    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Packs `w` stored `[k, n]` (input-major, e.g. the LoRA factors `w1: [C, D]`).
    pub fn from_in_out(w: &[f32], k: usize, n: usize) -> Packed {
        debug_assert_eq!(w.len(), k * n);
        let panels = n.div_ceil(NR);
        let mut data = vec![0.0; panels * k * NR];
        for p in 0..panels {
            for kk in 0..k {
                for j in 0..NR {
                    let col = p * NR + j;
                    if col < n {
                        data[(p * k + kk) * NR + j] = w[kk * n + col];
                    }
                }
            }
        }
        Packed { k, n, data }
    }

    /// Packs `w` stored `[n, k]` (output-major, `nn.Linear` weights).
    pub fn from_out_in(w: &[f32], n: usize, k: usize) -> Packed {
        debug_assert_eq!(w.len(), k * n);
        let panels = n.div_ceil(NR);
        let mut data = vec![0.0; panels * k * NR];
        for p in 0..panels {
            for j in 0..NR {
                let col = p * NR + j;
                if col >= n {
                    continue;
                }
                let row = &w[col * k..col * k + k];
                for (kk, &v) in row.iter().enumerate() {
                    data[(p * k + kk) * NR + j] = v;
                }
            }
        }
        Packed { k, n, data }
    }
}

#[inline(always)]
fn tile<const R: usize, const FMA: bool>(
    x: &[f32],
    ldx: usize,
    k: usize,
    panel: &[f32],
    y: &mut [f32],
    ldy: usize,
    ncols: usize,
) {
    let mut acc = [[0.0f32; NR]; R];
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * ldx..r * ldx + k]);
    for (p, w) in panel.chunks_exact(NR).take(k).enumerate() {
        for r in 0..R {
            let a = rows[r][p];
            for j in 0..NR {
                acc[r][j] = fmadd::<FMA>(a, w[j], acc[r][j]);
            }
        }
    }
    for r in 0..R {
        y[r * ldy..r * ldy + ncols].copy_from_slice(&acc[r][..ncols]);
    }
}

/// Serial GEMM on a block of rows and a range of panels; `y` has row stride
/// `ldy` and its column 0 is panel `p0`'s first column.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_impl<const FMA: bool>(
    x: &[f32],
    m: usize,
    w: &Packed,
    p0: usize,
    p1: usize,
    y: &mut [f32],
    ldy: usize,
) {
    let k = w.k;
    for p in p0..p1 {
        let panel = &w.data[p * k * NR..(p + 1) * k * NR];
        let ncols = NR.min(w.n - p * NR);
        let yc = (p - p0) * NR;
        let mut r = 0;
        while r + MR <= m {
            tile::<MR, FMA>(&x[r * k..], k, k, panel, &mut y[r * ldy + yc..], ldy, ncols);
            r += MR;
        }
        let (xs, ys) = (&x[r * k..], &mut y[r * ldy + yc..]);
        match m - r {
            1 => tile::<1, FMA>(xs, k, k, panel, ys, ldy, ncols),
            2 => tile::<2, FMA>(xs, k, k, panel, ys, ldy, ncols),
            3 => tile::<3, FMA>(xs, k, k, panel, ys, ldy, ncols),
            4 => tile::<4, FMA>(xs, k, k, panel, ys, ldy, ncols),
            5 => tile::<5, FMA>(xs, k, k, panel, ys, ldy, ncols),
            _ => {}
        }
    }
}

dispatch!(fn gemm_serial(x: &[f32], m: usize, w: &Packed, p0: usize, p1: usize, y: &mut [f32], ldy: usize) => gemm_impl);

/// `y[m, n] = x[m, k] · W`, multi-threaded over row blocks (or over column
/// panels when there are few rows and the matrix is large).
pub(crate) fn matmul(x: &[f32], m: usize, w: &Packed, y: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    debug_assert!(x.len() >= m * k && y.len() >= m * n);
    let work = m * k * n;
    let threads = rayon::current_num_threads();
    if work < PAR_MIN_WORK || threads == 1 || m == 0 {
        gemm_serial(x, m, w, 0, w.panels(), y, n);
        return;
    }
    if m >= 4 * MR * threads.min(8) {
        // Row blocks: a multiple of MR rows, about 4 blocks per thread.
        let per = m.div_ceil(threads * 4).div_ceil(MR) * MR;
        y[..m * n].par_chunks_mut(per * n).zip(x[..m * k].par_chunks(per * k)).for_each(
            |(yb, xb)| {
                let rows = xb.len() / k;
                gemm_serial(xb, rows, w, 0, w.panels(), yb, n);
            },
        );
        return;
    }
    // Few rows: split the column panels; each task writes a private block.
    let panels = w.panels();
    let per = panels.div_ceil(threads * 2).max(1);
    let groups: Vec<(usize, Vec<f32>)> = (0..panels.div_ceil(per))
        .into_par_iter()
        .map(|g| {
            let p0 = g * per;
            let p1 = (p0 + per).min(panels);
            let cols = (p1 - p0) * NR;
            let mut buf = vec![0.0; m * cols];
            gemm_serial(x, m, w, p0, p1, &mut buf, cols);
            (p0, buf)
        })
        .collect();
    for (p0, buf) in groups {
        let c0 = p0 * NR;
        let cols = buf.len() / m.max(1);
        let valid = cols.min(n - c0);
        for r in 0..m {
            y[r * n + c0..r * n + c0 + valid].copy_from_slice(&buf[r * cols..r * cols + valid]);
        }
    }
}

/// Dot product with 16 independent partial sums (vectorisable).
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] = fmadd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let mut s = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    for l in (0..8).rev() {
        acc[l] += acc[l + 8];
    }
    for l in (0..4).rev() {
        acc[l] += acc[l + 4];
    }
    (acc[0] + acc[2]) + (acc[1] + acc[3]) + s
}

/// Per-token inputs of the WKV recurrence, each `[T, C]` row-major.
#[derive(Clone, Copy)]
pub(crate) struct WkvIn<'a> {
    pub r: &'a [f32],
    pub w: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
}

/// Runs the recurrence for state rows `row0..row0+rows` (global row index
/// `h*N + i`, i = value channel) over all `t` tokens. `s` holds those rows
/// (`rows × n`), `y` receives `[t, rows]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn wkv_rows_impl<const FMA: bool>(
    inp: &WkvIn<'_>,
    t: usize,
    c: usize,
    n: usize,
    row0: usize,
    s: &mut [f32],
    y: &mut [f32],
) {
    let rows = s.len() / n;
    for tt in 0..t {
        let base = tt * c;
        let mut done = 0;
        while done < rows {
            let gr = row0 + done;
            let h0 = (gr / n) * n;
            let at = &inp.a[base + h0..base + h0 + n];
            let bt = &inp.b[base + h0..base + h0 + n];
            let wt = &inp.w[base + h0..base + h0 + n];
            let kt = &inp.k[base + h0..base + h0 + n];
            let rt = &inp.r[base + h0..base + h0 + n];
            // Rows of this head handled in this pass.
            let end = (rows).min(done + (h0 + n - gr));
            for lr in done..end {
                let vi = inp.v[base + row0 + lr];
                let srow = &mut s[lr * n..lr * n + n];
                let sa = dot::<FMA>(srow, at);
                for j in 0..n {
                    srow[j] = fmadd::<FMA>(srow[j], wt[j], fmadd::<FMA>(sa, bt[j], vi * kt[j]));
                }
                y[tt * rows + lr] = dot::<FMA>(srow, rt);
            }
            done = end;
        }
    }
}

dispatch!(fn wkv_rows(inp: &WkvIn<'_>, t: usize, c: usize, n: usize, row0: usize, s: &mut [f32], y: &mut [f32]) => wkv_rows_impl);

/// The WKV-7 recurrence over `t` tokens for all heads: updates `state`
/// (`[H, N, N]` value-major) in place and writes `y` (`[T, C]`).
pub(crate) fn wkv(inp: &WkvIn<'_>, t: usize, c: usize, n: usize, state: &mut [f32], y: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let work = t * c * n;
    if work < PAR_MIN_WORK / 2 || threads == 1 {
        let mut yb = vec![0.0; t * c];
        wkv_rows(inp, t, c, n, 0, state, &mut yb);
        y[..t * c].copy_from_slice(&yb);
        return;
    }
    let per = c.div_ceil(threads).max(1);
    let parts: Vec<(usize, Vec<f32>)> = state
        .par_chunks_mut(per * n)
        .enumerate()
        .map(|(i, s)| {
            let rows = s.len() / n;
            let mut yb = vec![0.0; t * rows];
            wkv_rows(inp, t, c, n, i * per, s, &mut yb);
            (i * per, yb)
        })
        .collect();
    for (row0, yb) in parts {
        let rows = yb.len() / t.max(1);
        for tt in 0..t {
            y[tt * c + row0..tt * c + row0 + rows].copy_from_slice(&yb[tt * rows..tt * rows + rows]);
        }
    }
}
