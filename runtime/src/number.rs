//! Numbers as messages print them: a value a user typed as `1e300` is
//! printed `1e300`, not as the 301 digits Rust's `{}` gives it.

use std::fmt;

/// A number shown compactly: as `{}` prints it within 1e-4..1e6 (and 0),
/// in exponent form (`{:e}`) beyond, NaN and infinities as `{}` does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compact<T>(pub T);

/// `x` shown compactly (see [`Compact`]).
pub fn compact<T>(x: T) -> Compact<T> {
    Compact(x)
}

impl<T: Copy + Into<f64> + fmt::Display + fmt::LowerExp> fmt::Display for Compact<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: f64 = self.0.into();
        let a = v.abs();
        if a.is_finite() && a != 0.0 && !(1e-4..1e6).contains(&a) {
            write!(f, "{:e}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compact;

    #[test]
    fn huge_and_tiny_values_are_short() {
        assert_eq!(compact(1e300).to_string(), "1e300");
        assert_eq!(compact(-1e300).to_string(), "-1e300");
        assert_eq!(compact(1e-300).to_string(), "1e-300");
        assert_eq!(compact(f32::MAX).to_string(), "3.4028235e38");
        assert_eq!(compact(1234567.0).to_string(), "1.234567e6");
        // Values a user would type read as typed.
        assert_eq!(compact(0.05).to_string(), "0.05");
        assert_eq!(compact(0.1f32).to_string(), "0.1");
        assert_eq!(compact(65504.0).to_string(), "65504");
        assert_eq!(compact(0.0).to_string(), "0");
        assert_eq!(compact(f64::NAN).to_string(), "NaN");
        assert_eq!(compact(f64::NEG_INFINITY).to_string(), "-inf");
    }
}
