//! Value parsers for flags whose numbers have a range, one per kind of
//! value: clap refuses a value that can only fail (or a gate that could
//! never fire) as it parses, before any work, alike for every flag of a kind.

fn number(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|x| x.is_finite())
}

/// A finite number >= 0: a tolerance, a damping.
pub fn non_negative(s: &str) -> Result<f64, String> {
    number(s)
        .filter(|&x| x >= 0.0)
        .ok_or_else(|| "it must be a finite number >= 0".into())
}

/// A finite number > 0: a budget that leaves room for some drift.
pub fn positive(s: &str) -> Result<f64, String> {
    number(s)
        .filter(|&x| x > 0.0)
        .ok_or_else(|| "it must be a finite number > 0".into())
}

/// A share from 0 to 1, both included.
pub fn share(s: &str) -> Result<f64, String> {
    number(s)
        .filter(|x| (0.0..=1.0).contains(x))
        .ok_or_else(|| "it must be a share from 0 to 1".into())
}

/// A share strictly between 0 and 1: at 0 or below nothing is asked, at 1
/// or above nothing can be enough.
pub fn open_share(s: &str) -> Result<f64, String> {
    number(s)
        .filter(|&x| x > 0.0 && x < 1.0)
        .ok_or_else(|| "it must be a share strictly between 0 and 1".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_refuses_what_can_only_fail_or_never_fire() {
        for bad in ["nan", "NaN", "inf", "-inf", "infinity", "1e400", "x", ""] {
            for parse in [non_negative, positive, share, open_share] {
                assert!(parse(bad).is_err(), "{bad}");
            }
        }
        assert_eq!(non_negative("0"), Ok(0.0));
        assert!(non_negative("-1e-9").is_err());
        assert!(positive("0").is_err());
        assert_eq!(positive("1e300"), Ok(1e300));
        assert_eq!(share("1"), Ok(1.0));
        assert_eq!(share("0"), Ok(0.0));
        assert!(share("1.01").is_err());
        assert!(open_share("0").is_err());
        assert!(open_share("1").is_err());
        assert_eq!(open_share("0.97"), Ok(0.97));
    }
}
