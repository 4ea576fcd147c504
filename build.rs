//! Compiles every `cuda/*.cu` into a fatbin (SASS for each architecture in `SPECDEC_CUDA_ARCHS`, plus PTX for
//! the lowest) and embeds them in the library; `src/cuda/module.rs` loads them from memory at run time.
//!
//! nvcc is found from `NVCC`, then `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, then `PATH`. nvidia-smi is never run:
//! the GPU of the build machine says nothing about the GPUs the library will run on. Without nvcc the
//! CPU-only library is built (one warning); `SPECDEC_REQUIRE_CUDA=1` makes that, or a failed compile, an error.
//! A `SPECDEC_CUDA_ARCHS` the kernels cannot be built for (below sm_80, or not a number) is always an error.
//!
//! `SPECDEC_CUDA_CACHE=<dir>` keeps each fatbin and its ptxas report there under a hash of everything that
//! decides its bytes (nvcc's version, the command line, every `cuda/` source). Builds whose Rust fingerprints
//! differ (`cargo clippy` and `cargo build`, say) then run nvcc once between them.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build_support/archs.rs"]
mod archs;
#[path = "build_support/kernel_params.rs"]
mod kernel_params;

const DEFAULT_ARCHS: &str = "80;86;89;90";
const ENV_VARS: [&str; 7] = [
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "SPECDEC_CUDA_ARCHS",
    "SPECDEC_REQUIRE_CUDA",
    "SPECDEC_CUDA_CACHE",
];

struct Kernel {
    name: String,
    fatbin: PathBuf,
    size: usize,
    /// The `extern "C" __global__` functions ptxas compiled, sorted: the names a launcher may ask for.
    entry_points: Vec<String>,
}

/// The shared library's SONAME: `libspecdec.so.0.MINOR` while the version is 0.x (where a minor release may break
/// the ABI), `libspecdec.so.MAJOR` from 1.0. `scripts/install.sh` lays out the matching links; Linux only.
fn set_soname() {
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let major = env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets the version");
    let minor = env::var("CARGO_PKG_VERSION_MINOR").expect("cargo sets the version");
    let soname = if major == "0" {
        format!("libspecdec.so.0.{minor}")
    } else {
        format!("libspecdec.so.{major}")
    };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
}

fn main() {
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=cuda");
    set_soname();
    // Without the `cuda` feature nothing of CUDA is built or looked for.
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        if env::var("SPECDEC_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
            panic!(
                "SPECDEC_REQUIRE_CUDA=1 but the `cuda` feature is off: nothing of CUDA is built"
            );
        }
        return;
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require_cuda = env::var("SPECDEC_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    // The host's mirrors of the kernels' parameter blocks, with or without nvcc: the launchers compile either way.
    let mirrors = kernel_params::rust_mirrors(|file| {
        fs::read_to_string(Path::new("cuda").join(file)).map_err(|e| format!("cuda/{file}: {e}"))
    })
    .unwrap_or_else(|reason| panic!("kernel parameter blocks: {reason}"));
    fs::write(out_dir.join("kernel_params.rs"), mirrors).expect("write kernel_params.rs");

    let sources = cuda_sources(Path::new("cuda"));
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
    }

    // A wrong architecture list is the caller's mistake whether or not nvcc is here: never a quiet CPU-only build.
    let archs = archs::parse_archs(
        &env::var("SPECDEC_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into()),
    )
    .unwrap_or_else(|reason| panic!("{reason}"));
    let outcome = find_nvcc()
        .ok_or_else(|| {
            "nvcc not found (looked at NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH)".to_string()
        })
        .and_then(|nvcc| {
            compile_all(&nvcc, &sources, &archs, &out_dir).map(|kernels| (kernels, archs))
        });

    let generated = match outcome {
        Ok((kernels, archs)) => generated_module(&kernels, &archs),
        Err(reason) if require_cuda => {
            panic!("SPECDEC_REQUIRE_CUDA=1 but the CUDA kernels were not built: {reason}")
        }
        Err(reason) => {
            println!(
                "cargo:warning=specdec: building the CPU-only library ({reason}); CUDA entry points will return \
                 KernelsNotCompiled. Run scripts/install-nvcc.sh to get the pinned nvcc."
            );
            generated_module(&[], &[])
        }
    };
    fs::write(out_dir.join("kernels.rs"), generated).expect("write kernels.rs");
}

fn cuda_sources(dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")));
    sources.sort();
    sources
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    let candidates = env::var_os("NVCC")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            ["CUDA_HOME", "CUDA_PATH"]
                .iter()
                .filter_map(env::var_os)
                .map(|root| PathBuf::from(root).join("bin").join(exe)),
        )
        .chain(env::var_os("PATH").into_iter().flat_map(|p| {
            env::split_paths(&p)
                .map(|dir| dir.join(exe))
                .collect::<Vec<_>>()
        }));
    candidates.into_iter().find(|p| p.is_file())
}

