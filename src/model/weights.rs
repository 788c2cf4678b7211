//! The RWKV-7 (x070) weights in memory: plain f32 arrays with the official
//! BlinkDL layouts, plus the configuration read off their shapes.
//!
//! Matrix convention: every `[out, in]` matrix is applied as `y = W x`
//! (PyTorch `nn.Linear`); LoRA factors keep the official orientation
//! (`w1: [C, D]`, `w2: [D, C]`, applied as `x @ w1 @ w2`).

/// Model hyper-parameters, all read from tensor shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Number of blocks (layers).
    pub n_layer: usize,
    /// Embedding width C.
    pub n_embd: usize,
    /// Number of heads H (C = H * N).
    pub n_head: usize,
    /// Head size N.
    pub head_size: usize,
    /// Vocabulary size V.
    pub vocab: usize,
    /// LoRA widths of the decay, in-context learning rate, value residual and gate.
    pub d_w: usize,
    /// Rank of the a (in-context learning rate) LoRA.
    pub d_a: usize,
    /// Rank of the value-residual LoRA.
    pub d_v: usize,
    /// Rank of the gate LoRA.
    pub d_g: usize,
    /// FFN hidden width (4C in released models).
    pub d_ffn: usize,
}

/// LayerNorm weight and bias, each `[C]`.
#[derive(Clone, Debug, Default)]
pub struct LayerNorm {
    /// Scale `[C]`.
    pub weight: Vec<f32>,
    /// Shift `[C]`.
    pub bias: Vec<f32>,
}

/// One time-mix (attention) block. Shapes with C = n_embd, H, N = head size.
#[derive(Clone, Debug, Default)]
pub struct TimeMix {
    /// Token-shift lerp coefficients, each `[C]` (stored `[1,1,C]`).
    pub x_r: Vec<f32>,
    /// Token-shift mix of the decay input `[C]`.
    pub x_w: Vec<f32>,
    /// Token-shift mix of the key input `[C]`.
    pub x_k: Vec<f32>,
    /// Token-shift mix of the value input `[C]`.
    pub x_v: Vec<f32>,
    /// Token-shift mix of the a input `[C]`.
    pub x_a: Vec<f32>,
    /// Token-shift mix of the gate input `[C]`.
    pub x_g: Vec<f32>,
    /// Decay: w0 `[C]`, w1 `[C, d_w]`, w2 `[d_w, C]`.
    pub w0: Vec<f32>,
    /// Decay LoRA down-projection.
    pub w1: Vec<f32>,
    /// Decay LoRA up-projection.
    pub w2: Vec<f32>,
    /// In-context learning rate: a0 `[C]`, a1 `[C, d_a]`, a2 `[d_a, C]`.
    pub a0: Vec<f32>,
    /// a LoRA down-projection.
    pub a1: Vec<f32>,
    /// a LoRA up-projection.
    pub a2: Vec<f32>,
    /// Value residual (absent in layer 0): v0 `[C]`, v1 `[C, d_v]`, v2 `[d_v, C]`.
    pub v0: Option<Vec<f32>>,
    /// Value-residual LoRA down-projection (absent in layer 0).
    pub v1: Option<Vec<f32>>,
    /// Value-residual LoRA up-projection (absent in layer 0).
    pub v2: Option<Vec<f32>>,
    /// Gate: g1 `[C, d_g]`, g2 `[d_g, C]`.
    pub g1: Vec<f32>,
    /// Gate LoRA up-projection.
    pub g2: Vec<f32>,
    /// k_k, k_a `[C]`; r_k `[H, N]`.
    pub k_k: Vec<f32>,
    /// Key scaling by a `[C]`.
    pub k_a: Vec<f32>,
    /// Bonus term weight `[H, N]`.
    pub r_k: Vec<f32>,
    /// Projections `[C, C]` (out, in).
    pub receptance: Vec<f32>,
    /// Key projection.
    pub key: Vec<f32>,
    /// Value projection.
    pub value: Vec<f32>,
    /// Output projection.
    pub output: Vec<f32>,
    /// Per-head GroupNorm (eps = 1e-5 * N), `[C]` each.
    pub ln_x: LayerNorm,
}

/// One channel-mix (FFN) block.
#[derive(Clone, Debug, Default)]
pub struct ChannelMix {
    /// Token-shift coefficient `[C]`.
    pub x_k: Vec<f32>,
    /// key `[d_ffn, C]`, value `[C, d_ffn]`.
    pub key: Vec<f32>,
    /// Value projection.
    pub value: Vec<f32>,
}

/// One block: `x += att(ln1(x)); x += ffn(ln2(x))` (ln0 before block 0 only).
#[derive(Clone, Debug, Default)]
pub struct Block {
    /// The embedding LayerNorm (layer 0 only).
    pub ln0: Option<LayerNorm>,
    /// LayerNorm before the time mix.
    pub ln1: LayerNorm,
    /// LayerNorm before the channel mix.
    pub ln2: LayerNorm,
    /// The time mix (attention).
    pub att: TimeMix,
    /// The channel mix (feed-forward).
    pub ffn: ChannelMix,
}

/// The whole network.
#[derive(Clone, Debug)]
pub struct Weights {
    /// Sizes read off the tensor shapes.
    pub config: Config,
    /// `[V, C]`
    pub emb: Vec<f32>,
    /// The layers.
    pub blocks: Vec<Block>,
    /// The LayerNorm before the head.
    pub ln_out: LayerNorm,
    /// `[V, C]`
    pub head: Vec<f32>,
}
