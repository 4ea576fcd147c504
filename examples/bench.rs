//! The main job: every specdec primitive on the best available backend (CUDA when usable, otherwise the CPU),
//! each result checked against the CPU reference, timed, and printed as a markdown table with the bytes that
//! must move, the achieved bandwidth and its share of this machine's bandwidth measured in the same run.
//!
//! ```text
//! cargo run --release --example bench                  # CUDA if usable, else the CPU
//! cargo run --release --example bench -- --backend cpu # or: cuda
//! cargo run --release --example bench -- --quick       # fewer cases
//! cargo run --release --example bench -- --only int4   # one family (repeatable): greedy, sampling, int4,
//!                                                      # attention; every family when none is named
//!                                                      # (--family is the same)
//! ```
//!
//! One harness serves every primitive on either backend (`Target`): the case's arrays are placed in the
//! backend's memory, its large inputs rotated over copies that together exceed the last-level cache, each call
//! made through `specdec::backend::Backend` (as the C ABI and the tests make theirs), timed, and its outputs
//! read back and compared with the CPU reference on CUDA. Timing: on CUDA, events around batches of calls on
//! one stream, the median over batches; on the CPU, wall-clock per call, the median. Bandwidth ceiling: a
//! device-to-device copy (CUDA) or a multi-threaded memcpy (CPU), counting bytes read plus bytes written.
//! Greedy inputs have every draft equal to its row's argmax, so every backend must read every logits row.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use half::{bf16, f16};
use rayon::prelude::*;
use specdec::attention::{
    PagedCacheShape, TreeAttentionInputs, TreeAttentionOutputs, TreeAttentionShape,
};
use specdec::backend::{In, Out, Stream};
use specdec::cuda::{CudaBackend, DeviceIn, DeviceOut};
use specdec::int4::{GemvShape, Int4Gemv, Int4Quantize, Int4Shape};
use specdec::{cpu, DType, LogitsElement};

/// Rotate inputs over copies totalling at least this many bytes (several times the 50-60 MB L2 of an H100/H200).
const GPU_ROTATION_BYTES: usize = 256 << 20;
/// On the CPU, rotate over copies totalling at least this (more than any last-level cache here).
const CPU_ROTATION_BYTES: usize = 128 << 20;

/// The primitive families, as `--only` (or `--family`) names them (the GPU runner times one family per run).
const FAMILIES: [&str; 4] = ["greedy", "sampling", "int4", "attention"];

/// The check column of a CPU run: the CPU backend is the reference, so nothing was compared.
const NOT_CHECKED_ON_CPU: &str = "not checked (CPU run)";

struct Options {
    backend: String,
    quick: bool,
    /// The families to run; every family when empty.
    families: Vec<String>,
}

impl Options {
    fn wants(&self, family: &str) -> bool {
        self.families.is_empty() || self.families.iter().any(|f| f == family)
    }
}

fn parse_options() -> Options {
    let mut options = Options {
        backend: "auto".into(),
        quick: false,
        families: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => options.backend = args.next().unwrap_or_default(),
            "--quick" => options.quick = true,
            "--family" | "--only" => {
                let family = args.next().unwrap_or_default();
                if !FAMILIES.contains(&family.as_str()) {
                    eprintln!("bench: --only must be one of {}", FAMILIES.join(", "));
                    std::process::exit(2);
                }
                options.families.push(family);
            }
            "-h" | "--help" => {
                println!(
                    "usage: bench [--backend auto|cpu|cuda] [--quick] [--only {}]... (--family is the same)",
                    FAMILIES.join("|")
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("bench: unknown argument {other:?} (try --help)");
                std::process::exit(2);
            }
        }
    }
    if !["auto", "cpu", "cuda"].contains(&options.backend.as_str()) {
        eprintln!("bench: --backend must be auto, cpu or cuda");
        std::process::exit(2);
    }
    options
}

/// Where the main job runs, and the one harness every primitive's case uses on either backend: arrays placed
/// in the backend's memory, rotated over copies larger than the last-level cache, calls timed, outputs read
/// back. Every call goes through `specdec::backend::Backend`, as the C ABI's and the tests' do.
struct Target {
    backend: specdec::backend::Backend,
    /// The CUDA stream every upload, call and download runs on; `None` on the CPU.
    stream: Option<Arc<CudaStream>>,
}

/// An array in the target's memory. On a device, its address is taken once (everything runs on the target's
/// one stream, which orders the uploads, the calls and the downloads).
enum Buffer<T> {
    Host(Vec<T>),
    Device {
        slice: CudaSlice<T>,
        ptr: u64,
        len: usize,
    },
}

/// `copies` copies of an array of `len` elements, back to back, so that consecutive calls read different
/// memory: together they exceed the last-level cache (the GPU's L2, the CPU's L3), as a decoding step's
/// inputs would arrive from the model rather than from a warm cache.
struct Rotated<T> {
    buffer: Buffer<T>,
    len: usize,
    copies: usize,
}

impl Target {
    fn cpu() -> Self {
        Target {
            backend: specdec::backend::Backend::Cpu,
            stream: None,
        }
    }

    fn is_cpu(&self) -> bool {
        self.stream.is_none()
    }

    fn cuda(&self) -> Option<&CudaBackend> {
        match &self.backend {
            specdec::backend::Backend::Cuda(cuda) => Some(cuda),
            specdec::backend::Backend::Cpu => None,
        }
    }