fn compile_all(
    nvcc: &Path,
    sources: &[PathBuf],
    archs: &[u32],
    out_dir: &Path,
) -> Result<Vec<Kernel>, String> {
    let units: Vec<&PathBuf> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    let cache = match env::var_os("SPECDEC_CUDA_CACHE") {
        Some(dir) => Some(FatbinCache::new(PathBuf::from(dir), nvcc, sources)?),
        None => None,
    };
    let cache = cache.as_ref();
    // One nvcc per kernel family, in parallel: nvcc itself compiles the architectures one after another.
    std::thread::scope(|scope| {
        let jobs: Vec<_> = units
            .iter()
            .map(|src| scope.spawn(move || compile_one(nvcc, src, archs, out_dir, cache)))
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("nvcc thread panicked"))
            .collect()
    })
}

fn compile_one(
    nvcc: &Path,
    source: &Path,
    archs: &[u32],
    out_dir: &Path,
    cache: Option<&FatbinCache>,
) -> Result<Kernel, String> {
    let name = source
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("utf-8 file name")
        .to_string();
    let fatbin = out_dir.join(format!("{name}.fatbin"));
    // Everything but the output path, which differs between builds that may share a cached fatbin.
    let mut args: Vec<std::ffi::OsString> = [
        "--fatbin",
        "-O3",
        "-std=c++17",
        "-lineinfo",
        "-Xptxas",
        "-v",
        "-Icuda",
    ]
    .map(Into::into)
    .into();
    args.push(source.into());
    for arch in archs {
        args.push(format!("-gencode=arch=compute_{arch},code=sm_{arch}").into());
    }
    let lowest = archs[0];
    args.push(format!("-gencode=arch=compute_{lowest},code=compute_{lowest}").into());
    let report_path = out_dir.join(format!("{name}.resources.txt"));
    let cached = cache.map(|c| c.entry(&name, &args));
    let report = match cached.as_ref().and_then(|entry| entry.restore(&fatbin)) {
        Some(report) => report,
        None => {
            let output = Command::new(nvcc)
                .arg("-o")
                .arg(&fatbin)
                .args(&args)
                .output()
                .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
            let report = String::from_utf8_lossy(&output.stderr).into_owned();
            if !output.status.success() {
                fs::write(&report_path, &report).map_err(|e| e.to_string())?;
                return Err(format!("nvcc failed on {}:\n{report}", source.display()));
            }
            if let Some(entry) = &cached {
                entry.store(&fatbin, &report)?;
            }
            report
        }
    };
    fs::write(&report_path, &report).map_err(|e| e.to_string())?;
    for spill in spill_lines(&report) {
        println!(
            "cargo:warning=specdec: {name}: register spill: {spill} (full report: {})",
            report_path.display()
        );
    }
    let size = fs::metadata(&fatbin).map_err(|e| e.to_string())?.len() as usize;
    let entry_points = entry_points(&report);
    if entry_points.is_empty() {
        return Err(format!(
            "{}: ptxas reported no entry function (full report: {})",
            source.display(),
            report_path.display()
        ));
    }
    Ok(Kernel {
        name,
        fatbin,
        size,
        entry_points,
    })
}

