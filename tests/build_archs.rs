//! The architecture list build.rs accepts in `SPECDEC_CUDA_ARCHS` (build_support/archs.rs): the kernels need
//! sm_80, so an older architecture must stop the build with a message naming it, never build a library without
//! kernels. (Before, 75 was accepted and nvcc's failure on it became a warning and a CPU-only library.)

#[path = "../build_support/archs.rs"]
mod archs;

use archs::{parse_archs, MIN_ARCH};

#[test]
fn architectures_below_sm_80_are_refused_by_name() {
    for list in ["75", "80;75", "70,90", "60"] {
        let err = parse_archs(list).expect_err(list);
        assert!(err.contains("below sm_80"), "{list}: {err}");
        let named = list
            .split([';', ','])
            .find(|a| a.parse::<u32>().unwrap() < MIN_ARCH)
            .unwrap();
        assert!(err.contains(&format!("sm_{named}")), "{list}: {err}");
    }
}

#[test]
fn supported_lists_are_sorted_and_deduplicated() {
    assert_eq!(parse_archs("90;80;86;89").unwrap(), [80, 86, 89, 90]);
    assert_eq!(parse_archs(" 90 , 90;80 ;").unwrap(), [80, 90]);
    assert_eq!(parse_archs("100").unwrap(), [100]);
}

#[test]
fn malformed_lists_are_refused() {
    for list in ["", ";", "sm_90", "9.0", "-80"] {
        assert!(parse_archs(list).is_err(), "{list:?} accepted");
    }
}
