//! specdec's main job: GRPO-style rollouts of SmolLM2-135M-Instruct with and without speculation, on the CPU
//! backend, timed per policy, with the same seeds for every policy.
//!
//! A workload is P prompts x G samples, up to N new tokens each, over I iterations; each iteration decodes
//! its P x G rollouts as one batch that shrinks as rollouts finish (the long tail that decides an RL step's
//! rollout time). The suffix drafter's history persists across iterations, as across training epochs.
//!
//! ```text
//! cargo run --release -p specdec-rollout --bin rollout -- [--prompts 4] [--samples 4] [--max-new-tokens 64]
//! ```

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use specdec::drafter::{Drafter, DrafterConfig, LengthClasses};
use specdec::policy::{sibling_exponent, StepKind};
use specdec::sampling::noise::sample_seed;
use specdec_rollout::engine::{decode, DecodeSettings, DecodeStats, Drafting, Request, StepRecord};
use specdec_rollout::model::{model_path, GgufFile, Weights};
use specdec_rollout::policy::{calibrate, Calibration, CALIBRATION_SEQUENCES};
use specdec_rollout::pq::{PqSample, SiblingLaw};
use specdec_rollout::target::{Target, GGUF_LLAMA_ROPE};
use specdec_rollout::tokenizer::{ChatTokenizer, Message};

/// GRPO-style rollouts of SmolLM2-135M-Instruct, autoregressive and speculative, through specdec.
#[derive(Parser, Debug)]
struct Args {
    /// P: prompts per iteration, the first P lines of rollout/data/prompts.txt.
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// G: samples per prompt.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// N: most new tokens per rollout.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// I: iterations (the drafter's history grows across them).
    #[arg(long, default_value_t = 2)]
    iterations: usize,
    /// Sampling temperature (1 as in RL; 0 is greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus sampling threshold, 1 off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// The base of every rollout's sampler seed.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Where to write the picture of active batch and tokens per rollout-step over time (SVG).
    #[arg(long, default_value = "target/rollout-timeline.svg")]
    svg: std::path::PathBuf,
    /// Where to write the JSON log (one object per line) of the target's and the int4 drafter's rows at the
    /// logged drafted positions.
    #[arg(long, default_value = "target/rollout-pq.jsonl")]
    pq_log: std::path::PathBuf,
    /// Log the drafted positions of every rollout's decoding steps 0, E, 2E, ... (0: none).
    #[arg(long, default_value_t = 4)]
    pq_every: u64,
}

/// The name of the policy whose suffix drafter applies DAS's length classes.
const DAS_CLASSES: &str = "suffix chain, DAS length classes";

const POLICIES: [(&str, Drafting); 8] = [
    ("autoregressive", Drafting::None),
    ("suffix chain (DAS)", Drafting::SuffixChain),
    (DAS_CLASSES, Drafting::SuffixChain),
    ("suffix tree", Drafting::SuffixTree),
    ("goodput, suffix chains (specdec)", Drafting::GoodputChain),
    (
        "int4 self-drafter, k = 4 (EfficientRollout's drafter)",
        Drafting::Int4Chain { k: 4 },
    ),
    (
        "int4, EfficientRollout's toggle and ladder",
        Drafting::EfficientRolloutInt4,
    ),
    (
        "goodput, int4 chains (specdec)",
        Drafting::GoodputInt4 { max_k: 8 },
    ),
];

