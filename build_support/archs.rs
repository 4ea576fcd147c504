//! `SPECDEC_CUDA_ARCHS`: which GPU architectures build.rs compiles the kernels for. Shared by build.rs and its
//! test (tests/build_archs.rs), so the rule the build applies is the rule the test checks.

/// The lowest architecture the kernels can run on: they use `mma.sync.m16n8k16` with bf16 operands, `cp.async`
/// and `ldmatrix`, which sm_80 (Ampere) introduced.
pub const MIN_ARCH: u32 = 80;

/// The architectures in `list` (compute capabilities such as `80;90`, separated by `;` or `,`), sorted and
/// without repeats. An entry that is not a number, or names an architecture below [`MIN_ARCH`], is an error
/// that names it: the build stops there rather than quietly building a library without kernels.
pub fn parse_archs(list: &str) -> Result<Vec<u32>, String> {
    let mut archs = list
        .split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<u32>() {
            Ok(arch) if arch >= MIN_ARCH => Ok(arch),
            Ok(arch) => Err(format!(
                "SPECDEC_CUDA_ARCHS: sm_{arch} is below sm_{MIN_ARCH}, the lowest architecture the kernels support \
                 (they use m16n8k16 bf16 mma, cp.async and ldmatrix); name {MIN_ARCH} or above (e.g. 80;90)"
            )),
            Err(_) => Err(format!(
                "SPECDEC_CUDA_ARCHS: '{s}' is not a compute capability (a number such as 80 or 90)"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() {
        return Err("SPECDEC_CUDA_ARCHS names no architecture".into());
    }
    Ok(archs)
}
