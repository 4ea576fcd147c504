//! The kernels' parameter blocks have one definition, in `cuda/`: build.rs writes the host's `#[repr(C)]` mirror
//! of each struct in [`PARAM_STRUCTS`] from it (`$OUT_DIR/kernel_params.rs`, included by `src/cuda/params.rs`),
//! so a field added, removed, moved or retyped in a kernel's block changes the host's with it. Before, each
//! mirror was kept by hand beside its struct, checked by its total size only.
//!
//! The C++ side is plain: one field per declaration, `TYPE NAME;` or `TYPE NAME[LEN];`, where `LEN` is a number
//! or a `constexpr int` of the same file. Pointers of any type are device addresses (`u64`); the scalar types
//! are those of [`rust_scalar`]. Anything else is an error naming the field, never a guess.

/// (file under `cuda/`, struct): the blocks passed by value to kernels.
pub const PARAM_STRUCTS: [(&str, &str); 3] = [
    ("rejection_sampling.cu", "SamplingArgs"),
    ("tree_attention.cu", "TreeAttentionParams"),
    ("tree_attention.cu", "CompactionParams"),
];

/// One field of a parameter block, with the Rust type of the same size and alignment.
#[derive(Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub rust_type: String,
}

/// The Rust type of a C++ scalar type of the kernels (stdint names, or the plain names nvcc gives 32 bits).
pub fn rust_scalar(c_type: &str) -> Option<&'static str> {
    Some(match c_type {
        "int" | "int32_t" => "i32",
        "unsigned" | "uint32_t" => "u32",
        "int64_t" => "i64",
        "uint64_t" => "u64",
        "float" => "f32",
        "double" => "f64",
        _ => return None,
    })
}

/// `source` without its `//` and `/* */` comments.
fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find('/') {
        let (before, after) = rest.split_at(start);
        out.push_str(before);
        if let Some(line) = after.strip_prefix("//") {
            rest = line.find('\n').map_or("", |end| &line[end..]);
        } else if let Some(block) = after.strip_prefix("/*") {
            rest = block.find("*/").map_or("", |end| &block[end + 2..]);
            out.push(' ');
        } else {
            out.push('/');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The value of an array length: a number, or a `constexpr int NAME = N;` (or `int64_t`, `size_t`) of `source`.
fn array_len(source: &str, len: &str) -> Result<usize, String> {
    if let Ok(n) = len.parse() {
        return Ok(n);
    }
    for line in source.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["constexpr", _, name, "=", value] = words[..] {
            if name == len {
                return value
                    .trim_end_matches(';')
                    .parse()
                    .map_err(|_| format!("constexpr {len} = {value} is not a number"));
            }
        }
    }
    Err(format!(
        "array length {len} is neither a number nor a constexpr of the file"
    ))
}

/// The fields of `struct NAME { ... };` in `source`, in order, with their Rust types.
pub fn parse_struct(source: &str, name: &str) -> Result<Vec<Field>, String> {
    let code = strip_comments(source);
    let opening = format!("struct {name} {{");
    let start = code
        .find(&opening)
        .ok_or_else(|| format!("no `{opening}`"))?
        + opening.len();
    let end = start
        + code[start..]
            .find("};")
            .ok_or_else(|| format!("struct {name} has no closing `}};`"))?;
    let mut fields = Vec::new();
    for declaration in code[start..end]
        .split(';')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        let what = || format!("struct {name}: `{declaration}`");
        let (declarator, len) = match declaration.split_once('[') {
            Some((d, rest)) => {
                let len = rest
                    .strip_suffix(']')
                    .ok_or_else(|| format!("{}: bad array", what()))?;
                (d.trim(), Some(array_len(source, len.trim())?))
            }
            None => (declaration, None),
        };
        let split = declarator
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or_else(|| format!("{}: no type", what()))?;
        let (c_type, field) = (declarator[..=split].trim(), &declarator[split + 1..]);
        if field.is_empty() || field.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("{}: no field name", what()));
        }
        let scalar = if c_type.contains('*') {
            "u64"
        } else {
            rust_scalar(c_type)
                .ok_or_else(|| format!("{}: type `{c_type}` has no mirror", what()))?
        };
        let rust_type = match len {
            Some(n) => format!("[{scalar}; {n}]"),
            None => scalar.to_string(),
        };
        fields.push(Field {
            name: field.to_string(),
            rust_type,
        });
    }
    if fields.is_empty() {
        return Err(format!("struct {name} has no fields"));
    }
    Ok(fields)
}

/// The Rust source of every mirror; `read(file)` gives a `cuda/` file's contents.
pub fn rust_mirrors(read: impl Fn(&str) -> Result<String, String>) -> Result<String, String> {
    let mut out = String::from(
        "// Generated by build.rs (build_support/kernel_params.rs) from cuda/: do not edit.\n",
    );
    for (file, name) in PARAM_STRUCTS {
        let fields = parse_struct(&read(file)?, name).map_err(|e| format!("cuda/{file}: {e}"))?;
        out.push_str(&format!(
            "\n/// `{name}` of `cuda/{file}`, field for field (generated from its definition there).\n\
             #[repr(C)]\n#[derive(Clone, Copy)]\npub(crate) struct {name} {{\n"
        ));
        for field in fields {
            out.push_str(&format!(
                "    pub(crate) {}: {},\n",
                field.name, field.rust_type
            ));
        }
        out.push_str("}\n");
    }
    Ok(out)
}