#[derive(Default)]
struct PolicyRun {
    stats: DecodeStats,
    attention: Duration,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let prompts_text = include_str!("../../data/prompts.txt");
    let questions: Vec<&str> = prompts_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        (1..=questions.len()).contains(&args.prompts),
        "--prompts is {}; rollout/data/prompts.txt has {}",
        args.prompts,
        questions.len()
    );
    ensure!(
        args.samples >= 1 && args.max_new_tokens >= 1 && args.iterations >= 1,
        "P, G, N and I are at least 1"
    );

    let path = model_path()?;
    let load = Instant::now();
    let mut file = GgufFile::open(&path)?;
    let tokenizer = ChatTokenizer::from_gguf(&file)?;
    let weights = Weights::from_gguf(&mut file)?;
    let config = weights.config;
    let stop = tokenizer
        .token_id("<|im_end|>")
        .context("<|im_end|> in the vocabulary")?;
    let batch = args.prompts * args.samples;
    let pages_per_sequence = 1024 / 16;
    // Room for the batch, and for calibration's copies of a prompt beside the prompt itself.
    let sequences = batch.max(CALIBRATION_SEQUENCES);
    let mut target = Target::new(
        weights,
        sequences * pages_per_sequence,
        16,
        1024,
        GGUF_LLAMA_ROPE,
    )?;
    eprintln!(
        "rollout: {} ({} layers, hidden {}, {} q / {} kv heads, vocab {}) loaded in {:.1} s",
        path.display(),
        config.num_layers,
        config.hidden,
        config.num_q_heads,
        config.num_kv_heads,
        config.vocab,
        load.elapsed().as_secs_f64()
    );

    let prompts: Vec<Vec<u32>> = questions[..args.prompts]
        .iter()
        .map(|q| tokenizer.encode_chat(&[Message::user(*q)]))
        .collect::<Result<_>>()?;
    // As after an RL weight update: every linear layer and the LM head requantized to int4.
    let requantization = target.requantize_drafter()?;
    let drafter_bytes = target.drafter().map_or(0, |d| d.bytes());
    let calibration = calibrate(&mut target, &prompts[0])?;
    let mut runs = Vec::new();
    let mut pq_log: Vec<(&str, usize, PqSample)> = Vec::new();
    for &(name, drafting) in &POLICIES {
        let drafter = Drafter::new(DrafterConfig {
            length_classes: (name == DAS_CLASSES).then(|| das_length_classes(args.max_new_tokens)),
            ..DrafterConfig::default()
        })?;
        let mut run = PolicyRun::default();
        let attention_before = target.attention_time();
        for iteration in 0..args.iterations {
            drafter.begin_iteration(iteration as u64)?;
            let requests: Vec<Request> = (0..batch)
                .map(|r| Request {
                    id: r as u64,
                    prompt_id: (r / args.samples) as u64,
                    prompt: prompts[r / args.samples].clone(),
                    seed: sample_seed(args.seed + iteration as u64, r as u64),
                })
                .collect();
            let settings = DecodeSettings {
                max_new_tokens: args.max_new_tokens,
                stop_token: stop,
                temperature: args.temperature,
                top_p: args.top_p,
                drafting,
                cost: Some(calibration.cost),
                int4_cost: calibration.int4.as_ref().map(|c| c.cost),
                pq_every: args.pq_every,
            };
            let (outputs, mut stats) = decode(&mut target, Some(&drafter), &requests, &settings)?;
            pq_log.extend(stats.pq.drain(..).map(|s| (name, iteration, s)));
            eprintln!(
                "rollout: {name}, iteration {iteration}: {} tokens in {} steps, {:.1} s; first rollout: {:?}",
                stats.generated,
                stats.steps,
                stats.wall.as_secs_f64(),
                tokenizer.decode(&outputs[0])?
            );
            accumulate(&mut run.stats, &stats);
        }
        run.attention = target.attention_time() - attention_before;
        runs.push((name, run));
    }
    print_report(&args, &runs);
    println!(
        "\nThe int4 self-drafter: {} linear layers and the LM head requantized by specdec's quantizer (group size \
         64, bf16 scales) in {:.0} ms, {:.1} MB of int4 weights. Its draft forward passes count as drafting; their \
         attention is in the attention column too.",
        7 * config.num_layers,
        requantization.as_secs_f64() * 1e3,
        drafter_bytes as f64 / 1e6
    );
    print_calibration(&calibration);
    print_sibling_law(&args, &pq_log);
    let lines: String = pq_log
        .iter()
        .map(|(name, iteration, s)| s.json_line(name, *iteration) + "\n")
        .collect();
    write_file(&args.pq_log, &lines)?;
    eprintln!(
        "rollout: {} drafted positions' p and q rows written to {}",
        pq_log.len(),
        args.pq_log.display()
    );
    write_file(&args.svg, &timeline_svg(&runs, batch))?;
    eprintln!("rollout: timeline written to {}", args.svg.display());
    Ok(())
}