    fn stream(&self) -> Stream<'_> {
        self.stream.as_deref().map_or(Stream::Default, Stream::Cuda)
    }

    /// A copy of `data` in the target's memory.
    fn upload<T: DeviceRepr + Clone + Default>(&self, data: &[T]) -> Buffer<T> {
        match &self.stream {
            None => Buffer::Host(data.to_vec()),
            Some(stream) => {
                // One spare element: cudarc refuses empty copies.
                let mut padded = data.to_vec();
                padded.push(T::default());
                let slice = stream.clone_htod(&padded).expect("upload");
                let ptr = raw_address(&slice, stream);
                Buffer::Device {
                    slice,
                    ptr,
                    len: data.len(),
                }
            }
        }
    }

    /// `len` copies of `value` in the target's memory (on a device, filled there rather than uploaded: caches
    /// of several GB).
    fn filled(&self, len: usize, value: bf16) -> Buffer<bf16> {
        let Some(stream) = &self.stream else {
            return Buffer::Host(vec![value; len]);
        };
        let slice = unsafe { stream.alloc::<bf16>(len + 1) }.expect("allocate");
        let ptr = raw_address(&slice, stream);
        // SAFETY: fills the whole live allocation (len + 1 elements of 16 bits) on the target's stream.
        unsafe { sys::cuMemsetD16Async(ptr, value.to_bits(), len + 1, stream.cu_stream()) }
            .result()
            .expect("fill");
        Buffer::Device { slice, ptr, len }
    }

    /// Copies of `data` that together exceed the last-level cache (at most `max_copies`).
    fn rotated<T: DeviceRepr + Copy>(&self, data: &[T], max_copies: usize) -> Rotated<T> {
        assert!(!data.is_empty(), "rotated arrays are the large inputs");
        let bytes = std::mem::size_of_val(data);
        let budget = if self.is_cpu() {
            CPU_ROTATION_BYTES
        } else {
            GPU_ROTATION_BYTES
        };
        let copies = if simulated() {
            1
        } else {
            budget.div_ceil(bytes).clamp(1, max_copies)
        };
        let buffer = match &self.stream {
            None => Buffer::Host(data.repeat(copies)),
            Some(stream) => {
                let one = stream.clone_htod(data).expect("upload");
                let mut all = unsafe { stream.alloc::<T>(copies * data.len()) }.expect("allocate");
                for c in 0..copies {
                    stream
                        .memcpy_dtod(
                            &one,
                            &mut all.slice_mut(c * data.len()..(c + 1) * data.len()),
                        )
                        .expect("replicate");
                }
                let ptr = raw_address(&all, stream);
                Buffer::Device {
                    slice: all,
                    ptr,
                    len: copies * data.len(),
                }
            }
        };
        Rotated {
            buffer,
            len: data.len(),
            copies,
        }
    }

    /// Median microseconds per call of `call(i)`, `i` counting calls (for rotation). On the CPU: wall clock
    /// per call, at least 3 calls, then up to 200 or half a second. On CUDA: 10 warm-up calls, then 30 batches
    /// of 10 calls timed with events (on the simulator one call, timed once, never reported as speed).
    fn time(&self, mut call: impl FnMut(usize)) -> f64 {
        let Some(stream) = &self.stream else {
            let mut samples = Vec::new();
            let started = Instant::now();
            while samples.len() < 3
                || (started.elapsed().as_secs_f64() < 0.5 && samples.len() < 200)
            {
                let t = Instant::now();
                call(samples.len());
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
            return median(samples);
        };
        let cuda = self.cuda().expect("a stream means CUDA");
        let (warmup, batches, calls_per_batch) = if simulated() { (0, 1, 1) } else { (10, 30, 10) };
        for i in 0..warmup {
            call(i);
        }
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (
            cuda.context().new_event(timing).unwrap(),
            cuda.context().new_event(timing).unwrap(),
        );
        let mut samples = Vec::new();
        for batch in 0..batches {
            start.record(stream).unwrap();
            for i in 0..calls_per_batch {
                call(warmup + batch * calls_per_batch + i);
            }
            end.record(stream).unwrap();
            samples.push(start.elapsed_ms(&end).unwrap() as f64 * 1e3 / calls_per_batch as f64);
        }
        stream.synchronize().expect("benchmark work completes");
        median(samples)
    }
}

/// The address of a cudarc allocation. cudarc's per-stream tracking is not needed: the main job runs every
/// upload, call and download on the target's one stream, which orders them.
fn raw_address<T>(slice: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (ptr, _recorded) = slice.device_ptr(stream);
    ptr
}

impl<T: DeviceRepr + Clone> Buffer<T> {
    fn len(&self) -> usize {
        match self {
            Buffer::Host(data) => data.len(),
            Buffer::Device { len, .. } => *len,
        }
    }

    fn input(&self) -> In<'_, T> {
        self.input_range(0, self.len())
    }

    fn input_range(&self, start: usize, len: usize) -> In<'_, T> {
        match self {
            Buffer::Host(data) => In::Host(&data[start..start + len]),
            Buffer::Device { ptr, .. } => {
                let at = ptr + (start * std::mem::size_of::<T>()) as u64;
                // SAFETY: `len` elements from `start` of the live allocation, borrowed for the view's life, on
                // the target's one stream.
                In::Device(unsafe { DeviceIn::from_raw(at, len) })
            }
        }
    }

    fn output(&mut self) -> Out<'_, T> {
        let len = self.len();
        match self {
            Buffer::Host(data) => Out::Host(data),
            // SAFETY: as in `input_range`, borrowed mutably.
            Buffer::Device { ptr, .. } => Out::Device(unsafe { DeviceOut::from_raw(*ptr, len) }),
        }
    }

    /// The contents, after the work enqueued so far.
    fn download(&self, target: &Target) -> Vec<T> {
        match (self, &target.stream) {
            (Buffer::Host(data), _) => data.clone(),
            (Buffer::Device { slice, .. }, Some(stream)) => {
                let mut all = stream.clone_dtoh(slice).expect("download");
                all.truncate(self.len());
                all
            }
            (Buffer::Device { .. }, None) => unreachable!("device buffers belong to a CUDA target"),
        }
    }
}

impl<T: DeviceRepr + Clone> Rotated<T> {
    /// The copy call `i` reads.
    fn input(&self, i: usize) -> In<'_, T> {
        self.buffer
            .input_range((i % self.copies) * self.len, self.len)
    }
}

/// One greedy-verification case: `batch` requests of `drafts` draft tokens each over vocabulary `vocab`.
#[derive(Clone, Copy)]
struct GreedyCase {
    dtype: DType,
    batch: usize,
    drafts: usize,
    vocab: usize,
}

