//! Order statistics of samples, ratios to a floor, and the markdown they are printed as.

/// Nearest-rank summary of a set of samples (milliseconds, bytes, events per second, ...).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// How many samples.
    pub n: usize,
    /// 50th percentile.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile (the maximum when n < 100).
    pub p99: f64,
    /// The largest sample.
    pub max: f64,
}

impl Summary {
    /// The summary of `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        // Nearest rank: the smallest sample with at least q of the samples at or below it.
        let pick = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Some(Summary {
            n: s.len(),
            median: pick(0.5),
            p90: pick(0.9),
            p99: pick(0.99),
            max: s[s.len() - 1],
        })
    }
}

/// A number with about three significant digits.
pub fn fmt(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else if a >= 0.1 {
        format!("{x:.3}")
    } else {
        format!("{x:.4}")
    }
}

/// `a / b` as `1.23×`, or a dash when `b` is zero.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".to_owned()
    }
}

/// Cells `n | median | p90 | p99 | max` of `summary` (dashes when there are no samples).
pub fn cells(summary: Option<Summary>) -> String {
    match summary {
        Some(s) => format!(
            "{} | {} | {} | {} | {}",
            s.n,
            fmt(s.median),
            fmt(s.p90),
            fmt(s.p99),
            fmt(s.max)
        ),
        None => "0 | – | – | – | –".to_owned(),
    }
}

/// The header of a table whose first columns are `leading`, then the cells of
/// [`timing_cells`] (the measurement, its floor probe and the two ratios: median to median, p99
/// to p99), then `trailing`.
pub fn timing_header(leading: &[&str], trailing: &[&str]) -> String {
    let columns: Vec<&str> = leading
        .iter()
        .copied()
        .chain([
            "n",
            "median",
            "p90",
            "p99",
            "max",
            "probe n",
            "probe median",
            "probe p90",
            "probe p99",
            "probe max",
            "median ÷ probe median",
            "p99 ÷ probe p99",
        ])
        .chain(trailing.iter().copied())
        .collect();
    format!("| {} |\n|{}", columns.join(" | "), "---|".repeat(columns.len()))
}

/// The cells of a timing row: the measurement, its probe, the ratios.
pub fn timing_cells(measured: &[f64], probe: &[f64]) -> String {
    let (m, p) = (Summary::of(measured), Summary::of(probe));
    let (r50, r99) = match (m, p) {
        (Some(m), Some(p)) => (ratio(m.median, p.median), ratio(m.p99, p.p99)),
        _ => ("–".to_owned(), "–".to_owned()),
    };
    format!("{} | {} | {r50} | {r99}", cells(m), cells(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s = Summary::of(&(1..=100).map(f64::from).collect::<Vec<_>>()).unwrap();
        assert_eq!((s.n, s.median, s.p90, s.p99, s.max), (100, 50.0, 90.0, 99.0, 100.0));
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.p90, s.p99, s.max), (2.0, 3.0, 3.0, 3.0));
        assert!(Summary::of(&[]).is_none());
        assert_eq!(ratio(3.0, 2.0), "1.50×");
        assert_eq!(ratio(3.0, 0.0), "–");
    }
}
