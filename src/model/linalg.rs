//! Packed f32 GEMM / GEMV and the WKV-7 recurrence rows, with runtime CPU
//! feature dispatch (AVX-512, AVX2+FMA, or portable code the compiler
//! vectorises for the baseline target).
//!
//! Weights are packed once into panels of [`NR`] output columns:
//! `panel p = W[k][p*NR .. p*NR+NR]` for `k = 0..K`, contiguous, zero-padded
//! at the right edge. The micro-kernel keeps an `MR × NR` tile of outputs in
//! registers and streams one panel, so both operands are read sequentially.
#![allow(clippy::needless_range_loop)]
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
            let has2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
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
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v512($($arg: $ty),*) { $imp::<true>($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
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
    ldx: usize,
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
            tile::<MR, FMA>(
                &x[r * ldx..],
                ldx,
                k,
                panel,
                &mut y[r * ldy + yc..],
                ldy,
                ncols,
            );
            r += MR;
        }
        if r == m {
            continue;
        }
        let (xs, ys) = (&x[r * ldx..], &mut y[r * ldy + yc..]);
        match m - r {
            1 => tile::<1, FMA>(xs, ldx, k, panel, ys, ldy, ncols),
            2 => tile::<2, FMA>(xs, ldx, k, panel, ys, ldy, ncols),
            3 => tile::<3, FMA>(xs, ldx, k, panel, ys, ldy, ncols),
            4 => tile::<4, FMA>(xs, ldx, k, panel, ys, ldy, ncols),
            5 => tile::<5, FMA>(xs, ldx, k, panel, ys, ldy, ncols),
            _ => {}
        }
    }
}

dispatch!(fn gemm_serial(x: &[f32], ldx: usize, m: usize, w: &Packed, p0: usize, p1: usize, y: &mut [f32], ldy: usize) => gemm_impl);

/// `y[m, n] = x[m, k] · W` where row `i` of x starts at `i * ldx`;
/// multi-threaded over row blocks (or over column panels when there are few
/// rows and the matrix is large).
pub(crate) fn matmul(x: &[f32], ldx: usize, m: usize, w: &Packed, y: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    debug_assert!(m == 0 || (x.len() >= (m - 1) * ldx + k && y.len() >= m * n));
    let work = m * k * n;
    let threads = rayon::current_num_threads();
    if work < PAR_MIN_WORK || threads == 1 || m == 0 {
        gemm_serial(x, ldx, m, w, 0, w.panels(), y, n);
        return;
    }
    if m >= 4 * MR * threads.min(8) {
        // Row blocks: a multiple of MR rows, about 4 blocks per thread.
        let per = m.div_ceil(threads * 4).div_ceil(MR) * MR;
        y[..m * n]
            .par_chunks_mut(per * n)
            .enumerate()
            .for_each(|(i, yb)| {
                let rows = yb.len() / n;
                gemm_serial(&x[i * per * ldx..], ldx, rows, w, 0, w.panels(), yb, n);
            });
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
            gemm_serial(x, ldx, m, w, p0, p1, &mut buf, cols);
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

/// Per-token inputs of the WKV recurrence: one row of `6C` per token holding
/// `r | w | k | v | a | b`, each `[C]`.
#[derive(Clone, Copy)]
pub(crate) struct WkvIn<'a> {
    pub buf: &'a [f32],
}

/// Rows of the state advanced together: the state block is kept transposed
/// (`[N][R]`, key-major) so every product is a broadcast multiply-add over
/// the `R` value rows, with no horizontal sums.
const WKV_R: usize = 16;

/// `R` state rows `i0..i0+R` of one head (head size `N` known at compile
/// time), kept in a local transposed block across all tokens. `s` holds the
/// rows (value-major), `y` is `[t, ldy]` with these rows at column `ycol`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn wkv_group<const N: usize, const R: usize, const FMA: bool>(
    buf: &[f32],
    t: usize,
    c: usize,
    h0: usize,
    i0: usize,
    s: &mut [f32],
    y: &mut [f32],
    ldy: usize,
    ycol: usize,
) {
    let mut st = [[0.0f32; R]; N];
    for r in 0..R {
        for j in 0..N {
            st[j][r] = s[r * N + j];
        }
    }
    let ld = 6 * c;
    for tt in 0..t {
        let row = &buf[tt * ld..(tt + 1) * ld];
        let rt: &[f32; N] = row[h0..h0 + N].try_into().unwrap();
        let wt: &[f32; N] = row[c + h0..c + h0 + N].try_into().unwrap();
        let kt: &[f32; N] = row[2 * c + h0..2 * c + h0 + N].try_into().unwrap();
        let vt: &[f32; R] = row[3 * c + h0 + i0..3 * c + h0 + i0 + R]
            .try_into()
            .unwrap();
        let at: &[f32; N] = row[4 * c + h0..4 * c + h0 + N].try_into().unwrap();
        let bt: &[f32; N] = row[5 * c + h0..5 * c + h0 + N].try_into().unwrap();
        let mut sa = [0.0f32; R];
        for j in 0..N {
            let aj = at[j];
            for r in 0..R {
                sa[r] = fmadd::<FMA>(st[j][r], aj, sa[r]);
            }
        }
        let mut yv = [0.0f32; R];
        for j in 0..N {
            let (wj, bj, kj, rj) = (wt[j], bt[j], kt[j], rt[j]);
            for r in 0..R {
                let v = fmadd::<FMA>(st[j][r], wj, fmadd::<FMA>(sa[r], bj, vt[r] * kj));
                st[j][r] = v;
                yv[r] = fmadd::<FMA>(v, rj, yv[r]);
            }
        }
        y[tt * ldy + ycol..tt * ldy + ycol + R].copy_from_slice(&yv);
    }
    for r in 0..R {
        for j in 0..N {
            s[r * N + j] = st[j][r];
        }
    }
}

