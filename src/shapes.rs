//! Shapes of the model's ops that both executors take: the CPU's (`model::ops`) and the device's
//! (`cuda`). One definition, so the two cannot disagree on what a dimension means.

/// The shape of one attention call. Query heads `h` read key/value head `h / (n_heads /
/// n_kv_heads)` (HF `repeat_kv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Sequences, B.
    pub batch: usize,
    /// Tokens per sequence, T.
    pub seq: usize,
    /// Query heads, NH.
    pub n_heads: usize,
    /// Key/value heads, NKV; must divide `n_heads`.
    pub n_kv_heads: usize,
    /// Per-head width, D.
    pub head_dim: usize,
}