impl GreedyCase {
    fn rows(&self) -> usize {
        self.batch * (self.drafts + 1)
    }
    fn logits_bytes(&self) -> usize {
        self.rows() * self.vocab * self.dtype.size()
    }
    /// The floor: logits read once, offsets and drafts read, outputs written.
    fn bytes(&self) -> usize {
        self.logits_bytes()
            + 4 * ((self.batch + 1) + self.batch * self.drafts + self.batch * (1 + self.drafts + 1))
    }
}

struct Row {
    case: GreedyCase,
    micros: f64,
    check: String,
}

/// Whether the CUDA backend is the CPU simulator (sim/): its device names itself `specdec-sim`. The simulator's
/// times are of a simulation on the CPU, so each case is then run (and checked) once, and no time is reported
/// as performance.
static SIMULATED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn simulated() -> bool {
    *SIMULATED.get().unwrap_or(&false)
}

/// Prints a section's title and its table's header: `columns` describe the case, then the measured columns
/// every table shares (time, bytes, GB/s, share of the copy bandwidth, check).
fn table_header(title: &str, columns: &[&str]) {
    let time = if simulated() {
        "simulated time (us)"
    } else {
        "time (us)"
    };
    println!("### {title}");
    println!();
    println!(
        "| {} | {time} | bytes (MB) | GB/s | % of copy BW | check |",
        columns.join(" | ")
    );
    let alignments: Vec<&str> = columns
        .iter()
        .enumerate()
        .map(|(i, _)| if i < 2 { "---" } else { "---:" })
        .collect();
    println!("|{}|---:|---:|---:|---:|---|", alignments.join("|"));
}

/// The "GB/s | % of copy BW" cells of a row that moved `bytes` in `micros`: blank on the simulator.
fn rate_cells(bytes: f64, micros: f64, ceiling_gbps: f64) -> String {
    if simulated() {
        return "- | -".to_string();
    }
    let gbps = bytes / micros / 1e3;
    format!("{gbps:.1} | {:.1}", 100.0 * gbps / ceiling_gbps)
}

fn main() {
    let options = parse_options();
    let (target, cuda_unusable) = choose_backend(&options.backend);
    let _ = SIMULATED.set(target.cuda().is_some_and(|cuda| {
        cuda.device_name()
            .is_ok_and(|name| name.starts_with("specdec-sim"))
    }));
    let (machine, ceiling_gbps) = match (target.cuda(), &target.stream) {
        (Some(cuda), Some(stream)) => (gpu_name(cuda), gpu_copy_bandwidth(stream)),
        _ => (cpu_name(), cpu_copy_bandwidth()),
    };

    // On the simulator every case is a CPU's worth of work per CUDA thread: the CPU backend's sizes.
    let cases = if options.wants("greedy") {
        greedy_cases(&options)
    } else {
        Vec::new()
    };
    let mut rows = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        // On a terminal the progress line is redrawn in place; in a log, one line per case.
        let (start, end) = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ("\r", "")
        } else {
            ("", "\n")
        };
        eprint!(
            "{start}[{}/{}] greedy_verify {} B={} k={} V={} ...{end}",
            i + 1,
            cases.len(),
            case.dtype.name(),
            case.batch,
            case.drafts,
            case.vocab
        );
        let _ = std::io::stderr().flush();
        let row = match case.dtype {
            DType::F32 => run_greedy::<f32>(&target, *case),
            DType::F16 => run_greedy::<f16>(&target, *case),
            DType::BF16 => run_greedy::<bf16>(&target, *case),
        };
        rows.push(row);
    }
    if !cases.is_empty() {
        eprintln!("\rdone: {} cases{}", cases.len(), " ".repeat(40));
    }

    let backend_name = match target.cuda() {
        None => format!("cpu ({} threads)", rayon::current_num_threads()),
        Some(cuda) => format!("cuda (device {})", cuda.ordinal()),
    };
    println!("## specdec main job");
    println!();
    println!("- machine: {machine}");
    println!("- backend: {backend_name}");
    if let Some(why) = &cuda_unusable {
        println!("- CUDA unusable, so the CPU backend ran: {why}");
    }
    println!("- date: {} (UTC)", utc_date());
    println!("- commit: {}", commit());
    if simulated() {
        println!(
            "- SIMULATED: the kernels ran on the CPU simulator (sim/), each case once. The times are of the \
             simulation and say nothing about a GPU; GB/s and bandwidth shares are not reported."
        );
    } else {
        println!("- measured copy bandwidth (read + write): {ceiling_gbps:.1} GB/s");
    }
    println!();
    let mut failures = 0;
    if options.wants("greedy") || options.wants("sampling") {
        failures += verify_rows(&options, &target, &rows, ceiling_gbps);
    }
    if options.wants("int4") {
        failures += int4_rows(&target, options.quick, ceiling_gbps);
    }
    if options.wants("attention") {
        failures += attention_rows(&target, options.quick, ceiling_gbps);
    }
    if failures > 0 {
        eprintln!("bench: {failures} case(s) disagree with the CPU reference");
        std::process::exit(1);
    }
}

/// Prints the verification table: the greedy rows already timed, then times and prints the rejection-sampling
/// cases (when `--family sampling` is wanted). Returns the number of rows that disagree with the CPU reference.
fn verify_rows(options: &Options, target: &Target, rows: &[Row], ceiling_gbps: f64) -> usize {
    table_header(
        "Verification (greedy and rejection sampling)",
        &["primitive", "dtype", "B", "k", "V"],
    );
    let mut failures = 0;
    for row in rows {
        let c = row.case;
        println!(
            "| greedy_verify | {} | {} | {} | {} | {:.2} | {:.2} | {} | {} |",
            c.dtype.name(),
            c.batch,
            c.drafts,
            c.vocab,
            row.micros,
            c.bytes() as f64 / 1e6,
            rate_cells(c.bytes() as f64, row.micros, ceiling_gbps),
            row.check
        );
        failures += usize::from(row.check.starts_with("MISMATCH"));
    }
    let gpu_sizes = !target.is_cpu() && !simulated();
    let sampler_cases = if options.wants("sampling") {
        sampler_cases(options.quick, gpu_sizes)
    } else {
        Vec::new()
    };
    for case in sampler_cases {
        let kind = match (case.with_q, case.filtered) {
            (true, true) => "q, top-k 50, top-p 0.9",
            (true, false) => "q",
            (false, _) => "point mass",
        };
        eprintln!(
            "rejection_verify bf16 {kind} B={} k={} V={} ...",
            case.batch, case.drafts, case.vocab
        );
        let (micros, check) = run_sampler(target, case);
        let bytes = case.bytes() as f64;
        println!(
            "| rejection_verify (chain, {kind}) | bf16 | {} | {} | {} | {:.2} | {:.2} | {} | {} |",
            case.batch,
            case.drafts,
            case.vocab,
            micros,
            bytes / 1e6,
            rate_cells(bytes, micros, ceiling_gbps),
            check
        );
        failures += usize::from(check.starts_with("MISMATCH"));
    }
    println!();
    failures
}

