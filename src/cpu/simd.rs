//! The instruction sets the CPU backend's kernels are compiled for (the int4 GEMV, tree attention, the
//! sampler's race and softmax), chosen at run time by what the CPU has, and the lane-wise maximum they share.

/// The instruction sets a kernel is compiled for, chosen by what the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                return if has!("avx512f") {
                    Kernel::Avx512
                } else {
                    Kernel::Avx2Fma
                };
            }
        }
        Kernel::Portable
    }

    /// Whether this CPU has the kernel's instruction sets: the dispatchers assert it before they run a kernel's
    /// `#[target_feature]` code, so that no caller can run one where it is undefined (the answer is cached).
    pub(crate) fn runs_here(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                Kernel::Avx2Fma.runs_here() && std::arch::is_x86_feature_detected!("avx512f")
            }
        }
    }

    /// The kernels this CPU can run.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        match Self::detect() {
            Kernel::Portable => vec![Kernel::Portable],
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => vec![Kernel::Portable, Kernel::Avx2Fma],
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => vec![Kernel::Portable, Kernel::Avx2Fma, Kernel::Avx512],
        }
    }
}

/// The largest of `values` (`-inf` if none is above it; NaN ignored), by 16 lanes so that it vectorises: the
/// largest is the same in any order.
#[inline(always)]
pub(crate) fn largest(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = values.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = if x > *lane { x } else { *lane };
        }
    }
    for (lane, &x) in lanes.iter_mut().zip(tail) {
        *lane = if x > *lane { x } else { *lane };
    }
    let mut top = f32::NEG_INFINITY;
    for &lane in &lanes {
        top = if lane > top { lane } else { top };
    }
    top
}
