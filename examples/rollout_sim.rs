//! The rollout simulator: one RL rollout batch decoded under each speculation policy, priced by the cost
//! model of a named GPU and model, with an int4 self-drafter. Prints the makespan and GPU time of every policy
//! and draws engine 0's last rollout under specdec's policy (active batch, requests drafting, tokens per step)
//! as an SVG.
//!
//! ```text
//! cargo run --release --example rollout_sim                               # A100, Qwen2.5-7B (EfficientRollout's setting)
//! cargo run --release --example rollout_sim -- --gpu h100 --model llama-3-8b --svg sim.svg
//! cargo run --release --example rollout_sim -- --prompts 16 --rollouts 2  # smaller and faster
//! cargo run --release --example rollout_sim -- --acceptance 0.93 0.99 --decay 0  # EfficientRollout's regime
//! ```
//!
//! The batch, length and acceptance settings and their sources: `specdec::policy::RolloutConfig`.

use std::io::Write;

use specdec::policy::{
    simulate, Autoregressive, CostModel, EfficientRollout, EfficientRolloutConfig, FixedDraft,
    GoodputDraft, GoodputTreeDraft, Gpu, LengthClassDraft, ModelShape, Overheads, RolloutConfig,
    SimulationReport, SpeculationPolicy,
};

fn main() {
    let mut config = RolloutConfig::default();
    let (mut gpu, mut model, mut svg) = (
        Gpu::A100,
        ModelShape::QWEN25_7B,
        "rollout_sim.svg".to_string(),
    );
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--gpu" => {
                gpu = match value().as_str() {
                    "a100" => Gpu::A100,
                    "h100" => Gpu::H100,
                    g => fail(&format!("unknown --gpu {g}: a100 or h100")),
                }
            }
            "--model" => {
                model = match value().as_str() {
                    "qwen2.5-7b" => ModelShape::QWEN25_7B,
                    "llama-3-8b" => ModelShape::LLAMA3_8B,
                    m => fail(&format!("unknown --model {m}: qwen2.5-7b or llama-3-8b")),
                }
            }
            "--prompts" => config.prompts = number(&value()),
            "--samples" => config.samples = number(&value()),
            "--engines" => config.engines = number(&value()),
            "--rollouts" => config.rollouts = number(&value()),
            "--seed" => config.seed = number(&value()) as u64,
            "--acceptance" => {
                let (low, high) = (fraction(&value()), fraction(&value()));
                if low > high {
                    fail("--acceptance LOW HIGH needs LOW <= HIGH");
                }
                config.acceptance = (low, high);
            }
            "--decay" => config.decay = fraction(&value()),
            "--svg" => svg = value(),
            "-h" | "--help" => {
                println!("usage: rollout_sim [--gpu a100|h100] [--model qwen2.5-7b|llama-3-8b] [--prompts N] [--samples N] [--engines N] [--rollouts N] [--seed N] [--acceptance LOW HIGH] [--decay D] [--svg FILE]");
                return;
            }
            other => fail(&format!("unknown argument {other} (try --help)")),
        }
    }
    if config.prompts == 0 || config.samples == 0 || config.engines == 0 || config.rollouts == 0 {
        fail("--prompts, --samples, --engines and --rollouts must be at least 1");
    }
    // The overheads calibrated to EfficientRollout's published A100 operating point, used for every GPU and
    // model here; fit them to measured step times (CostModel::fit) for real decisions.
    let cost = CostModel::new(gpu, model, Overheads::EFFICIENT_ROLLOUT_A100);

    type Maker = Box<dyn Fn() -> Box<dyn SpeculationPolicy>>;
    let policies: Vec<Maker> = vec![
        Box::new(|| Box::new(Autoregressive)),
        Box::new(|| Box::new(FixedDraft(5))),
        Box::new(|| {
            Box::new(
                EfficientRollout::new(EfficientRolloutConfig::default())
                    .expect("published settings"),
            )
        }),
        Box::new(|| {
            Box::new(LengthClassDraft {
                thresholds: [1024, 256],
                budgets: [24, 8, 0],
            })
        }),
        Box::new(|| Box::new(GoodputDraft { max_draft: 11 })),
        Box::new(|| {
            Box::new(GoodputTreeDraft {
                max_drafts: 64,
                max_depth: 12,
            })
        }),
    ];
    let mut reports: Vec<SimulationReport> = Vec::new();
    let count = policies.len();
    for (p, make) in policies.iter().enumerate() {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let started = std::time::Instant::now();
        let report = simulate(&cost, &config, make, |done, total| {
            // Redrawn in place on a terminal; in a log, one line per policy.
            if terminal || done == total {
                let width = 30;
                let filled = width * done / total;
                let (start, end) = if terminal { ("\r", "") } else { ("", "\n") };
                eprint!(
                    "{start}[{}{}] policy {}/{} ({done}/{total} engine runs){end}",
                    "#".repeat(filled),
                    "-".repeat(width - filled),
                    p + 1,
                    count
                );
                let _ = std::io::stderr().flush();
            }
        });
        eprintln!(
            "  {}: simulated in {:.1} s",
            report.policy,
            started.elapsed().as_secs_f64()
        );
        reports.push(report);
    }
    eprintln!();

    println!(
        "## Rollout simulation: {} + {} with an int4 self-drafter",
        gpu.name, model.name
    );
    println!();
    println!(
        "{} prompts x {} samples on {} engines, {} rollouts, seed {}; response median {:.0} tokens (cap {}), acceptance {:.2}-{:.2} decaying {}/position",
        config.prompts, config.samples, config.engines, config.rollouts, config.seed, config.median_length, config.max_tokens,
        config.acceptance.0, config.acceptance.1, config.decay
    );
    println!();
    println!("| policy | makespan (s) | GPU time (s) | makespan vs autoregressive | acceptance rate | tokens / verify step |");
    println!("|---|---:|---:|---:|---:|---:|");
    let baseline = reports[0].makespan;
    for r in &reports {
        let t = &r.totals;
        let rate = if t.drafted == 0 {
            "-".to_string()
        } else {
            format!("{:.3}", t.accepted as f64 / t.drafted as f64)
        };
        let per_step = if t.verify_steps == 0 {
            "-".to_string()
        } else {
            format!("{:.2}", t.emitted as f64 / t.verify_steps as f64)
        };
        println!(
            "| {} | {:.1} | {:.1} | {:+.1}% | {rate} | {per_step} |",
            r.policy,
            r.makespan,
            r.gpu_time,
            100.0 * (r.makespan / baseline - 1.0)
        );
    }
    let goodput = reports.last().expect("policies ran");
    std::fs::write(&svg, picture(goodput))
        .unwrap_or_else(|e| fail(&format!("cannot write {svg}: {e}")));
    println!();
    println!("Engine 0's last rollout under {}: {svg}", goodput.policy);
}