/// The greedy-verification cases: bf16 over a grid of batches and vocabularies, then f16 and f32 at one size.
fn greedy_cases(options: &Options) -> Vec<GreedyCase> {
    let mut cases = Vec::new();
    let (batches, vocabs): (&[usize], &[usize]) = if simulated() {
        (&[1, 8], &[32000])
    } else if options.quick {
        (&[1, 64], &[32000, 128256])
    } else {
        (&[1, 8, 64, 256], &[32000, 128256, 151936])
    };
    for &vocab in vocabs {
        for &batch in batches {
            cases.push(GreedyCase {
                dtype: DType::BF16,
                batch,
                drafts: 4,
                vocab,
            });
        }
    }
    for dtype in [DType::F16, DType::F32] {
        cases.push(GreedyCase {
            dtype,
            batch: if simulated() { 8 } else { 64 },
            drafts: 4,
            vocab: if simulated() { 32000 } else { 128256 },
        });
    }
    cases
}

/// One rejection-sampling case: `batch` chains of `drafts` tokens, bf16 logits, temperature 1, with draft rows
/// (`with_q`) or point-mass drafts, and with top-k 50 and top-p 0.9 on every request (`filtered`) or neither.
#[derive(Clone, Copy)]
struct SamplerCase {
    batch: usize,
    drafts: usize,
    vocab: usize,
    with_q: bool,
    filtered: bool,
}

impl SamplerCase {
    /// The floor: target rows (`k + 1` per request) and draft rows (`k`, with q) read once (filtered cases read
    /// them up to ten times more, from L2 when they fit).
    fn bytes(&self) -> usize {
        let rows = self.drafts + 1 + if self.with_q { self.drafts } else { 0 };
        self.batch * rows * self.vocab * 2
    }
}

/// The issue's matrix on CUDA (every B, k, V with draft rows; k = 4 without); a few cases on the CPU.
fn sampler_cases(quick: bool, cuda: bool) -> Vec<SamplerCase> {
    let (batches, drafts, vocabs): (&[usize], &[usize], &[usize]) = match (cuda, quick) {
        (true, false) => (&[1, 8, 64, 256], &[1, 4, 8], &[32000, 128256, 151936]),
        (true, true) => (&[1, 64], &[4], &[128256]),
        (false, false) => (&[1, 8, 64], &[4], &[32000, 128256]),
        (false, true) => (&[1, 8], &[4], &[32000]),
    };
    let mut cases = Vec::new();
    for &vocab in vocabs {
        for &k in drafts {
            for &batch in batches {
                cases.push(SamplerCase {
                    batch,
                    drafts: k,
                    vocab,
                    with_q: true,
                    filtered: false,
                });
                if k == 4 {
                    cases.push(SamplerCase {
                        batch,
                        drafts: k,
                        vocab,
                        with_q: false,
                        filtered: false,
                    });
                }
            }
        }
    }
    // Top-k and top-p (the threshold passes) at a small and a large batch.
    let filtered_vocab = if cuda { 128256 } else { 32000 };
    for batch in [1, if cuda { 64 } else { 8 }] {
        cases.push(SamplerCase {
            batch,
            drafts: 4,
            vocab: filtered_vocab,
            with_q: true,
            filtered: true,
        });
    }
    cases
}

/// Inputs of a sampler case: target logits in [-8, 8), draft logits the target's plus noise in [-0.5, 0.5),
/// each draft the argmax of its draft row (so most are accepted and most rows are visited).
struct SamplerInputs {
    target: Vec<bf16>,
    draft: Vec<bf16>,
    offsets: Vec<i32>,
    tokens: Vec<i32>,
    temperature: Vec<f32>,
    top_k: Vec<i32>,
    top_p: Vec<f32>,
    seeds: Vec<u64>,
    steps: Vec<u64>,
}

fn sampler_inputs(case: SamplerCase) -> SamplerInputs {
    let (b, k, v) = (case.batch, case.drafts, case.vocab);
    let target: Vec<bf16> = (0..b * (k + 1) * v)
        .into_par_iter()
        .map(|i| {
            let mut state = 0x5A3B ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            bf16::from_f32((splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 * 16.0 - 8.0)
        })
        .collect();
    let mut draft = vec![bf16::ZERO; b * k * v];
    draft.par_chunks_mut(v).enumerate().for_each(|(row, out)| {
        let (r, j) = (row / k, row % k);
        let source = &target[(r * (k + 1) + j) * v..][..v];
        let mut state = 0xD4AF ^ row as u64;
        for (x, t) in out.iter_mut().zip(source) {
            let noise = (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            *x = bf16::from_f32(t.to_f32() + noise);
        }
    });
    let tokens: Vec<i32> = draft
        .par_chunks(v)
        .map(|row| cpu::argmax(row) as i32)
        .collect();
    SamplerInputs {
        target,
        draft,
        offsets: (0..=b).map(|r| (r * k) as i32).collect(),
        tokens,
        temperature: vec![1.0; b],
        top_k: vec![if case.filtered { 50 } else { -1 }; b],
        top_p: vec![if case.filtered { 0.9 } else { 1.0 }; b],
        seeds: (0..b as u64).map(|r| r * 7919 + 1).collect(),
        steps: vec![0; b],
    }
}

/// The arrays of a sampler case's call, in `rows` (target, then draft rows with `with_q`) and `arrays`
/// (offsets, tokens, temperature, top-k, top-p, seeds, steps), as `VerifyInputs` of call `i`.
fn sampler_call_inputs<'a>(
    case: SamplerCase,
    target_rows: &'a Rotated<bf16>,
    draft_rows: Option<&'a Rotated<bf16>>,
    arrays: &'a SamplerArrays,
    i: usize,
) -> specdec::sampling::VerifyInputs<'a> {
    use specdec::sampling::{Drafts, Rows, SamplingParams, VerifyInputs};
    VerifyInputs {
        vocab_size: case.vocab,
        drafts: Drafts::Chain {
            draft_offsets: arrays.offsets.input(),
            draft_tokens: arrays.tokens.input(),
        },
        target: Rows::LogitsBF16(target_rows.input(i)),
        draft: draft_rows.map(|d| Rows::LogitsBF16(d.input(i))),
        params: Some(SamplingParams {
            temperature: arrays.temperature.input(),
            top_k: case.filtered.then(|| arrays.top_k.input()),
            top_p: case.filtered.then(|| arrays.top_p.input()),
        }),
        draft_params: None,
        seeds: arrays.seeds.input(),
        steps: arrays.steps.input(),
    }
}

