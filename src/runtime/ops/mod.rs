//! The runtime's operators, one module per device. Every op is a pair of free functions over flat `f32`
//! slices with explicit shapes: `*_forward` writes its output, `*_backward` **accumulates** (`+=`) into the
//! gradients of its inputs and parameters (a buffer read by several ops sums their contributions, and the
//! caller zeroes a gradient once, when it allocates it). A second device (CUDA) is a second module with the
//! same functions over device buffers; the tape ([`super::tape`]) is the only caller.

pub mod cnn;
pub mod cpu;
pub mod vmath;

/// Precomputed rotary tables for one sequence length: `cos`/`sin` are `[tokens, head_dim]` row-major, in
/// the Hugging Face layout (each frequency repeated in both halves, for `rotate_half`).
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub tokens: usize,
    pub head_dim: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for positions `0..tokens` from the inverse frequencies (`head_dim / 2` of them), computed in
    /// f64 and rounded once. `scale` multiplies cos and sin (HF's `attention_scaling`, 1 for llama3).
    pub fn new(inv_freq: &[f64], tokens: usize, scale: f64) -> Self {
        let half = inv_freq.len();
        let head_dim = 2 * half;
        let mut cos = vec![0f32; tokens * head_dim];
        let mut sin = vec![0f32; tokens * head_dim];
        for t in 0..tokens {
            for (i, &f) in inv_freq.iter().enumerate() {
                // HF computes the angle in f32 (position * inv_freq); round the same way so the tables match.
                let angle = (t as f32 * f as f32) as f64;
                let (s, c) = angle.sin_cos();
                for j in [i, i + half] {
                    cos[t * head_dim + j] = (c * scale) as f32;
                    sin[t * head_dim + j] = (s * scale) as f32;
                }
            }
        }
        RopeTable {
            tokens,
            head_dim,
            cos,
            sin,
        }
    }
}