fn fraction(text: &str) -> f64 {
    text.parse()
        .ok()
        .filter(|v| (0.0..=1.0).contains(v))
        .unwrap_or_else(|| fail(&format!("{text:?} is not a number in [0, 1]")))
}

fn number(text: &str) -> usize {
    text.parse()
        .unwrap_or_else(|_| fail(&format!("{text:?} is not a non-negative number")))
}

fn fail(message: &str) -> ! {
    eprintln!("rollout_sim: {message}");
    std::process::exit(2);
}

/// Active batch (blue), requests drafting (shaded orange) and tokens per step (green) over time.
fn picture(report: &SimulationReport) -> String {
    let (w, h, margin) = (900.0, 360.0, 50.0);
    let trace = &report.trace;
    let end = trace.last().map_or(1.0, |s| s.start).max(1e-9);
    let max_batch = trace.iter().map(|s| s.batch).max().unwrap_or(1).max(1) as f64;
    let per_request = |s: &specdec::policy::StepRecord| s.tokens as f64 / s.batch.max(1) as f64;
    let max_tokens = trace.iter().map(per_request).fold(1.0, f64::max);
    let x = |t: f64| margin + (w - 2.0 * margin) * t / end;
    let y = |v: f64, max: f64| h - margin - (h - 2.0 * margin) * v / max;
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    for pair in trace.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.drafting > 0 {
            svg += &format!(
                "<rect x=\"{:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{:.2}\" fill=\"#f4a261\" fill-opacity=\"0.5\"/>\n",
                x(a.start),
                y(a.drafting as f64, max_batch),
                (x(b.start) - x(a.start)).max(0.1),
                h - margin - y(a.drafting as f64, max_batch)
            );
        }
    }
    let line = |values: Vec<(f64, f64)>, color: &str| {
        let points: Vec<String> = values
            .iter()
            .map(|(px, py)| format!("{px:.2},{py:.2}"))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.2\" points=\"{}\"/>\n",
            points.join(" ")
        )
    };
    svg += &line(
        trace
            .iter()
            .map(|s| (x(s.start), y(s.batch as f64, max_batch)))
            .collect(),
        "#1d3557",
    );
    svg += &line(
        trace
            .iter()
            .map(|s| (x(s.start), y(per_request(s), max_tokens)))
            .collect(),
        "#2a9d8f",
    );
    svg += &format!(
        "<line x1=\"{margin}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - margin,
        w - margin,
        h - margin
    );
    svg += &format!(
        "<line x1=\"{margin}\" y1=\"{margin}\" x2=\"{margin}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - margin
    );
    let title = report
        .policy
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    svg += &format!(
        "<text x=\"{margin}\" y=\"20\">{title}: engine 0, last rollout ({end:.1} s)</text>\n"
    );
    svg += &format!(
        "<text x=\"{margin}\" y=\"{}\" fill=\"#1d3557\">active batch (max {max_batch:.0})</text>\n",
        h - 15.0
    );
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" fill=\"#f4a261\">requests drafting</text>\n",
        margin + 200.0,
        h - 15.0
    );
    svg += &format!("<text x=\"{}\" y=\"{}\" fill=\"#2a9d8f\">tokens per request per step (max {max_tokens:.1})</text>\n", margin + 360.0, h - 15.0);
    svg += "</svg>\n";
    svg
}
