//! Counters of the ops layer: op launches per kind, device allocations and
//! host↔device transfers (count and bytes), kept by every backend of
//! [`super::DeviceOps`] and readable at any time (tests assert on them;
//! `tune --verbose` prints them).
//!
//! Counting happens in one place per event: the provided (size-checking)
//! trait methods count the launch of their op, `zeros` / `upload` /
//! `download` / `write` count allocations and transfers, and a backend that
//! allocates or transfers inside an op (a scratch buffer, an upload of
//! targets) reports that through [`Counters::alloc`] / [`Counters::upload`]
//! itself. An "op launch" is one call of a trait op; a backend may run it
//! as more than one kernel (a bf16 GEMM converts its operand first) or as
//! none (the CPU backend).
//!
//! The counters are relaxed atomics: cheap, and exact once the counting
//! thread has joined (tests read them after the work they count).
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! ops {
    ($($v:ident => $s:literal,)*) => {
        /// The kinds of op launch that are counted.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Op { $(#[doc = $s] $v,)* }
        impl Op {
            /// Every kind, in counter order.
            pub const ALL: &'static [Op] = &[$(Op::$v,)*];
            /// The op's name (the trait method's).
            pub fn name(self) -> &'static str {
                match self { $(Op::$v => $s,)* }
            }
        }
    };
}

ops! {
    Copy => "copy",
    Embed => "embed",
    Matmul => "matmul",
    MatmulW => "matmul_w",
    LayerNorm => "layer_norm",
    GroupNorm => "group_norm",
    KkPrep => "kk_prep",
    TokenShift => "token_shift",
    Act => "act",
    ValueResidual => "value_residual",
    Add => "add",
    WkvFwd => "wkv_fwd",
    MatmulT => "matmul_t",
    MatmulTn => "matmul_tn",
    LayerNormBwd => "layer_norm_bwd",
    TokenShiftBwd => "token_shift_bwd",
    ActBwd => "act_bwd",
    KkPrepBwd => "kk_prep_bwd",
    ValueResidualBwd => "value_residual_bwd",
    GroupNormBwd => "group_norm_bwd",
    WkvBwd => "wkv_bwd",
    Xent => "xent",
    Softmax => "softmax",
    OuterAcc => "outer_acc",
    UpFwd => "up_fwd",
    UpBwd => "up_bwd",
    BatchedMatmul => "batched_matmul",
    Adam => "adam",
    Sumsq => "sumsq",
    SumBatch => "sum_batch",
    Reduce => "reduce_acc",
    DbpStep => "dbp_step",
    EyeAxpy => "eye_axpy",
    Fill => "fill",
    LoraIn => "lora_in",
    SdtBwd => "sdt_bwd",
    MaskMul => "mask_mul",
    TokScore => "tok_score",
    TokMatch => "tok_match",
    TokGather => "tok_gather",
}

const N_OPS: usize = Op::ALL.len();

/// Live counters of one ops backend (shared by its clones).
#[derive(Debug)]
pub struct Counters {
    launches: [AtomicU64; N_OPS],
    allocs: AtomicU64,
    alloc_bytes: AtomicU64,
    uploads: AtomicU64,
    upload_bytes: AtomicU64,
    downloads: AtomicU64,
    download_bytes: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            launches: std::array::from_fn(|_| AtomicU64::new(0)),
            allocs: AtomicU64::new(0),
            alloc_bytes: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            upload_bytes: AtomicU64::new(0),
            downloads: AtomicU64::new(0),
            download_bytes: AtomicU64::new(0),
        }
    }
}

fn add(a: &AtomicU64, v: u64) {
    a.fetch_add(v, Ordering::Relaxed);
}

impl Counters {
    /// One launch of `op`.
    pub fn launch(&self, op: Op) {
        add(&self.launches[op as usize], 1);
    }
    /// One device allocation of `bytes`.
    pub fn alloc(&self, bytes: usize) {
        add(&self.allocs, 1);
        add(&self.alloc_bytes, bytes as u64);
    }
    /// One host→device transfer of `bytes`.
    pub fn upload(&self, bytes: usize) {
        add(&self.uploads, 1);
        add(&self.upload_bytes, bytes as u64);
    }
    /// One device→host transfer of `bytes`.
    pub fn download(&self, bytes: usize) {
        add(&self.downloads, 1);
        add(&self.download_bytes, bytes as u64);
    }
    /// The values now.
    pub fn snapshot(&self) -> Snapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            launches: std::array::from_fn(|i| g(&self.launches[i])),
            allocs: g(&self.allocs),
            alloc_bytes: g(&self.alloc_bytes),
            uploads: g(&self.uploads),
            upload_bytes: g(&self.upload_bytes),
            downloads: g(&self.downloads),
            download_bytes: g(&self.download_bytes),
        }
    }
}

/// The counters' values at one moment; `later.since(&earlier)` is what
/// happened in between.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    launches: [u64; N_OPS],
    /// Device allocations.
    pub allocs: u64,
    /// Bytes of those allocations.
    pub alloc_bytes: u64,
    /// Host→device transfers.
    pub uploads: u64,
    /// Bytes of those transfers.
    pub upload_bytes: u64,
    /// Device→host transfers.
    pub downloads: u64,
    /// Bytes of those transfers.
    pub download_bytes: u64,
}

impl Snapshot {
    /// Launches of `op`.
    pub fn launches(&self, op: Op) -> u64 {
        self.launches[op as usize]
    }
    /// Launches of every op.
    pub fn total_launches(&self) -> u64 {
        self.launches.iter().sum()
    }
    /// The difference `self − earlier` (saturating at 0).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            launches: std::array::from_fn(|i| self.launches[i].saturating_sub(earlier.launches[i])),
            allocs: self.allocs.saturating_sub(earlier.allocs),
            alloc_bytes: self.alloc_bytes.saturating_sub(earlier.alloc_bytes),
            uploads: self.uploads.saturating_sub(earlier.uploads),
            upload_bytes: self.upload_bytes.saturating_sub(earlier.upload_bytes),
            downloads: self.downloads.saturating_sub(earlier.downloads),
            download_bytes: self.download_bytes.saturating_sub(earlier.download_bytes),
        }
    }
}

impl fmt::Display for Snapshot {
    /// One line of totals, then the ops that ran: `name ×count`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} op launches, {} device allocations ({} B), {} uploads ({} B), {} downloads ({} B)",
            self.total_launches(),
            self.allocs,
            self.alloc_bytes,
            self.uploads,
            self.upload_bytes,
            self.downloads,
            self.download_bytes
        )?;
        let mut first = true;
        for &op in Op::ALL {
            let n = self.launches(op);
            if n > 0 {
                write!(f, "{}{} ×{n}", if first { "\n  " } else { ", " }, op.name())?;
                first = false;
            }
        }
        Ok(())
    }
}
