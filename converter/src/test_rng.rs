//! Deterministic test data for the rounding methods' unit tests.

/// xorshift64: uniform values from a seed, without a dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// Uniform in [-1, 1).
    pub(crate) fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}