/// The entry functions of a `ptxas -v` report (`Compiling entry function 'NAME' for 'sm_90'`), sorted and
/// without the repeats of each architecture.
fn entry_points(report: &str) -> Vec<String> {
    let mut names: Vec<String> = report
        .lines()
        .filter_map(|line| line.split("Compiling entry function '").nth(1))
        .filter_map(|rest| rest.split('\'').next())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Where `SPECDEC_CUDA_CACHE` keeps fatbins: `<dir>/<family>-<key>.fatbin` and `.resources.txt` beside it.
struct FatbinCache {
    dir: PathBuf,
    /// Hash of nvcc's path and `--version` and of every `cuda/` source: a header change invalidates all.
    inputs: u64,
}

struct CacheEntry {
    fatbin: PathBuf,
    report: PathBuf,
}

impl FatbinCache {
    fn new(dir: PathBuf, nvcc: &Path, sources: &[PathBuf]) -> Result<Self, String> {
        fs::create_dir_all(&dir)
            .map_err(|e| format!("SPECDEC_CUDA_CACHE: cannot create {}: {e}", dir.display()))?;
        let version = Command::new(nvcc)
            .arg("--version")
            .output()
            .map_err(|e| format!("could not run {} --version: {e}", nvcc.display()))?;
        let mut hash = Fnv1a::default();
        hash.write(nvcc.as_os_str().as_encoded_bytes());
        hash.write(&version.stdout);
        for source in sources {
            let text = fs::read(source).map_err(|e| format!("{}: {e}", source.display()))?;
            hash.write(source.as_os_str().as_encoded_bytes());
            hash.write(&text);
        }
        Ok(Self {
            dir,
            inputs: hash.0,
        })
    }

    /// The entry for one nvcc command line (its arguments name the source, the archs and the flags).
    fn entry(&self, family: &str, args: &[std::ffi::OsString]) -> CacheEntry {
        let mut hash = Fnv1a(self.inputs);
        for arg in args {
            hash.write(arg.as_encoded_bytes());
            hash.write(&[0]);
        }
        let stem = format!("{family}-{:016x}", hash.0);
        CacheEntry {
            fatbin: self.dir.join(format!("{stem}.fatbin")),
            report: self.dir.join(format!("{stem}.resources.txt")),
        }
    }
}

impl CacheEntry {
    /// Copies a cached fatbin to `fatbin` and returns its ptxas report; None on a miss.
    fn restore(&self, fatbin: &Path) -> Option<String> {
        let report = fs::read_to_string(&self.report).ok()?;
        fs::copy(&self.fatbin, fatbin).ok()?;
        Some(report)
    }

    /// Stores a fresh fatbin and report. The report is written last and both go through a rename, so a reader
    /// never sees a half-written entry.
    fn store(&self, fatbin: &Path, report: &str) -> Result<(), String> {
        let publish = |to: &Path, write: &dyn Fn(&Path) -> std::io::Result<()>| {
            let partial = to.with_extension(format!("partial-{}", std::process::id()));
            write(&partial)
                .and_then(|()| fs::rename(&partial, to))
                .map_err(|e| format!("SPECDEC_CUDA_CACHE: cannot write {}: {e}", to.display()))
        };
        publish(&self.fatbin, &|p| fs::copy(fatbin, p).map(drop))?;
        publish(&self.report, &|p| fs::write(p, report))
    }
}

/// 64-bit FNV-1a: stable across Rust releases, unlike `DefaultHasher`, so a cache outlives a toolchain update.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// ptxas prints "Compiling entry function 'X' for 'sm_NN'" and then "N bytes stack frame, N bytes spill stores,
/// N bytes spill loads" for it; name each function whose spill counts are not zero.
fn spill_lines(report: &str) -> Vec<String> {
    let mut current = String::new();
    let mut spills = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function ").nth(1) {
            current = rest.trim().to_string();
        }
        if line.contains("spill stores")
            && !(line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"))
        {
            spills.push(format!("{current}: {}", line.trim()));
        }
    }
    spills
}

fn generated_module(kernels: &[Kernel], archs: &[u32]) -> String {
    let mut code = String::from("// Generated by build.rs: the fatbins compiled from cuda/*.cu.\n");
    writeln!(
        code,
        "pub const KERNELS_COMPILED: bool = {};",
        !kernels.is_empty()
    )
    .unwrap();
    writeln!(code, "pub const COMPILED_ARCHS: &[u32] = &{archs:?};").unwrap();
    // cuModuleLoadData reads the image in place; keep it aligned like the allocation nvcc's loaders use.
    if !kernels.is_empty() {
        code.push_str("#[repr(C, align(64))]\npub struct Aligned<const N: usize>(pub [u8; N]);\n");
    }
    for (i, k) in kernels.iter().enumerate() {
        writeln!(
            code,
            "static FATBIN_{i}: Aligned<{}> = Aligned(*include_bytes!({:?}));",
            k.size,
            k.fatbin.display().to_string()
        )
        .unwrap();
    }
    code.push_str("/// (kernel family, fatbin image), one per cuda/*.cu file.\npub static FATBINS: &[(&str, &[u8])] = &[\n");
    for (i, k) in kernels.iter().enumerate() {
        writeln!(code, "    ({:?}, &FATBIN_{i}.0),", k.name).unwrap();
    }
    code.push_str("];\n");
    code.push_str(
        "/// (kernel family, the kernels ptxas compiled into its fatbin, sorted), one per cuda/*.cu file.\n\
         pub static ENTRY_POINTS: &[(&str, &[&str])] = &[\n",
    );
    for k in kernels {
        writeln!(code, "    ({:?}, &{:?}),", k.name, k.entry_points).unwrap();
    }
    code.push_str("];\n");
    code
}
