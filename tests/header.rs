//! include/specdec.h is generated from src/capi/ by cbindgen; this test fails when the committed header
//! differs from a fresh generation. `SPECDEC_UPDATE_HEADER=1 cargo test --test header` rewrites it.

use std::path::Path;

fn generate() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/capi/mod.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    String::from_utf8(out).expect("utf-8 header")
}

#[test]
fn committed_header_matches_the_generated_one() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/specdec.h");
    let fresh = generate();
    if std::env::var("SPECDEC_UPDATE_HEADER").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write include/specdec.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let first = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(fresh.lines().count()));
        panic!(
            "include/specdec.h is out of date (first difference at line {}); regenerate it with \
             `SPECDEC_UPDATE_HEADER=1 cargo test --test header` and commit it",
            first + 1
        );
    }
}

#[test]
fn header_version_macros_match_cargo_toml() {
    let header =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/specdec.h"))
            .unwrap();
    let define = |name: &str| -> u32 {
        let line = header
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} missing"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap();
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap();
    let patch: u32 = env!("CARGO_PKG_VERSION_PATCH").parse().unwrap();
    assert_eq!(define("SPECDEC_VERSION_MAJOR"), major);
    assert_eq!(define("SPECDEC_VERSION_MINOR"), minor);
    assert_eq!(define("SPECDEC_VERSION_PATCH"), patch);
    assert_eq!(
        define("SPECDEC_VERSION"),
        major * 1_000_000 + minor * 1000 + patch
    );
    assert_eq!(
        specdec::capi::specdec_version(),
        major * 1_000_000 + minor * 1000 + patch
    );
    let text = unsafe { std::ffi::CStr::from_ptr(specdec::capi::specdec_version_string()) };
    assert_eq!(text.to_str().unwrap(), format!("{major}.{minor}.{patch}"));
}
