//! Goodness-of-fit for the sampler tests: Pearson's chi-square with its exact p-value (regularised incomplete
//! gamma), written here from the textbook definitions.

/// `ln Gamma(x)` for `x > 0` (Lanczos, g = 7, 9 terms; relative error below 1e-14).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularised upper incomplete gamma `Q(a, x) = Gamma(a, x) / Gamma(a)`: a series below `a + 1`, a
/// continued fraction (modified Lentz) above.
pub fn gamma_q(a: f64, x: f64) -> f64 {
    assert!(a > 0.0 && x >= 0.0);
    if x == 0.0 {
        return 1.0;
    }
    let log_prefactor = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut term, mut sum, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-16 {
                break;
            }
        }
        1.0 - sum * log_prefactor.exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        log_prefactor.exp() * h
    }
}

/// The probability that a chi-square variable with `df` degrees of freedom exceeds `statistic`.
pub fn chi_square_p_value(statistic: f64, df: usize) -> f64 {
    if df == 0 {
        return 1.0;
    }
    gamma_q(df as f64 / 2.0, statistic / 2.0)
}

/// The outcome of one goodness-of-fit check.
#[derive(Debug)]
pub struct Fit {
    pub samples: u64,
    pub bins: usize,
    pub statistic: f64,
    pub p_value: f64,
    /// Observed draws of a category of probability zero (an immediate failure).
    pub impossible: u64,
}

/// Pearson's chi-square of `observed` counts against `expected` probabilities (summing to 1). Categories with
/// an expected count below 5 are pooled into one bin (and that bin into the smallest other one while its own
/// expectation stays below 5), so the chi-square approximation holds.
pub fn chi_square(observed: &[u64], expected: &[f64]) -> Fit {
    chi_square_pooled(observed, expected, 5.0)
}

/// [`chi_square`] with categories pooled below an expected count of `min_expected` instead of 5: a larger
/// threshold keeps the chi-square approximation accurate further into its tail, for tests that reject only
/// at tiny p-values.
pub fn chi_square_pooled(observed: &[u64], expected: &[f64], min_expected: f64) -> Fit {
    assert_eq!(observed.len(), expected.len());
    let n: u64 = observed.iter().sum();
    let nf = n as f64;
    let impossible = observed
        .iter()
        .zip(expected)
        .filter(|(_, &p)| p == 0.0)
        .map(|(&o, _)| o)
        .sum();
    let mut bins: Vec<(f64, f64)> = Vec::new(); // (observed, expected count)
    let (mut pooled_o, mut pooled_e) = (0.0, 0.0);
    for (&o, &p) in observed.iter().zip(expected) {
        let e = p * nf;
        if e >= min_expected {
            bins.push((o as f64, e));
        } else {
            pooled_o += o as f64;
            pooled_e += e;
        }
    }
    if pooled_e >= min_expected || bins.is_empty() {
        bins.push((pooled_o, pooled_e));
    } else if let Some(smallest) = bins.iter_mut().min_by(|a, b| a.1.total_cmp(&b.1)) {
        smallest.0 += pooled_o;
        smallest.1 += pooled_e;
    }
    bins.retain(|&(_, e)| e > 0.0);
    let statistic: f64 = bins.iter().map(|&(o, e)| (o - e) * (o - e) / e).sum();
    let df = bins.len().saturating_sub(1);
    Fit {
        samples: n,
        bins: bins.len(),
        statistic,
        p_value: chi_square_p_value(statistic, df),
        impossible,
    }
}
