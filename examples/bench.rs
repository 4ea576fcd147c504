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
//! Timing: on CUDA, events around batches of calls on one stream, the median over batches, inputs rotated over
//! copies that together exceed the L2 cache; on the CPU, wall-clock per call, the median. Bandwidth ceiling:
//! a device-to-device copy (CUDA) or a multi-threaded memcpy (CPU), counting bytes read plus bytes written.
//! Greedy inputs have every draft equal to its row's argmax, so every backend must read every logits row.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use half::{bf16, f16};
use rayon::prelude::*;
use specdec::attention::{
    PagedCacheShape, TreeAttentionInputs, TreeAttentionOutputs, TreeAttentionShape, TreeBatch,
};
use specdec::backend::Stream;
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

enum Backend {
    Cpu,
    Cuda {
        backend: CudaBackend,
        stream: Arc<CudaStream>,
    },
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
    let (backend, cuda_unusable) = choose_backend(&options.backend);
    let _ = SIMULATED.set(match &backend {
        Backend::Cuda { backend, .. } => backend
            .device_name()
            .is_ok_and(|name| name.starts_with("specdec-sim")),
        Backend::Cpu => false,
    });
    let (machine, ceiling_gbps) = match &backend {
        Backend::Cpu => (cpu_name(), cpu_copy_bandwidth()),
        Backend::Cuda { backend, stream } => (gpu_name(backend), gpu_copy_bandwidth(stream)),
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
            DType::F32 => run_greedy::<f32>(&backend, *case),
            DType::F16 => run_greedy::<f16>(&backend, *case),
            DType::BF16 => run_greedy::<bf16>(&backend, *case),
        };
        rows.push(row);
    }
    if !cases.is_empty() {
        eprintln!("\rdone: {} cases{}", cases.len(), " ".repeat(40));
    }

    let backend_name = match &backend {
        Backend::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Backend::Cuda { backend, .. } => format!("cuda (device {})", backend.ordinal()),
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
        failures += verify_rows(&options, &backend, &rows, ceiling_gbps);
    }
    if options.wants("int4") {
        failures += int4_rows(&backend, options.quick, ceiling_gbps);
    }
    if options.wants("attention") {
        failures += attention_rows(&backend, options.quick, ceiling_gbps);
    }
    if failures > 0 {
        eprintln!("bench: {failures} case(s) disagree with the CPU reference");
        std::process::exit(1);
    }
}