/// DAS's length classes for this workload: the drafter's defaults (Long from 1024 generated tokens, Medium from
/// 256, budgets 24 / 8 / 0) are for generations of up to 4096 tokens; here the thresholds are the same shares
/// of `max_new_tokens` (a quarter and a sixteenth), the budgets unchanged.
fn das_length_classes(max_new_tokens: usize) -> LengthClasses {
    LengthClasses {
        long_threshold: max_new_tokens.div_ceil(4),
        medium_threshold: max_new_tokens.div_ceil(16),
        ..LengthClasses::default()
    }
}

fn write_file(path: &std::path::Path, contents: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// The tree policy's sibling law against the one measured on the logged positions of each policy that
/// logged any: per draft depth and over all, the probability that `w` children drawn from the drafter are all
/// rejected, measured (exact, per position, averaged) and assumed (the law at the positions' mean acceptance),
/// over the positions the verification reached (the nodes the law prices).
fn print_sibling_law(args: &Args, log: &[(&str, usize, PqSample)]) {
    if log.is_empty() {
        return;
    }
    println!(
        "\nThe sibling law on the real rows (issue 19, item 7): at the int4 drafter's drafted positions of every \
         rollout's steps 0, {e}, {}, ... (log: {}), the target's row p and the drafter's row q at the run's \
         temperature and top-p; P(w rejected) is the probability that w children drawn i.i.d. from q are all \
         rejected against p, measured exactly per position (specdec::policy::recursive_rejection_misses) and \
         averaged over the positions the verification reached, against the tree policy's law (1 - a) w^-g(a) at \
         their mean acceptance a. The implied g solves the law at w = 2 for the measured value.\n",
        2 * args.pq_every,
        args.pq_log.display(),
        e = args.pq_every,
    );
    println!(
        "| policy | depth | positions reached | mean a | accepted in the run | P(2 rejected) measured / assumed | \
         P(4 rejected) measured / assumed | P(8 rejected) measured / assumed | g implied at w = 2 / g(a) |"
    );
    println!("|---|---|---:|---:|---:|---|---|---|---|");
    let mut names: Vec<&str> = log.iter().map(|(n, _, _)| *n).collect();
    names.dedup();
    for name in names {
        let samples: Vec<&PqSample> = log
            .iter()
            .filter(|(n, _, s)| *n == name && s.reached)
            .map(|(_, _, s)| s)
            .collect();
        let depths = samples.iter().map(|s| s.depth).max().unwrap_or(0);
        for depth in (0..=depths).map(|d| (d > 0).then_some(d)) {
            let chosen: Vec<&PqSample> = samples
                .iter()
                .copied()
                .filter(|s| depth.is_none_or(|d| s.depth == d))
                .collect();
            let Some(law) = SiblingLaw::of(chosen.iter().copied()) else {
                continue;
            };
            let accepted = chosen.iter().filter(|s| s.accepted).count();
            let pair = |w: usize| format!("{:.3} / {:.3}", law.measured[w - 1], law.assumed[w - 1]);
            println!(
                "| {name} | {} | {} | {:.3} | {:.3} | {} | {} | {} | {:.3} / {:.3} |",
                depth.map_or("all".to_string(), |d| d.to_string()),
                law.positions,
                law.acceptance,
                accepted as f64 / law.positions as f64,
                pair(2),
                pair(4),
                pair(8),
                law.implied_exponent(2),
                sibling_exponent(law.acceptance),
            );
        }
    }
}

fn accumulate(total: &mut DecodeStats, s: &DecodeStats) {
    let offset = total.wall.as_secs_f64();
    total.timeline.extend(s.timeline.iter().map(|r| StepRecord {
        end: r.end + offset,
        ..*r
    }));
    total.steps += s.steps;
    total.rollout_steps += s.rollout_steps;
    total.drafted += s.drafted;
    total.accepted += s.accepted;
    total.generated += s.generated;
    total.wall += s.wall;
    total.target += s.target;
    total.drafting += s.drafting;
    total.sampling += s.sampling;
    for (sum, add) in [
        (&mut total.accepted_at, &s.accepted_at),
        (&mut total.drafted_at, &s.drafted_at),
    ] {
        if sum.len() < add.len() {
            sum.resize(add.len(), 0);
        }
        for (a, b) in sum.iter_mut().zip(add) {
            *a += b;
        }
    }
}

fn print_report(args: &Args, runs: &[(&str, PolicyRun)]) {
    println!(
        "## Rollouts of SmolLM2-135M-Instruct: P = {} prompts x G = {} samples, N = {} new tokens, I = {} \
         iterations, temperature {}, top-p {}, CPU backend ({} threads)\n",
        args.prompts,
        args.samples,
        args.max_new_tokens,
        args.iterations,
        args.temperature,
        args.top_p,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "| policy | makespan (s) | vs autoregressive | tokens | tokens/s | target forwards | tokens per rollout-step | \
         drafts accepted | target (s) | of which attention (s) | drafting (s) | sampler (s) | other (s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let baseline = runs[0].1.stats.wall.as_secs_f64();
    for (name, run) in runs {
        let s = &run.stats;
        let wall = s.wall.as_secs_f64();
        let other =
            wall - s.target.as_secs_f64() - s.drafting.as_secs_f64() - s.sampling.as_secs_f64();
        println!(
            "| {name} | {wall:.2} | {:.3} | {} | {:.1} | {} | {:.2} | {} / {} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} |",
            wall / baseline,
            s.generated,
            s.generated as f64 / wall,
            s.steps,
            s.generated as f64 / s.rollout_steps as f64,
            s.accepted,
            s.drafted,
            s.target.as_secs_f64(),
            run.attention.as_secs_f64(),
            s.drafting.as_secs_f64(),
            s.sampling.as_secs_f64(),
            other
        );
    }
    println!("\nAcceptance per draft position (accepted / drafted at depth j):\n");
    for (name, run) in runs.iter().skip(1) {
        let cells: Vec<String> = run
            .stats
            .drafted_at
            .iter()
            .zip(&run.stats.accepted_at)
            .take(8)
            .enumerate()
            .map(|(j, (&d, &a))| format!("j={} {:.2} ({a}/{d})", j + 1, a as f64 / d.max(1) as f64))
            .collect();
        println!("- {name}: {}", cells.join(", "));
    }
}

fn print_calibration(c: &Calibration) {
    let o = &c.cost.overheads;
    // Residuals of the steps the policy prices (target and verification).
    let residuals: Vec<(f64, f64)> = c
        .samples
        .iter()
        .filter_map(|s| match s.kind {
            StepKind::Target => Some((s.seconds, c.cost.target_step(s.batch, s.context_tokens))),
            StepKind::Verify { tokens } => Some((
                s.seconds,
                c.cost.verify_step(s.batch, s.context_tokens, tokens),
            )),
            StepKind::Draft => None,
        })
        .collect();
    let rms = (residuals.iter().map(|(m, p)| (m - p).powi(2)).sum::<f64>()
        / residuals.len() as f64)
        .sqrt();
    let worst = residuals
        .iter()
        .map(|(m, p)| ((m - p) / m).abs())
        .fold(0.0, f64::max);
    println!(
        "\nCost model of the goodput policy, fitted on this machine (`CostModel::fit` on {} step times): measured \
         copy bandwidth {:.1} GB/s, f32 matmul rate {:.1} GFLOP/s; fitted overheads t0 = {:.2} ms per step, \
         t1 = {:.3} ms per sequence, v1 = {:.3} ms per verified token; residuals over the {} target and \
         verification steps: rms {:.2} ms, largest {:.0}% of its step.\n",
        c.report.samples,
        c.bandwidth / 1e9,
        c.flops / 1e9,
        o.t0 * 1e3,
        o.t1 * 1e3,
        o.v1 * 1e3,
        residuals.len(),
        rms * 1e3,
        worst * 100.0
    );
    println!("| step | batch | tokens | measured (ms) | model (ms) |");
    println!("|---|---|---|---|---|");
    for s in &c.samples {
        let (name, tokens, model) = match s.kind {
            StepKind::Target => (
                "target",
                s.batch,
                c.cost.target_step(s.batch, s.context_tokens),
            ),
            StepKind::Verify { tokens } => (
                "verify",
                tokens,
                c.cost.verify_step(s.batch, s.context_tokens, tokens),
            ),
            // Suffix chains are priced as model-free: the draft terms are never used.
            StepKind::Draft => ("suffix proposals", s.batch, f64::NAN),
        };
        println!(
            "| {name} | {} | {tokens} | {:.3} | {:.3} |",
            s.batch,
            s.seconds * 1e3,
            model * 1e3
        );
    }
    if let Some(int4) = &c.int4 {
        let o = &int4.cost.overheads;
        println!(
            "\nThe int4 policies' cost model: the same target and verification steps, and the int4 self-drafter's \
             draft steps (one token per sequence); fitted draft overheads d0 = {:.2} ms per step, d1 = {:.3} ms \
             per sequence.\n",
            o.d0 * 1e3,
            o.d1 * 1e3
        );
        println!("| step | batch | measured (ms) | model (ms) |");
        println!("|---|---|---|---|");
        for s in &int4.samples {
            println!(
                "| int4 draft | {} | {:.3} | {:.3} |",
                s.batch,
                s.seconds * 1e3,
                int4.cost.draft_step(s.batch, s.context_tokens) * 1e3
            );
        }
    }
}

/// One panel per policy, on one time axis: the active batch (a step line, blue) and the tokens each rollout
/// kept per step (orange), over wall seconds.
fn timeline_svg(runs: &[(&str, PolicyRun)], batch: usize) -> String {
    const WIDTH: f64 = 860.0;
    const PANEL: f64 = 150.0;
    const LEFT: f64 = 60.0;
    const PLOT_W: f64 = 760.0;
    const PLOT_H: f64 = 100.0;
    let longest = runs
        .iter()
        .map(|(_, r)| r.stats.wall.as_secs_f64())
        .fold(1e-9, f64::max);
    let most_tokens = runs
        .iter()
        .flat_map(|(_, r)| {
            r.stats
                .timeline
                .iter()
                .map(|s| s.emitted as f64 / s.active as f64)
        })
        .fold(1.0, f64::max);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{}\" font-family=\"sans-serif\" \
         font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        PANEL * runs.len() as f64 + 30.0
    );
    for (p, (name, run)) in runs.iter().enumerate() {
        let top = 20.0 + PANEL * p as f64;
        let x = |t: f64| LEFT + PLOT_W * t / longest;
        let y = |v: f64, max: f64| top + PLOT_H * (1.0 - v / max);
        svg += &format!(
            "<text x=\"{LEFT}\" y=\"{}\">{name}: {:.1} s; blue: active batch (0..{batch}), orange: tokens per \
             rollout-step (0..{most_tokens:.1})</text>\n<rect x=\"{LEFT}\" y=\"{top}\" width=\"{PLOT_W}\" \
             height=\"{PLOT_H}\" fill=\"none\" stroke=\"#999\"/>\n",
            top - 5.0,
            run.stats.wall.as_secs_f64()
        );
        // Each step is a horizontal segment over its duration, in both series.
        let (mut active, mut tokens) = (String::new(), String::new());
        let mut previous_end = 0.0;
        for r in &run.stats.timeline {
            let (x0, x1) = (x(previous_end), x(r.end));
            let a = y(r.active as f64, batch as f64);
            let t = y(r.emitted as f64 / r.active as f64, most_tokens);
            active += &format!("{x0:.1},{a:.1} {x1:.1},{a:.1} ");
            tokens += &format!("M{x0:.1},{t:.1} H{x1:.1} ");
            previous_end = r.end;
        }
        svg += &format!(
            "<polyline points=\"{active}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>\n\
             <path d=\"{tokens}\" fill=\"none\" stroke=\"#ff7f0e\" stroke-width=\"1.5\"/>\n"
        );
    }
    svg += &format!(
        "<text x=\"{LEFT}\" y=\"{}\">0 s</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{longest:.1} s \
         (wall time, iterations back to back)</text>\n</svg>\n",
        PANEL * runs.len() as f64 + 20.0,
        LEFT + PLOT_W,
        PANEL * runs.len() as f64 + 20.0
    );
    svg
}