/// A sampler case's small arrays in the target's memory.
struct SamplerArrays {
    offsets: Buffer<i32>,
    tokens: Buffer<i32>,
    temperature: Buffer<f32>,
    top_k: Buffer<i32>,
    top_p: Buffer<f32>,
    seeds: Buffer<u64>,
    steps: Buffer<u64>,
}

impl SamplerArrays {
    fn new(target: &Target, inputs: &SamplerInputs) -> Self {
        SamplerArrays {
            offsets: target.upload(&inputs.offsets),
            tokens: target.upload(&inputs.tokens),
            temperature: target.upload(&inputs.temperature),
            top_k: target.upload(&inputs.top_k),
            top_p: target.upload(&inputs.top_p),
            seeds: target.upload(&inputs.seeds),
            steps: target.upload(&inputs.steps),
        }
    }
}

/// Runs a sampler case on `target` (timed) and, on CUDA, on the CPU reference; returns the time and the check.
/// On CUDA every request is compared with the CPU reference (with draft rows, a token may differ where softmax
/// sums round differently: more than 1 in 100 requests is a mismatch).
fn run_sampler(target: &Target, case: SamplerCase) -> (f64, String) {
    let inputs = sampler_inputs(case);
    let (b, w) = (case.batch, case.drafts + 1);
    let run = |on: &Target, timed: bool| {
        let target_rows = on.rotated(&inputs.target, 4096);
        let draft_rows = case.with_q.then(|| on.rotated(&inputs.draft, 4096));
        let arrays = SamplerArrays::new(on, &inputs);
        let mut accepted = on.upload(&vec![-7; b]);
        let mut emitted = on.upload(&vec![-7; b * w]);
        let mut call = |i: usize| {
            let call_inputs =
                sampler_call_inputs(case, &target_rows, draft_rows.as_ref(), &arrays, i);
            let outputs = specdec::sampling::VerifyOutputs {
                emit_width: w,
                accepted_counts: accepted.output(),
                emitted_tokens: emitted.output(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            };
            on.backend
                .rejection_verify(on.stream(), &call_inputs, outputs)
                .expect("rejection_verify");
        };
        let micros = if timed { on.time(&mut call) } else { 0.0 };
        if !timed {
            call(0);
        }
        (micros, accepted.download(on), emitted.download(on))
    };
    let (micros, accepted, emitted) = run(target, true);
    if target.is_cpu() {
        return (micros, NOT_CHECKED_ON_CPU.into());
    }
    let (_, want_accepted, want_emitted) = run(&Target::cpu(), false);
    let differ = (0..b)
        .filter(|&r| {
            accepted[r] != want_accepted[r]
                || emitted[r * w..(r + 1) * w] != want_emitted[r * w..(r + 1) * w]
        })
        .count();
    // Softmax sums (draft rows, top-p's cut) round differently on the two sides.
    let check = match (differ, case.with_q || case.filtered) {
        (0, _) => "= CPU reference".to_string(),
        (n, true) if n * 100 <= b => format!("{n} of {b} requests differ (rounding)"),
        (n, _) => format!("MISMATCH ({n} of {b} requests differ)"),
    };
    (micros, check)
}

/// The backend `--backend` asks for, and why CUDA was not used when `auto` fell back to the CPU.
fn choose_backend(choice: &str) -> (Target, Option<String>) {
    if choice == "cpu" {
        return (Target::cpu(), None);
    }
    match CudaBackend::new(0) {
        Ok(cuda) => {
            let stream = cuda.context().new_stream().expect("create a CUDA stream");
            let target = Target {
                backend: specdec::backend::Backend::Cuda(cuda),
                stream: Some(stream),
            };
            (target, None)
        }
        Err(e) if choice == "cuda" => {
            eprintln!("bench: --backend cuda, but CUDA is unusable: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("bench: CUDA unusable ({e}); running on the CPU backend");
            (Target::cpu(), Some(e.to_string()))
        }
    }
}

/// Values the generator can produce in every logits type.
trait BenchElement: LogitsElement + DeviceRepr + Default {
    fn from_f32(x: f32) -> Self;
}
impl BenchElement for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl BenchElement for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}
impl BenchElement for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// SplitMix64: a fast, seeded generator for benchmark inputs.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct GreedyInputs<T> {
    logits: Vec<T>,
    offsets: Vec<i32>,
    drafts: Vec<i32>,
    width: usize,
}

/// Random logits in [-8, 8); every draft equals its row's argmax, so every row must be read.
fn greedy_inputs<T: BenchElement>(case: GreedyCase) -> GreedyInputs<T> {
    let len = case.rows() * case.vocab;
    let mut logits = vec![T::default(); len];
    logits
        .par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(chunk, out)| {
            let mut state = 0x5EED ^ chunk as u64;
            for x in out {
                *x = T::from_f32(
                    (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 * 16.0 - 8.0,
                );
            }
        });
    let offsets: Vec<i32> = (0..=case.batch).map(|b| (b * case.drafts) as i32).collect();
    let mut drafts = Vec::with_capacity(case.batch * case.drafts);
    for b in 0..case.batch {
        for j in 0..case.drafts {
            let row = b * (case.drafts + 1) + j;
            drafts.push(cpu::argmax(&logits[row * case.vocab..(row + 1) * case.vocab]) as i32);
        }
    }
    GreedyInputs {
        logits,
        offsets,
        drafts,
        width: case.drafts + 1,
    }
}

