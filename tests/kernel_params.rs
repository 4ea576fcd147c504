//! The parser that turns the kernels' parameter blocks (cuda/) into the host's `#[repr(C)]` mirrors
//! (build_support/kernel_params.rs): what it accepts, what it refuses by name, and the real blocks.

#[path = "../build_support/kernel_params.rs"]
mod kernel_params;

use kernel_params::{parse_struct, rust_mirrors, Field, PARAM_STRUCTS};

fn field(name: &str, rust_type: &str) -> Field {
    Field {
        name: name.into(),
        rust_type: rust_type.into(),
    }
}

#[test]
fn fields_pointers_arrays_and_comments_are_read_in_order() {
    let source = "
        constexpr int kLayers = 3;
        struct Other { int x; };
        struct Block {
          const void* rows;   // [N, V]; a comment with a ; in it
          int64_t n;          /* a block comment */
          struct State* state;
          float2* stats;      // pointers of any type are addresses
          void* caches[kLayers];
          int32_t* out; int small;
          double d[2];
          unsigned u;
        };";
    assert_eq!(
        parse_struct(source, "Block").unwrap(),
        [
            field("rows", "u64"),
            field("n", "i64"),
            field("state", "u64"),
            field("stats", "u64"),
            field("caches", "[u64; 3]"),
            field("out", "u64"),
            field("small", "i32"),
            field("d", "[f64; 2]"),
            field("u", "u32"),
        ]
    );
}

#[test]
fn what_has_no_mirror_is_an_error_naming_it() {
    let err = |body: &str| parse_struct(&format!("struct B {{ {body} }};"), "B").unwrap_err();
    assert!(err("half h;").contains("type `half` has no mirror"));
    assert!(err("int a[kMissing];").contains("kMissing"));
    assert!(err("").contains("no fields"));
    assert!(parse_struct("struct C { int x; };", "B")
        .unwrap_err()
        .contains("no `struct B {`"));
}

#[test]
fn every_kernel_block_has_a_mirror() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mirrors =
        rust_mirrors(|file| std::fs::read_to_string(root.join(file)).map_err(|e| e.to_string()))
            .expect("every block parses");
    for (_, name) in PARAM_STRUCTS {
        assert!(
            mirrors.contains(&format!("pub(crate) struct {name} {{")),
            "{name}"
        );
    }
    // The sampling block's 38 eight-byte fields (its static_assert in the .cu file), the request status among them.
    let sampling = parse_struct(
        &std::fs::read_to_string(root.join("rejection_sampling.cu")).unwrap(),
        "SamplingArgs",
    )
    .unwrap();
    assert_eq!(sampling.len(), 38);
    assert!(sampling.contains(&field("status", "u64")));
}