/// Prints the verification table: the greedy rows already timed, then times and prints the rejection-sampling
/// cases (when `--family sampling` is wanted). Returns the number of rows that disagree with the CPU reference.
fn verify_rows(options: &Options, backend: &Backend, rows: &[Row], ceiling_gbps: f64) -> usize {
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
    let gpu_sizes = matches!(backend, Backend::Cuda { .. }) && !simulated();
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
        let (micros, check) = run_sampler(backend, case);
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

/// The CPU reference's accepted counts and emitted tokens, and its median time.
fn sampler_cpu(
    case: SamplerCase,
    inputs: &SamplerInputs,
    timed: bool,
) -> (f64, Vec<i32>, Vec<i32>) {
    use specdec::sampling::{Drafts, Rows, SamplingParams, VerifyInputs, VerifyOutputs};
    let (b, k) = (case.batch, case.drafts);
    let verify_inputs = VerifyInputs {
        vocab_size: case.vocab,
        drafts: Drafts::Chain {
            draft_offsets: (&inputs.offsets).into(),
            draft_tokens: (&inputs.tokens).into(),
        },
        target: Rows::LogitsBF16((&inputs.target).into()),
        draft: case
            .with_q
            .then_some(Rows::LogitsBF16((&inputs.draft).into())),
        params: Some(SamplingParams {
            temperature: (&inputs.temperature).into(),
            top_k: case.filtered.then_some((&inputs.top_k[..]).into()),
            top_p: case.filtered.then_some((&inputs.top_p[..]).into()),
        }),
        draft_params: None,
        seeds: (&inputs.seeds).into(),
        steps: (&inputs.steps).into(),
    };
    let (mut accepted, mut emitted) = (vec![0; b], vec![0; b * (k + 1)]);
    let mut samples = Vec::new();
    let started = Instant::now();
    loop {
        let outputs = VerifyOutputs {
            emit_width: k + 1,
            accepted_counts: (&mut accepted).into(),
            emitted_tokens: (&mut emitted).into(),
            accepted_nodes: None,
            accept_flags: None,
            request_status: None,
        };
        let t = Instant::now();
        cpu::rejection_verify(&verify_inputs, outputs).expect("valid inputs");
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        if !timed
            || samples.len() >= 50
            || (samples.len() >= 3 && started.elapsed().as_secs_f64() > 0.5)
        {
            break;
        }
    }
    (median(samples), accepted, emitted)
}

/// Times a sampler case on the backend; on CUDA, compares every request with the CPU reference (with draft
/// rows, a token may differ where softmax sums round differently: more than 1 in 100 requests is a mismatch).
fn run_sampler(backend: &Backend, case: SamplerCase) -> (f64, String) {
    let inputs = sampler_inputs(case);
    match backend {
        Backend::Cpu => (
            sampler_cpu(case, &inputs, true).0,
            NOT_CHECKED_ON_CPU.into(),
        ),
        Backend::Cuda { backend, stream } => {
            let (micros, accepted, emitted) = time_sampler_cuda(backend, stream, case, &inputs);
            let (_, want_accepted, want_emitted) = sampler_cpu(case, &inputs, false);
            let w = case.drafts + 1;
            let differ = (0..case.batch)
                .filter(|&r| {
                    accepted[r] != want_accepted[r]
                        || emitted[r * w..(r + 1) * w] != want_emitted[r * w..(r + 1) * w]
                })
                .count();
            // Softmax sums (draft rows, top-p's cut) round differently on the two sides.
            let check = match (differ, case.with_q || case.filtered) {
                (0, _) => "= CPU reference".to_string(),
                (n, true) if n * 100 <= case.batch => {
                    format!("{n} of {} requests differ (rounding)", case.batch)
                }
                (n, _) => format!("MISMATCH ({n} of {} requests differ)", case.batch),
            };
            (micros, check)
        }
    }
}

fn time_sampler_cuda(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    case: SamplerCase,
    inputs: &SamplerInputs,
) -> (f64, Vec<i32>, Vec<i32>) {
    use specdec::sampling::{Drafts, Rows, SamplingParams, VerifyInputs, VerifyOutputs};
    let (b, w) = (case.batch, case.drafts + 1);
    let (target_len, draft_len) = (inputs.target.len(), inputs.draft.len());
    let per_call = 2 * (target_len + if case.with_q { draft_len } else { 0 });
    let copies = GPU_ROTATION_BYTES.div_ceil(per_call).clamp(1, 4096);
    let replicate = |host: &[bf16]| -> CudaSlice<bf16> {
        let one = stream.clone_htod(host).expect("upload");
        let mut all =
            unsafe { stream.alloc::<bf16>(copies * host.len()) }.expect("allocate rotated rows");
        for c in 0..copies {
            stream
                .memcpy_dtod(
                    &one,
                    &mut all.slice_mut(c * host.len()..(c + 1) * host.len()),
                )
                .expect("replicate rows");
        }
        all
    };
    let target = replicate(&inputs.target);
    let draft = replicate(if case.with_q {
        &inputs.draft
    } else {
        &inputs.draft[..1]
    });
    let offsets = stream.clone_htod(&inputs.offsets).expect("upload");
    let tokens = stream.clone_htod(&inputs.tokens).expect("upload");
    let temperature = stream.clone_htod(&inputs.temperature).expect("upload");
    let top_k = stream.clone_htod(&inputs.top_k).expect("upload");
    let top_p = stream.clone_htod(&inputs.top_p).expect("upload");
    let seeds = stream.clone_htod(&inputs.seeds).expect("upload");
    let steps = stream.clone_htod(&inputs.steps).expect("upload");
    let mut accepted = stream.clone_htod(&vec![-7; b]).expect("poisoned output");
    let mut emitted = stream
        .clone_htod(&vec![-7; b * w])
        .expect("poisoned output");
    let (t, _t) = target.device_ptr(stream);
    let (d, _d) = draft.device_ptr(stream);
    let (o, _o) = offsets.device_ptr(stream);
    let (k, _k) = tokens.device_ptr(stream);
    let (tp, _tp) = temperature.device_ptr(stream);
    let (tk, _tk) = top_k.device_ptr(stream);
    let (pp, _pp) = top_p.device_ptr(stream);
    let (sd, _sd) = seeds.device_ptr(stream);
    let (st, _st) = steps.device_ptr(stream);
    let (a, _a) = accepted.device_ptr_mut(stream);
    let (e, _e) = emitted.device_ptr_mut(stream);
    let cuda = specdec::backend::Backend::Cuda(backend.clone());
    let call = |i: usize| {
        let c = (i % copies) as u64;
        // SAFETY: every pointer is a live allocation of at least the length given, used on `stream` only.
        unsafe {
            let device_inputs = VerifyInputs {
                vocab_size: case.vocab,
                drafts: Drafts::Chain {
                    draft_offsets: DeviceIn::from_raw(o, b + 1).into(),
                    draft_tokens: DeviceIn::from_raw(k, inputs.tokens.len()).into(),
                },
                target: Rows::LogitsBF16(
                    DeviceIn::from_raw(t + c * 2 * target_len as u64, target_len).into(),
                ),
                draft: case.with_q.then(|| {
                    Rows::LogitsBF16(
                        DeviceIn::from_raw(d + c * 2 * draft_len as u64, draft_len).into(),
                    )
                }),
                params: Some(SamplingParams {
                    temperature: DeviceIn::from_raw(tp, b).into(),
                    top_k: case.filtered.then(|| DeviceIn::from_raw(tk, b).into()),
                    top_p: case.filtered.then(|| DeviceIn::from_raw(pp, b).into()),
                }),
                draft_params: None,
                seeds: DeviceIn::from_raw(sd, b).into(),
                steps: DeviceIn::from_raw(st, b).into(),
            };
            let outputs = VerifyOutputs {
                emit_width: w,
                accepted_counts: DeviceOut::from_raw(a, b).into(),
                emitted_tokens: DeviceOut::from_raw(e, b * w).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            };
            cuda.rejection_verify(Stream::Cuda(stream), &device_inputs, outputs)
        }
        .expect("rejection_verify launch");
    };
    let micros = time_cuda_calls(backend, stream, call);
    drop((_t, _d, _o, _k, _tp, _tk, _pp, _sd, _st, _a, _e));
    stream.synchronize().expect("benchmark work completes");
    (
        micros,
        stream.clone_dtoh(&accepted).unwrap(),
        stream.clone_dtoh(&emitted).unwrap(),
    )
}

/// The backend `--backend` asks for, and why CUDA was not used when `auto` fell back to the CPU.
fn choose_backend(choice: &str) -> (Backend, Option<String>) {
    if choice == "cpu" {
        return (Backend::Cpu, None);
    }
    match CudaBackend::new(0) {
        Ok(backend) => {
            let stream = backend
                .context()
                .new_stream()
                .expect("create a CUDA stream");
            (Backend::Cuda { backend, stream }, None)
        }
        Err(e) if choice == "cuda" => {
            eprintln!("bench: --backend cuda, but CUDA is unusable: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("bench: CUDA unusable ({e}); running on the CPU backend");
            (Backend::Cpu, Some(e.to_string()))
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

fn run_greedy<T: BenchElement>(backend: &Backend, case: GreedyCase) -> Row {
    let inputs = greedy_inputs::<T>(case);
    let (want_accepted, want_emitted) = reference(case, &inputs);
    let all_accepted = want_accepted.iter().all(|&n| n as usize == case.drafts);
    assert!(
        all_accepted,
        "benchmark drafts are argmaxes, so all are accepted"
    );
    match backend {
        Backend::Cpu => {
            let copies = CPU_ROTATION_BYTES
                .div_ceil(case.logits_bytes())
                .clamp(1, 64);
            let rotated: Vec<Vec<T>> = (0..copies).map(|_| inputs.logits.clone()).collect();
            let (mut accepted, mut emitted) =
                (vec![0; case.batch], vec![0; case.batch * inputs.width]);
            let mut samples = Vec::new();
            let started = Instant::now();
            while samples.len() < 5
                || (started.elapsed().as_secs_f64() < 0.5 && samples.len() < 200)
            {
                let logits = &rotated[samples.len() % copies];
                let t = Instant::now();
                cpu::greedy_verify(
                    logits,
                    case.vocab,
                    &inputs.offsets,
                    &inputs.drafts,
                    inputs.width,
                    &mut accepted,
                    &mut emitted,
                    None,
                )
                .expect("valid inputs");
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Row {
                case,
                micros: median(samples),
                check: NOT_CHECKED_ON_CPU.into(),
            }
        }
        Backend::Cuda { backend, stream } => {
            let (micros, accepted, emitted) = time_greedy_cuda(backend, stream, case, &inputs);
            let check = if accepted == want_accepted && emitted == want_emitted {
                "= CPU reference".to_string()
            } else {
                let first = emitted.iter().zip(&want_emitted).position(|(a, b)| a != b);
                format!("MISMATCH (first emitted difference at {first:?})")
            };
            Row {
                case,
                micros,
                check,
            }
        }
    }
}

fn time_greedy_cuda<T: BenchElement>(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    case: GreedyCase,
    inputs: &GreedyInputs<T>,
) -> (f64, Vec<i32>, Vec<i32>) {
    let len = inputs.logits.len();
    let copies = GPU_ROTATION_BYTES
        .div_ceil(case.logits_bytes())
        .clamp(1, 4096);
    let one: CudaSlice<T> = stream.clone_htod(&inputs.logits).expect("upload logits");
    let mut rotated: CudaSlice<T> =
        unsafe { stream.alloc::<T>(copies * len) }.expect("allocate rotated logits");
    for c in 0..copies {
        stream
            .memcpy_dtod(&one, &mut rotated.slice_mut(c * len..(c + 1) * len))
            .expect("replicate logits");
    }
    let offsets = stream.clone_htod(&inputs.offsets).expect("upload offsets");
    let drafts = stream.clone_htod(&inputs.drafts).expect("upload drafts");
    let mut accepted = stream
        .clone_htod(&vec![-7; case.batch])
        .expect("poisoned output");
    let mut emitted = stream
        .clone_htod(&vec![-7; case.batch * inputs.width])
        .expect("poisoned output");

    let (base, _r) = rotated.device_ptr(stream);
    let (o, _o) = offsets.device_ptr(stream);
    let (d, _d) = drafts.device_ptr(stream);
    let (a, _a) = accepted.device_ptr_mut(stream);
    let (e, _e) = emitted.device_ptr_mut(stream);
    let elem = std::mem::size_of::<T>() as u64;
    let cuda = specdec::backend::Backend::Cuda(backend.clone());
    let inputs_width = inputs.width;
    let call = |i: usize| {
        let logits = base + (i % copies * len) as u64 * elem;
        // SAFETY: every pointer is a live allocation above of the stated length, used on `stream`.
        unsafe {
            let inputs = specdec::greedy::GreedyInputs {
                logits: DeviceIn::<T>::from_raw(logits, len).into(),
                vocab_size: case.vocab,
                draft_offsets: DeviceIn::from_raw(o, case.batch + 1).into(),
                draft_tokens: DeviceIn::from_raw(d, inputs.drafts.len()).into(),
            };
            let outputs = specdec::greedy::GreedyOutputs {
                emit_width: inputs_width,
                accepted_counts: DeviceOut::from_raw(a, case.batch).into(),
                emitted_tokens: DeviceOut::from_raw(e, case.batch * inputs_width).into(),
                request_status: None,
            };
            cuda.greedy_verify(Stream::Cuda(stream), &inputs, outputs)
        }
        .expect("greedy_verify launch");
    };
    let micros = time_cuda_calls(backend, stream, call);
    drop((_r, _o, _d, _a, _e));
    stream.synchronize().expect("benchmark work completes");
    (
        micros,
        stream.clone_dtoh(&accepted).unwrap(),
        stream.clone_dtoh(&emitted).unwrap(),
    )
}

/// Median microseconds per call of `call(i)` (which enqueues call `i` on `stream`): 10 warm-up calls, then
/// 30 batches of 10 calls timed with CUDA events.
fn time_cuda_calls(backend: &CudaBackend, stream: &Arc<CudaStream>, call: impl Fn(usize)) -> f64 {
    // On the simulator: one call, timed once (the number is the simulation's, and never reported as speed).
    let (warmup, batches, calls_per_batch) = if simulated() { (0, 1, 1) } else { (10, 30, 10) };
    for i in 0..warmup {
        call(i);
    }
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (
        backend.context().new_event(timing).unwrap(),
        backend.context().new_event(timing).unwrap(),
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
    median(samples)
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
fn int4_rows(backend: &Backend, quick: bool, ceiling_gbps: f64) -> usize {
    table_header(
        "int4 GEMV and quantizer (W4A16)",
        &["primitive", "dtype", "N", "K", "M", "group"],
    );
    // The GPU's shapes, or the CPU's (also on the simulator).
    let cuda = matches!(backend, Backend::Cuda { .. }) && !simulated();
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
            let mut want = vec![bf16::ZERO; m * n];
            let t = Instant::now();
            cpu::int4_gemv(&gemv, &packed, &scales, &zeros, &x, &mut want).expect("valid inputs");
            let cpu_micros = t.elapsed().as_secs_f64() * 1e6;
            let (micros, check) = match backend {
                Backend::Cpu => (cpu_micros, NOT_CHECKED_ON_CPU.to_string()),
                Backend::Cuda { backend, stream } => {
                    let (micros, got) =
                        time_gemv_cuda(backend, stream, &gemv, &packed, &scales, &zeros, &x);
                    (micros, compare_outputs(&got, &want, n))
                }
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
        let (mut packed, mut scales, mut zeros) = (
            vec![0u32; shape.packed_len()],
            vec![bf16::ZERO; shape.meta_len()],
            vec![0u8; shape.meta_len()],
        );
        let t = Instant::now();
        cpu::int4_quantize(&shape, &w, &mut packed, &mut scales, &mut zeros).expect("valid");
        let cpu_micros = t.elapsed().as_secs_f64() * 1e6;
        let (micros, check) = match backend {
            Backend::Cpu => (cpu_micros, NOT_CHECKED_ON_CPU.to_string()),
            Backend::Cuda { backend, stream } => {
                let (micros, got) = time_quantize_cuda(backend, stream, &shape, &w);
                let same = got.0 == packed
                    && got
                        .1
                        .iter()
                        .map(|v| v.to_bits())
                        .eq(scales.iter().map(|v| v.to_bits()))
                    && got.2 == zeros;
                (
                    micros,
                    if same {
                        "= CPU bytes".to_string()
                    } else {
                        "MISMATCH (bytes differ)".to_string()
                    },
                )
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

/// Times the GEMV over weight copies rotated past the L2 cache; returns (median us, output of the last call).
#[allow(clippy::too_many_arguments)]
fn time_gemv_cuda(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    shape: &GemvShape,
    packed: &[u32],
    scales: &[bf16],
    zeros: &[u8],
    x: &[bf16],
) -> (f64, Vec<bf16>) {
    let w = &shape.weights;
    let weight_bytes = w.packed_len() * 4 + w.meta_len() * 3;
    let copies = GPU_ROTATION_BYTES.div_ceil(weight_bytes).clamp(1, 64);
    let packed_all = stream
        .clone_htod(&packed.repeat(copies))
        .expect("upload packed");
    let scales_all = stream
        .clone_htod(&scales.repeat(copies))
        .expect("upload scales");
    let zeros_all = stream
        .clone_htod(&zeros.repeat(copies))
        .expect("upload zeros");
    let xs = stream.clone_htod(x).expect("upload x");
    let mut y = stream
        .clone_htod(&vec![bf16::NAN; shape.y_len()])
        .expect("poisoned output");
    let (p, _p) = packed_all.device_ptr(stream);
    let (s, _s) = scales_all.device_ptr(stream);
    let (z, _z) = zeros_all.device_ptr(stream);
    let (xp, _x) = xs.device_ptr(stream);
    let (yp, _y) = y.device_ptr_mut(stream);
    let cuda = specdec::backend::Backend::Cuda(backend.clone());
    let call = |i: usize| {
        let c = (i % copies) as u64;
        // SAFETY: copy `c` of each array lies inside the live allocations above; used on `stream`.
        unsafe {
            let args = Int4Gemv::<bf16, bf16> {
                shape: *shape,
                packed: DeviceIn::from_raw(p + c * (w.packed_len() * 4) as u64, w.packed_len())
                    .into(),
                scales: DeviceIn::from_raw(s + c * (w.meta_len() * 2) as u64, w.meta_len()).into(),
                zeros: DeviceIn::from_raw(z + c * w.meta_len() as u64, w.meta_len()).into(),
                x: DeviceIn::from_raw(xp, shape.x_len()).into(),
                y: DeviceOut::from_raw(yp, shape.y_len()).into(),
            };
            cuda.int4_gemv(Stream::Cuda(stream), args)
        }
        .expect("int4_gemv launch");
    };
    let micros = time_cuda_calls(backend, stream, call);
    drop((_p, _s, _z, _x, _y));
    stream.synchronize().expect("benchmark work completes");
    (micros, stream.clone_dtoh(&y).unwrap())
}

/// `(packed, scales, zeros)` of a quantized matrix, read back from the device.
type QuantizedArrays = (Vec<u32>, Vec<bf16>, Vec<u8>);

/// Times the quantizer; returns (median us, the arrays of the last call).
fn time_quantize_cuda(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    shape: &Int4Shape,
    w: &[bf16],
) -> (f64, QuantizedArrays) {
    let copies = GPU_ROTATION_BYTES.div_ceil(w.len() * 2).clamp(1, 16);
    let weights = stream
        .clone_htod(&w.repeat(copies))
        .expect("upload weights");
    let mut packed = stream
        .alloc_zeros::<u32>(shape.packed_len())
        .expect("alloc");
    let mut scales = stream.alloc_zeros::<bf16>(shape.meta_len()).expect("alloc");
    let mut zeros = stream.alloc_zeros::<u8>(shape.meta_len()).expect("alloc");
    let (wp, _w) = weights.device_ptr(stream);
    let (p, _p) = packed.device_ptr_mut(stream);
    let (s, _s) = scales.device_ptr_mut(stream);
    let (z, _z) = zeros.device_ptr_mut(stream);
    let cuda = specdec::backend::Backend::Cuda(backend.clone());
    let call = |i: usize| {
        let c = (i % copies) as u64;
        // SAFETY: copy `c` of the weights and the outputs are live allocations of the stated lengths.
        unsafe {
            let args = Int4Quantize::<bf16, bf16> {
                shape: *shape,
                weights: DeviceIn::from_raw(wp + c * (w.len() * 2) as u64, w.len()).into(),
                packed: DeviceOut::from_raw(p, shape.packed_len()).into(),
                scales: DeviceOut::from_raw(s, shape.meta_len()).into(),
                zeros: DeviceOut::from_raw(z, shape.meta_len()).into(),
            };
            cuda.int4_quantize(Stream::Cuda(stream), args)
        }
        .expect("int4_quantize launch");
    };
    let micros = time_cuda_calls(backend, stream, call);
    drop((_w, _p, _s, _z));
    stream.synchronize().expect("benchmark work completes");
    (
        micros,
        (
            stream.clone_dtoh(&packed).unwrap(),
            stream.clone_dtoh(&scales).unwrap(),
            stream.clone_dtoh(&zeros).unwrap(),
        ),
    )
}

/// Tree-attention rows: Llama-3-8B-shaped heads (32 q, 8 kv, D = 128, bf16, pages of 16), full binary trees,
/// every request with the same prefix length. Bytes are the floor: the prefix KV read once, plus q, k, v and
/// out. On CUDA every listed size runs; the outputs are checked for NaN and the request status only (exactness is
/// tests/attention_gpu's job). On the CPU one small case runs. Returns the number of failed checks.
fn attention_rows(backend: &Backend, quick: bool, ceiling_gbps: f64) -> usize {
    let (hq, hkv, d, ps) = (32usize, 8usize, 128usize, 16usize);
    table_header(
        "Tree attention over a paged KV cache (append, no RoPE)",
        &["primitive", "dtype", "B", "L", "T", "Hq / Hkv", "D", "page"],
    );
    let cases: Vec<(usize, usize, usize)> = match backend {
        Backend::Cpu => vec![(1, 1024, 8)],
        Backend::Cuda { .. } if simulated() => vec![(1, 1024, 8), (2, 512, 64)],
        Backend::Cuda { .. } if quick => vec![(1, 8192, 16), (16, 8192, 1), (16, 8192, 64)],
        Backend::Cuda { .. } => {
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
        let (micros, check) = match backend {
            Backend::Cpu => {
                let (mut kc, mut vc) = (values(cache.cache_len()), values(cache.cache_len()));
                let mut out = vec![bf16::ZERO; shape.q_len()];
                let batch_arrays = TreeBatch {
                    token_offsets: &offsets,
                    parents: &parents,
                    prefix_lens: &prefix_lens,
                    page_table: &page_table,
                };
                let t = Instant::now();
                cpu::tree_attention(
                    &shape,
                    &q,
                    &k,
                    &v,
                    &batch_arrays,
                    None,
                    scale,
                    &mut kc,
                    &mut vc,
                    &mut out,
                    None,
                    None,
                )
                .expect("valid inputs");
                (
                    t.elapsed().as_secs_f64() * 1e6,
                    NOT_CHECKED_ON_CPU.to_string(),
                )
            }
            Backend::Cuda { backend, stream } => {
                let up = |x: &[i32]| stream.clone_htod(x).expect("upload");
                let (o, p, l, t) = (
                    up(&offsets),
                    up(&parents),
                    up(&prefix_lens),
                    up(&page_table),
                );
                let (qd, kd, vd) = (
                    stream.clone_htod(&q).expect("upload q"),
                    stream.clone_htod(&k).expect("upload k"),
                    stream.clone_htod(&v).expect("upload v"),
                );
                let mut kc = stream
                    .alloc_zeros::<bf16>(cache.cache_len())
                    .expect("k cache");
                let mut vc = stream
                    .alloc_zeros::<bf16>(cache.cache_len())
                    .expect("v cache");
                for (buffer, pattern) in [(&mut kc, 0x3E80u16), (&mut vc, 0xBF00u16)] {
                    let (ptr, _sync) = buffer.device_ptr_mut(stream);
                    // SAFETY: fills the whole live allocation with a bf16 pattern (0.25 and -0.5), on `stream`.
                    unsafe {
                        sys::cuMemsetD16Async(ptr, pattern, cache.cache_len(), stream.cu_stream())
                    }
                    .result()
                    .expect("fill the cache");
                }
                let mut out = stream.alloc_zeros::<bf16>(shape.q_len()).expect("out");
                let mut status = stream.clone_htod(&vec![-9i32; batch]).expect("status");
                let (qp, _a) = qd.device_ptr(stream);
                let (kp, _b) = kd.device_ptr(stream);
                let (vp, _c) = vd.device_ptr(stream);
                let (op, _d) = o.device_ptr(stream);
                let (pp, _e) = p.device_ptr(stream);
                let (lp, _f) = l.device_ptr(stream);
                let (tp, _g) = t.device_ptr(stream);
                let (kcp, _h) = kc.device_ptr_mut(stream);
                let (vcp, _i) = vc.device_ptr_mut(stream);
                let (outp, _j) = out.device_ptr_mut(stream);
                let (sp, _k) = status.device_ptr_mut(stream);
                let cuda = specdec::backend::Backend::Cuda(backend.clone());
                let call = |_: usize| {
                    // SAFETY: every pointer is a live allocation of the length given, used on `stream`.
                    unsafe {
                        let inputs = TreeAttentionInputs::<bf16> {
                            shape,
                            q: DeviceIn::from_raw(qp, shape.q_len()).into(),
                            k: DeviceIn::from_raw(kp, shape.kv_len()).into(),
                            v: DeviceIn::from_raw(vp, shape.kv_len()).into(),
                            token_offsets: DeviceIn::from_raw(op, batch + 1).into(),
                            parents: DeviceIn::from_raw(pp, batch * tree).into(),
                            prefix_lens: DeviceIn::from_raw(lp, batch).into(),
                            page_table: DeviceIn::from_raw(tp, page_table.len()).into(),
                            cos_sin_cache: None,
                            softmax_scale: scale,
                        };
                        let outputs = TreeAttentionOutputs {
                            k_cache: DeviceOut::from_raw(kcp, cache.cache_len()).into(),
                            v_cache: DeviceOut::from_raw(vcp, cache.cache_len()).into(),
                            out: DeviceOut::from_raw(outp, shape.q_len()).into(),
                            lse: None,
                            request_status: Some(DeviceOut::from_raw(sp, batch).into()),
                        };
                        cuda.tree_attention(Stream::Cuda(stream), &inputs, outputs)
                    }
                    .expect("tree_attention launch");
                };
                let micros = time_cuda_calls(backend, stream, call);
                drop((_a, _b, _c, _d, _e, _f, _g, _h, _i, _j, _k));
                stream.synchronize().expect("benchmark work completes");
                let out = stream.clone_dtoh(&out).expect("read out");
                let status = stream.clone_dtoh(&status).expect("read status");
                let check = if status.iter().any(|&s| s != 0) {
                    format!("MISMATCH (request_status {status:?})")
                } else if out.iter().any(|x| !x.to_f32().is_finite()) {
                    "MISMATCH (non-finite output)".to_string()
                } else {
                    "status ok, finite".to_string()
                };
                (micros, check)
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
