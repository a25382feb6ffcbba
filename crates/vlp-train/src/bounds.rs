//! The one range rule for the numbers of a recipe: every float must be finite (TOML
//! accepts `nan` and `inf`, and either one reaches the loss only steps later, as a
//! non-finite loss that names no key), and must keep the bounds that say what it means.

use std::fmt;

/// A bound a number must keep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound<'a> {
    /// `>= x`.
    AtLeast(f64),
    /// `> x`.
    Above(f64),
    /// `<= x`.
    AtMost(f64),
    /// `<=` another key's value: (the key, its value).
    AtMostKey(&'a str, f64),
}

impl Bound<'_> {
    fn holds(self, v: f64) -> bool {
        match self {
            Bound::AtLeast(x) => v >= x,
            Bound::Above(x) => v > x,
            Bound::AtMost(x) | Bound::AtMostKey(_, x) => v <= x,
        }
    }
}

impl fmt::Display for Bound<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::AtLeast(x) => write!(f, "must be >= {}", Shown(*x)),
            Bound::Above(x) => write!(f, "must be > {}", Shown(*x)),
            Bound::AtMost(x) => write!(f, "must be <= {}", Shown(*x)),
            Bound::AtMostKey(key, x) => write!(f, "must be <= {key} ({})", Shown(*x)),
        }
    }
}

/// A number as a recipe would write it: `1e30` and `1e-5` rather than their 31 and 7
/// digits, `-1` and `0.02` as they are.
struct Shown(f64);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0.abs();
        if a.is_finite() && a != 0.0 && !(1e-3..1e6).contains(&a) {
            write!(f, "{:e}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Why `v` is refused, as `VALUE: RULE` with the first rule it breaks (`-1: must be >=
/// 0`, `NaN: must be finite`), or `None` when it is finite and keeps every bound.
pub fn refusal(v: f64, bounds: &[Bound]) -> Option<String> {
    let why = if v.is_finite() {
        bounds.iter().find(|b| !b.holds(v))?.to_string()
    } else {
        "must be finite".into()
    };
    Some(format!("{}: {why}", Shown(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_and_broken_bounds_are_named() {
        let unit = [Bound::AtLeast(0.0), Bound::AtMost(1.0)];
        for ok in [0.5, 0.0, 1.0] {
            assert_eq!(refusal(ok, &unit), None, "{ok}");
        }
        for (v, shown) in [
            (f64::NAN, "NaN"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            assert_eq!(
                refusal(v, &unit),
                Some(format!("{shown}: must be finite")),
                "{v}"
            );
        }
        let refused = |v: f64, bounds: &[Bound]| refusal(v, bounds).unwrap();
        assert_eq!(refused(-1.0, &unit), "-1: must be >= 0");
        assert_eq!(refused(1.5, &unit), "1.5: must be <= 1");
        assert_eq!(refused(1e30, &unit), "1e30: must be <= 1");
        assert_eq!(refused(0.0, &[Bound::Above(0.0)]), "0: must be > 0");
        assert_eq!(
            refused(2e-5, &[Bound::AtMostKey("optim.lr", 1e-5)]),
            "2e-5: must be <= optim.lr (1e-5)"
        );
        // No bounds: finite is all that is asked.
        assert_eq!(refusal(-1e300, &[]), None);
    }
}