fn reference(case: GreedyCase, inputs: &GreedyInputs<impl BenchElement>) -> (Vec<i32>, Vec<i32>) {
    let (mut accepted, mut emitted) = (vec![0; case.batch], vec![0; case.batch * inputs.width]);
    cpu::greedy_verify(
        &inputs.logits,
        case.vocab,
        &inputs.offsets,
        &inputs.drafts,
        inputs.width,
        &mut accepted,
        &mut emitted,
        None,
    )
    .expect("benchmark inputs are valid");
    (accepted, emitted)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn run_greedy<T: BenchElement>(target: &Target, case: GreedyCase) -> Row {
    let inputs = greedy_inputs::<T>(case);
    let (want_accepted, want_emitted) = reference(case, &inputs);
    let all_accepted = want_accepted.iter().all(|&n| n as usize == case.drafts);
    assert!(
        all_accepted,
        "benchmark drafts are argmaxes, so all are accepted"
    );
    let logits = target.rotated(&inputs.logits, 4096);
    let (offsets, drafts) = (
        target.upload(&inputs.offsets),
        target.upload(&inputs.drafts),
    );
    let mut accepted = target.upload(&vec![-7; case.batch]);
    let mut emitted = target.upload(&vec![-7; case.batch * inputs.width]);
    let micros = target.time(|i| {
        let call_inputs = specdec::greedy::GreedyInputs {
            logits: logits.input(i),
            vocab_size: case.vocab,
            draft_offsets: offsets.input(),
            draft_tokens: drafts.input(),
        };
        let outputs = specdec::greedy::GreedyOutputs {
            emit_width: inputs.width,
            accepted_counts: accepted.output(),
            emitted_tokens: emitted.output(),
            request_status: None,
        };
        target
            .backend
            .greedy_verify(target.stream(), &call_inputs, outputs)
            .expect("greedy_verify");
    });
    let check = if target.is_cpu() {
        NOT_CHECKED_ON_CPU.to_string()
    } else {
        let (accepted, emitted) = (accepted.download(target), emitted.download(target));
        if accepted == want_accepted && emitted == want_emitted {
            "= CPU reference".to_string()
        } else {
            let first = emitted.iter().zip(&want_emitted).position(|(a, b)| a != b);
            format!("MISMATCH (first emitted difference at {first:?})")
        }
    };
    Row {
        case,
        micros,
        check,
    }
}

/// Device-to-device copy of 1 GiB, median of 10, counting bytes read plus bytes written (on the simulator, a
/// token 1 MiB: the figure is not reported).
fn gpu_copy_bandwidth(stream: &Arc<CudaStream>) -> f64 {
    let n = if simulated() {
        1usize << 20
    } else {
        1usize << 30
    };
    let src = stream.alloc_zeros::<u8>(n).expect("allocate copy source");
    let mut dst = stream
        .alloc_zeros::<u8>(n)
        .expect("allocate copy destination");
    let ctx = stream.context();
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (
        ctx.new_event(timing).unwrap(),
        ctx.new_event(timing).unwrap(),
    );
    stream.memcpy_dtod(&src, &mut dst).unwrap();
    let samples = (0..10)
        .map(|_| {
            start.record(stream).unwrap();
            stream.memcpy_dtod(&src, &mut dst).unwrap();
            end.record(stream).unwrap();
            2.0 * n as f64 / (start.elapsed_ms(&end).unwrap() as f64 * 1e6)
        })
        .collect();
    median(samples)
}

/// A copy of 512 MiB split over every thread of the CPU backend's pool, median of 7, read + write bytes.
fn cpu_copy_bandwidth() -> f64 {
    let n = 512usize << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let chunk = n / rayon::current_num_threads().max(1);
    let samples = (0..7)
        .map(|_| {
            let t = Instant::now();
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            2.0 * n as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(samples)
}

fn gpu_name(backend: &CudaBackend) -> String {
    let mut driver = 0;
    // SAFETY: writes one int; libcuda is loaded (the backend exists).
    unsafe { sys::cuDriverGetVersion(&mut driver) };
    format!(
        "{} ({} SMs), CUDA driver API {}.{}, kernels built for sm_{:?}",
        backend.device_name().unwrap_or_else(|e| e.to_string()),
        backend.multiprocessors(),
        driver / 1000,
        driver % 1000 / 10,
        specdec::cuda::COMPILED_ARCHS
    )
}

fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!(
        "{model}, {} CPUs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )
}

fn commit() -> String {
    if let Ok(commit) = std::env::var("SPECDEC_COMMIT") {
        return commit;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Today's date in UTC as YYYY-MM-DD (days-from-civil inverted; no date crate needed).
fn utc_date() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The issue's GEMV shapes (N x K) and, for the requantization total, the remaining Llama-3-8B projection shape.
const GEMV_SHAPES: [(usize, usize); 5] = [
    (4096, 4096),
    (4096, 14336),
    (14336, 4096),
    (8192, 28672),
    (28672, 8192),
];
/// Llama-3-8B's linear layers per transformer block (q, k, v, o, gate, up, down) as (N, K); 32 blocks.
const LLAMA3_8B_LAYER: [(usize, usize); 7] = [
    (4096, 4096),
    (1024, 4096),
    (1024, 4096),
    (4096, 4096),
    (14336, 4096),
    (14336, 4096),
    (4096, 14336),
];

/// int4 rows: the GEMV (g128, bf16 activations and scales) for every issue shape and M in {1, 2, 4, 8, 16},
/// and the quantizer per shape with the Llama-3-8B total. Returns the number of mismatches.
fn int4_rows(target: &Target, quick: bool, ceiling_gbps: f64) -> usize {
    table_header(
        "int4 GEMV and quantizer (W4A16)",
        &["primitive", "dtype", "N", "K", "M", "group"],
    );
    // The GPU's shapes, or the CPU's (also on the simulator).
    let cuda = !target.is_cpu() && !simulated();
    let mut failures = 0;
    let ms: &[usize] = if quick || !cuda {
        &[1, 16]
    } else {
        &[1, 2, 4, 8, 16]
    };
    let shapes: &[(usize, usize)] = if cuda {
        &GEMV_SHAPES
    } else if simulated() {
        &GEMV_SHAPES[..1]
    } else {
        &GEMV_SHAPES[..3]
    };
    for &(n, k) in shapes {
        let shape = Int4Shape::new(n, k, 128).expect("benchmark shapes are valid");
        let mut state = (n * 31 + k) as u64;
        let w: Vec<bf16> = (0..n * k)
            .map(|_| {
                bf16::from_f32(
                    ((splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05,
                )
            })
            .collect();
        let (mut packed, mut scales, mut zeros) = (
            vec![0u32; shape.packed_len()],
            vec![bf16::ZERO; shape.meta_len()],
            vec![0u8; shape.meta_len()],
        );
        cpu::int4_quantize(&shape, &w, &mut packed, &mut scales, &mut zeros).expect("valid shape");
        for &m in ms {
            eprintln!("int4_gemv bf16 g128 N={n} K={k} M={m} ...");
            let gemv = GemvShape::new(m, shape).expect("valid");
            let x: Vec<bf16> = (0..m * k)
                .map(|_| {
                    bf16::from_f32((splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                })
                .collect();
            // The weights rotate (they are what a GEMV streams); the activations stay.
            let copies = 16;
            let (packed_r, scales_r, zeros_r) = (
                target.rotated(&packed, copies),
                target.rotated(&scales, copies),
                target.rotated(&zeros, copies),
            );
            let xs = target.upload(&x);
            let mut y = target.upload(&vec![bf16::NAN; m * n]);
            let micros = target.time(|i| {
                let args = Int4Gemv {
                    shape: gemv,
                    packed: packed_r.input(i),
                    scales: scales_r.input(i),
                    zeros: zeros_r.input(i),
                    x: xs.input(),
                    y: y.output(),
                };
                target
                    .backend
                    .int4_gemv(target.stream(), args)
                    .expect("int4_gemv");
            });
            let check = if target.is_cpu() {
                NOT_CHECKED_ON_CPU.to_string()
            } else {
                let mut want = vec![bf16::ZERO; m * n];
                cpu::int4_gemv(&gemv, &packed, &scales, &zeros, &x, &mut want)
                    .expect("valid inputs");
                compare_outputs(&y.download(target), &want, n)
            };
            let bytes =
                (shape.packed_len() * 4 + shape.meta_len() * 3 + (m * k + m * n) * 2) as f64;
            println!(
                "| int4_gemv | bf16 | {n} | {k} | {m} | 128 | {micros:.2} | {:.2} | {} | {check} |",
                bytes / 1e6,
                rate_cells(bytes, micros, ceiling_gbps)
            );
            failures += usize::from(check.starts_with("MISMATCH"));
        }
    }
    // The quantizer, per distinct Llama-3-8B projection shape.
    let mut total_micros = 0.0;
    let mut distinct: Vec<(usize, usize)> = LLAMA3_8B_LAYER.to_vec();
    distinct.sort();
    distinct.dedup();
    if simulated() {
        distinct.truncate(1);
    }
    for &(n, k) in &distinct {
        eprintln!("int4_quantize bf16 g128 N={n} K={k} ...");
        let shape = Int4Shape::new(n, k, 128).expect("valid");
        let mut state = (n * 7 + k) as u64;
        let w: Vec<bf16> = (0..n * k)
            .map(|_| {
                bf16::from_f32(
                    ((splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05,
                )
            })
            .collect();
        let weights = target.rotated(&w, 16);
        let mut packed = target.upload(&vec![0u32; shape.packed_len()]);
        let mut scales = target.upload(&vec![bf16::ZERO; shape.meta_len()]);
        let mut zeros = target.upload(&vec![0u8; shape.meta_len()]);
        let micros = target.time(|i| {
            let args = Int4Quantize {
                shape,
                weights: weights.input(i),
                packed: packed.output(),
                scales: scales.output(),
                zeros: zeros.output(),
            };
            target
                .backend
                .int4_quantize(target.stream(), args)
                .expect("int4_quantize");
        });
        let check = if target.is_cpu() {
            NOT_CHECKED_ON_CPU.to_string()
        } else {
            let (mut want_packed, mut want_scales, mut want_zeros) = (
                vec![0u32; shape.packed_len()],
                vec![bf16::ZERO; shape.meta_len()],
                vec![0u8; shape.meta_len()],
            );
            cpu::int4_quantize(
                &shape,
                &w,
                &mut want_packed,
                &mut want_scales,
                &mut want_zeros,
            )
            .expect("valid");
            let bits = |s: &[bf16]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let same = packed.download(target) == want_packed
                && bits(&scales.download(target)) == bits(&want_scales)
                && zeros.download(target) == want_zeros;
            if same {
                "= CPU bytes".to_string()
            } else {
                "MISMATCH (bytes differ)".to_string()
            }
        };
        let uses = LLAMA3_8B_LAYER.iter().filter(|&&s| s == (n, k)).count();
        total_micros += 32.0 * uses as f64 * micros;
        let bytes = (n * k * 2 + shape.packed_len() * 4 + shape.meta_len() * 3) as f64;
        println!(
            "| int4_quantize | bf16 | {n} | {k} | - | 128 | {micros:.2} | {:.2} | {} | {check} |",
            bytes / 1e6,
            rate_cells(bytes, micros, ceiling_gbps)
        );
        failures += usize::from(check.starts_with("MISMATCH"));
    }
    println!();
    if !simulated() {
        println!(
            "Requantizing every linear layer of Llama-3-8B (32 blocks x q, k, v, o, gate, up, down; one launch per \
             layer, sum of the per-shape times above): {:.2} ms",
            total_micros / 1e3
        );
    }
    println!();
    failures
}

/// `got` against the CPU reference: within 2 ulps of bf16 plus 2^-12 of the largest output of its row block.
fn compare_outputs(got: &[bf16], want: &[bf16], n: usize) -> String {
    let mut worst: f64 = 0.0;
    for (block_got, block_want) in got.chunks(n).zip(want.chunks(n)) {
        let scale = block_want
            .iter()
            .map(|v| f64::from(v.to_f32()).abs())
            .fold(0.0, f64::max);
        for (g, w) in block_got.iter().zip(block_want) {
            let (g, w) = (f64::from(g.to_f32()), f64::from(w.to_f32()));
            let tolerance = 2.0 * w.abs().max(1e-30) * 2f64.powi(-8) + scale * 2f64.powi(-12);
            let ratio = (g - w).abs() / tolerance;
            worst = if ratio.is_nan() {
                f64::INFINITY
            } else {
                worst.max(ratio)
            };
        }
    }
    if worst <= 1.0 {
        format!("~ CPU reference ({:.0}% of tolerance)", 100.0 * worst)
    } else {
        format!("MISMATCH ({worst:.1}x the tolerance)")
    }
}

/// Tree-attention rows: Llama-3-8B-shaped heads (32 q, 8 kv, D = 128, bf16, pages of 16), full binary trees,
/// every request with the same prefix length. Bytes are the floor: the prefix KV read once, plus q, k, v and
/// out. On CUDA every listed size runs; the outputs are checked for NaN and the request status only (exactness is
/// tests/attention_gpu's job). On the CPU one small case runs. Returns the number of failed checks.
fn attention_rows(target: &Target, quick: bool, ceiling_gbps: f64) -> usize {
    let (hq, hkv, d, ps) = (32usize, 8usize, 128usize, 16usize);
    table_header(
        "Tree attention over a paged KV cache (append, no RoPE)",
        &["primitive", "dtype", "B", "L", "T", "Hq / Hkv", "D", "page"],
    );
    let cases: Vec<(usize, usize, usize)> = match target.is_cpu() {
        true => vec![(1, 1024, 8)],
        false if simulated() => vec![(1, 1024, 8), (2, 512, 64)],
        false if quick => vec![(1, 8192, 16), (16, 8192, 1), (16, 8192, 64)],
        false => {
            let mut all = Vec::new();
            for batch in [1, 16, 64] {
                for prefix in [1024, 8192, 32768] {
                    for tree in [1, 8, 16, 64] {
                        all.push((batch, prefix, tree));
                    }
                }
            }
            all
        }
    };
    let mut failures = 0;
    for (batch, prefix, tree) in cases {
        eprintln!("tree_attention bf16 B={batch} L={prefix} T={tree} ...");
        let pages_per_request = (prefix + tree).div_ceil(ps);
        let cache = PagedCacheShape::new(batch * pages_per_request, ps, hkv, d, pages_per_request)
            .expect("valid");
        let shape =
            TreeAttentionShape::new(batch, batch * tree, hq, tree, cache, None).expect("valid");
        let parents: Vec<i32> = (0..batch)
            .flat_map(|_| (0..tree as i32).map(|i| if i == 0 { -1 } else { (i - 1) / 2 }))
            .collect();
        let offsets: Vec<i32> = (0..=batch).map(|b| (b * tree) as i32).collect();
        let prefix_lens = vec![prefix as i32; batch];
        // Pages in reverse order, so that no request reads its pages in address order.
        let page_table: Vec<i32> = (0..batch * pages_per_request)
            .rev()
            .map(|p| p as i32)
            .collect();
        let mut state = (batch * 7919 + prefix + tree) as u64;
        let mut values = |n: usize| -> Vec<bf16> {
            (0..n)
                .map(|_| {
                    bf16::from_f32((splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                })
                .collect()
        };
        let (q, k, v) = (
            values(shape.q_len()),
            values(shape.kv_len()),
            values(shape.kv_len()),
        );
        let scale = 1.0 / (d as f32).sqrt();
        let up = |x: &[i32]| target.upload(x);
        let (o, p, l, t) = (
            up(&offsets),
            up(&parents),
            up(&prefix_lens),
            up(&page_table),
        );
        let (qd, kd, vd) = (target.upload(&q), target.upload(&k), target.upload(&v));
        // The caches: 0.25 and -0.5 everywhere (what they hold does not change the work).
        let mut kc = target.filled(cache.cache_len(), bf16::from_f32(0.25));
        let mut vc = target.filled(cache.cache_len(), bf16::from_f32(-0.5));
        let mut out = target.upload(&vec![bf16::ZERO; shape.q_len()]);
        let mut status = target.upload(&vec![-9i32; batch]);
        let micros = target.time(|_| {
            let inputs = TreeAttentionInputs {
                shape,
                q: qd.input(),
                k: kd.input(),
                v: vd.input(),
                token_offsets: o.input(),
                parents: p.input(),
                prefix_lens: l.input(),
                page_table: t.input(),
                cos_sin_cache: None,
                softmax_scale: scale,
            };
            let outputs = TreeAttentionOutputs {
                k_cache: kc.output(),
                v_cache: vc.output(),
                out: out.output(),
                lse: None,
                request_status: Some(status.output()),
            };
            target
                .backend
                .tree_attention(target.stream(), &inputs, outputs)
                .expect("tree_attention");
        });
        let check = if target.is_cpu() {
            NOT_CHECKED_ON_CPU.to_string()
        } else {
            let (out, status) = (out.download(target), status.download(target));
            if status.iter().any(|&s| s != 0) {
                format!("MISMATCH (request_status {status:?})")
            } else if out.iter().any(|x| !x.to_f32().is_finite()) {
                "MISMATCH (non-finite output)".to_string()
            } else {
                "status ok, finite".to_string()
            }
        };
        let bytes =
            (batch * prefix * hkv * d * 2 * 2 + batch * tree * (2 * hq + 2 * hkv) * d * 2) as f64;
        println!(
            "| tree_attention | bf16 | {batch} | {prefix} | {tree} | {hq} / {hkv} | {d} | {ps} | {micros:.2} | {:.2} | {} | {check} |",
            bytes / 1e6,
            rate_cells(bytes, micros, ceiling_gbps)
        );
        failures += usize::from(check.starts_with("MISMATCH"));
    }
    println!();
    failures
}
