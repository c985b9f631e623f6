//! The small per-token operations of the forward pass, computed as ggml
//! computes them so that our logits track llama.cpp's: RMSNorm with an f64
//! sum of squares, SiLU as x / (1 + e^-x), RoPE angles stepped in f32
//! (softmax is the kernels crate's, beside attention's products).

/// `out = x / sqrt(mean(x²) + eps) * w` for one row (ggml's rms_norm then mul).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = (v * scale) * g;
    }
}

/// [`rms_norm`] of `x` into itself.
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = (*v * scale) * g;
    }
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

pub use crate::arch::RopeStyle;

/// cos and sin of every angle for positions `0..max`, `[max, head_dim / 2]`
/// each, stepped as ggml steps them: theta starts at the position and is
/// multiplied by base^(-2/d) per pair in f32, divided by the pair's
/// frequency factor when the model has one.
pub fn rope_tables(
    max: usize,
    head_dim: usize,
    base: f32,
    factors: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let theta_scale = base.powf(-2.0 / head_dim as f32);
    let mut cos = Vec::with_capacity(max * half);
    let mut sin = Vec::with_capacity(max * half);
    for p in 0..max {
        let mut theta = p as f32;
        for i in 0..half {
            let factor = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
            let a = theta / factor;
            cos.push(a.cos());
            sin.push(a.sin());
            theta *= theta_scale;
        }
    }
    (cos, sin)
}

/// Rotate one head's vector `x` by the angles `cos`/`sin` of its position.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = match style {
            RopeStyle::Adjacent => (2 * i, 2 * i + 1),
            RopeStyle::Halves => (i, i + half),
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * cos[i] - x1 * sin[i];
        x[b] = x0 * sin[i] + x1 * cos[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ops_equal_their_definitions() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 2.0, 0.5, 1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-5, &mut out);
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f64 + 1e-5).sqrt();
        for i in 0..4 {
            assert!((out[i] as f64 - x[i] as f64 / rms * w[i] as f64).abs() < 1e-6);
        }
        let mut v = [1.0f32, 0.0, 0.0, 1.0];
        let c = [0.0f32, 1.0];
        let s = [1.0f32, 0.0];
        rope(&mut v, &c, &s, RopeStyle::Adjacent);
        assert_eq!(v, [0.0, 1.0, 0.0, 1.0]);
        let mut y = x;
        rms_norm_in_place(&mut y, &w, 1e-5);
        assert_eq!(y, out);
    }
}