/// Any head size: rows one at a time, state in place.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn wkv_row_dyn<const FMA: bool>(
    buf: &[f32],
    t: usize,
    c: usize,
    n: usize,
    h0: usize,
    i: usize,
    srow: &mut [f32],
    y: &mut [f32],
    ldy: usize,
    ycol: usize,
) {
    let ld = 6 * c;
    for tt in 0..t {
        let row = &buf[tt * ld..(tt + 1) * ld];
        let rt = &row[h0..h0 + n];
        let wt = &row[c + h0..c + h0 + n];
        let kt = &row[2 * c + h0..2 * c + h0 + n];
        let vi = row[3 * c + h0 + i];
        let at = &row[4 * c + h0..4 * c + h0 + n];
        let bt = &row[5 * c + h0..5 * c + h0 + n];
        let sa = dot::<FMA>(srow, at);
        for j in 0..n {
            srow[j] = fmadd::<FMA>(srow[j], wt[j], fmadd::<FMA>(sa, bt[j], vi * kt[j]));
        }
        y[tt * ldy + ycol] = dot::<FMA>(srow, rt);
    }
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
    let buf = inp.buf;
    let mut lr = 0;
    while lr < rows {
        let gr = row0 + lr;
        let (h0, i) = ((gr / n) * n, gr % n);
        let left_in_head = n - i;
        let fixed = matches!(n, 32 | 64 | 128);
        let take = if fixed && left_in_head >= WKV_R && rows - lr >= WKV_R {
            WKV_R
        } else {
            1
        };
        let sr = &mut s[lr * n..(lr + take) * n];
        match (n, take) {
            (32, WKV_R) => wkv_group::<32, WKV_R, FMA>(buf, t, c, h0, i, sr, y, rows, lr),
            (64, WKV_R) => wkv_group::<64, WKV_R, FMA>(buf, t, c, h0, i, sr, y, rows, lr),
            (128, WKV_R) => wkv_group::<128, WKV_R, FMA>(buf, t, c, h0, i, sr, y, rows, lr),
            _ => wkv_row_dyn::<FMA>(buf, t, c, n, h0, i, sr, y, rows, lr),
        }
        lr += take;
    }
}

dispatch!(fn wkv_rows(inp: &WkvIn<'_>, t: usize, c: usize, n: usize, row0: usize, s: &mut [f32], y: &mut [f32]) => wkv_rows_impl);

/// The WKV-7 recurrence over `t` tokens for all heads: updates `state`
/// (`[H, N, N]` value-major) in place and writes `y` (`[T, C]`).
pub(crate) fn wkv(inp: &WkvIn<'_>, t: usize, c: usize, n: usize, state: &mut [f32], y: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let work = t * c * n;
    if work < PAR_MIN_WORK / 2 || threads == 1 {
        wkv_rows(inp, t, c, n, 0, state, &mut y[..t * c]);
        return;
    }
    let per = c.div_ceil(threads).div_ceil(WKV_R).max(1) * WKV_R;
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
            y[tt * c + row0..tt * c + row0 + rows]
                .copy_from_slice(&yb[tt * rows..tt * rows + rows]);
        }
    }
}
