//! The one finiteness check every tensor read from a file goes through
//! before it is trusted, in the runtime and the converter alike.

/// The first NaN or infinite value found in a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFinite {
    /// Its index in row-major order.
    pub index: usize,
    /// The value (NaN, inf or -inf).
    pub value: f32,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "element {} is {}", self.index, self.value)
    }
}

/// `Err` with the first NaN or infinite value of `values`, the one check every
/// tensor read from a file goes through before it is trusted.
pub fn check_finite(values: &[f32]) -> Result<(), NonFinite> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(NonFinite {
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}
