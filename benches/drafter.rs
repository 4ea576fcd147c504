//! Benchmarks of the suffix drafter (CPU): append throughput on one core, chain and tree proposal latency
//! (p50, p99 over individual calls) with 10^4 to 10^7 tokens of history, bytes per stored token, and draft
//! acceptance on real text.
//!
//! `cargo bench --bench drafter` (add `-- --quick` for 10^4..10^6 only).
//!
//! Latency history: rollouts of 4096 tokens drawn from a Zipf(1.1) distribution over 32000 token ids (a
//! word-frequency-like law, so common short n-grams recur), all in one prompt (the worst case: every probe
//! searches the whole history). Each probe's context ends with 24+ tokens copied from a random stored
//! rollout, so the longest match is the 24-token depth cap and the budget is 24.
//!
//! Acceptance corpus: the license texts Debian ships in /usr/share/common-licenses (package base-files), which
//! are real English in families of successive versions sharing long spans, like rollouts of one prompt: GPL
//! 1, 2, 3; LGPL 2, 2.1, 3; GFDL 1.2, 1.3; MPL 1.1, 2.0. Words and punctuation are tokens. For each family,
//! the last version is decoded with the earlier ones as history: at every step the drafter proposes a chain,
//! the accepted draft is its longest prefix that matches the real text (what lossless verification accepts
//! for a point-mass draft of a deterministic continuation), and accepted + 1 tokens are emitted.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use specdec::drafter::{DraftKind, Drafter, DrafterConfig, Token};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Zipf(1.1) over `vocab` ids by inverse CDF.
struct Zipf(Vec<f64>);
impl Zipf {
    fn new(vocab: usize) -> Self {
        let mut cdf: Vec<f64> = (1..=vocab).map(|k| 1.0 / (k as f64).powf(1.1)).collect();
        let mut sum = 0.0;
        for x in cdf.iter_mut() {
            sum += *x;
            *x = sum;
        }
        cdf.iter_mut().for_each(|x| *x /= sum);
        Zipf(cdf)
    }
    fn sample(&self, rng: &mut Rng) -> Token {
        let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        self.0.partition_point(|&c| c < u) as Token
    }
}

const ROLLOUT: usize = 4096;

fn config() -> DrafterConfig {
    DrafterConfig {
        max_match: 24,
        max_draft: 24,
        min_token_prob: 0.0,
        prompt_token_budget: 1 << 30,
        total_token_budget: 1 << 30,
        ..DrafterConfig::default()
    }
}

fn history(tokens: usize, rng: &mut Rng, zipf: &Zipf) -> (Drafter, Vec<Vec<Token>>) {
    let drafter = Drafter::new(config()).unwrap();
    let mut rollouts = Vec::new();
    for r in 0..tokens.div_ceil(ROLLOUT) {
        let rollout: Vec<Token> = (0..ROLLOUT).map(|_| zipf.sample(rng)).collect();
        drafter.add_request(r as u64, 0, &[]).unwrap();
        drafter.append(r as u64, &rollout).unwrap();
        drafter.finish_request(r as u64).unwrap();
        rollouts.push(rollout);
    }
    (drafter, rollouts)
}

/// Millions of tokens per second appended to a history that already holds `drafter`'s tokens: 64 new rollouts
/// of 4096 tokens, in 8-token steps (as an engine appends verified tokens), on this thread.
fn steady_append_rate(drafter: &Drafter, zipf: &Zipf, rng: &mut Rng) -> f64 {
    let rollouts: Vec<Vec<Token>> = (0..64)
        .map(|_| (0..ROLLOUT).map(|_| zipf.sample(rng)).collect())
        .collect();
    let t = Instant::now();
    for (r, rollout) in rollouts.iter().enumerate() {
        let id = (1 << 50) + r as u64;
        drafter.add_request(id, 0, &[]).unwrap();
        for step in rollout.chunks(8) {
            drafter.append(id, step).unwrap();
        }
        drafter.finish_request(id).unwrap();
    }
    (64 * ROLLOUT) as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// p50 and p99 microseconds of `kind` proposals for probes whose context ends in a 40-token slice of a stored
/// rollout (so the match is the 24-token cap).
fn latency(
    drafter: &Drafter,
    rollouts: &[Vec<Token>],
    kind: DraftKind,
    rng: &mut Rng,
) -> (f64, f64, f64) {
    let mut samples = Vec::new();
    let mut drafted = 0;
    for probe in 0..2000u64 {
        let rollout = &rollouts[rng.below(rollouts.len())];
        let end = 40 + rng.below(ROLLOUT - 40 - 24);
        let id = (1 << 40) + probe;
        drafter.add_request(id, 0, &rollout[end - 40..end]).unwrap();
        let t = Instant::now();
        let draft = black_box(drafter.propose(id, kind).unwrap());
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        drafted += draft.tokens.len();
        assert_eq!(draft.match_len, 24);
        drafter.finish_request(id).unwrap();
    }
    samples.sort_by(f64::total_cmp);
    (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        drafted as f64 / 2000.0,
    )
}

fn append_throughput(c: &mut Criterion) {
    let zipf = Zipf::new(32000);
    let mut rng = Rng(0x1234_5678);
    let tokens: Vec<Token> = (0..1 << 20).map(|_| zipf.sample(&mut rng)).collect();
    let mut group = c.benchmark_group("drafter");
    group.throughput(Throughput::Elements(tokens.len() as u64));
    group.sample_size(10);
    group.bench_function(
        "append 2^20 tokens (256 rollouts of 4096, 8-token steps) into an empty drafter",
        |b| {
            b.iter_with_large_drop(|| {
                let drafter = Drafter::new(config()).unwrap();
                for (r, rollout) in tokens.chunks(ROLLOUT).enumerate() {
                    drafter.add_request(r as u64, 0, &[]).unwrap();
                    for step in rollout.chunks(8) {
                        drafter.append(r as u64, step).unwrap();
                    }
                }
                drafter
            })
        },
    );
    group.finish();
}

/// Words and punctuation of a text, as token ids from a shared vocabulary.
fn tokenize(text: &str, vocab: &mut HashMap<String, Token>) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut push = |w: &str, tokens: &mut Vec<Token>| {
        let next = vocab.len() as Token;
        tokens.push(*vocab.entry(w.to_string()).or_insert(next));
    };
    for ch in text.chars() {
        if ch.is_alphanumeric() {
            word.push(ch);
        } else {
            if !word.is_empty() {
                push(&word, &mut tokens);
                word.clear();
            }
            if !ch.is_whitespace() {
                push(&ch.to_string(), &mut tokens);
            }
        }
    }
    if !word.is_empty() {
        push(&word, &mut tokens);
    }
    tokens
}

fn acceptance() {
    let dir = std::path::Path::new("/usr/share/common-licenses");
    let families: [(&str, &[&str]); 4] = [
        ("GPL", &["GPL-1", "GPL-2", "GPL-3"]),
        ("LGPL", &["LGPL-2", "LGPL-2.1", "LGPL-3"]),
        ("GFDL", &["GFDL-1.2", "GFDL-1.3"]),
        ("MPL", &["MPL-1.1", "MPL-2.0"]),
    ];
    println!("\n### Acceptance on real text (chain drafts, default configuration)\n");
    println!("| family | history | decoded | tokens | steps | mean accepted / step | tokens / step | steps with a draft |");
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    let mut vocab = HashMap::new();
    for (p, (family, versions)) in families.iter().enumerate() {
        let texts: Option<Vec<Vec<Token>>> = versions
            .iter()
            .map(|v| {
                std::fs::read_to_string(dir.join(v))
                    .ok()
                    .map(|t| tokenize(&t, &mut vocab))
            })
            .collect();
        let Some(texts) = texts else {
            println!(
                "| {family} | skipped: {} not found | | | | | | |",
                dir.display()
            );
            continue;
        };
        let drafter = Drafter::new(DrafterConfig::default()).unwrap();
        let (target, earlier) = texts.split_last().unwrap();
        for (r, text) in earlier.iter().enumerate() {
            drafter.add_request(r as u64, p as u64, &[]).unwrap();
            drafter.append(r as u64, text).unwrap();
            drafter.finish_request(r as u64).unwrap();
        }
        let probe = 1000;
        drafter.add_request(probe, p as u64, &[]).unwrap();
        let (mut at, mut steps, mut accepted, mut with_draft) = (0, 0, 0, 0);
        while at < target.len() {
            let draft = drafter.propose(probe, DraftKind::Chain).unwrap();
            let a = draft
                .tokens
                .iter()
                .zip(&target[at..])
                .take_while(|(d, t)| d == t)
                .count();
            let emit = (a + 1).min(target.len() - at);
            drafter.append(probe, &target[at..at + emit]).unwrap();
            at += emit;
            steps += 1;
            accepted += a;
            with_draft += usize::from(!draft.tokens.is_empty());
        }
        println!(
            "| {family} | {} | {} | {} | {steps} | {:.2} | {:.2} | {:.0}% |",
            earlier.len(),
            versions.last().unwrap(),
            target.len(),
            accepted as f64 / steps as f64,
            target.len() as f64 / steps as f64,
            100.0 * with_draft as f64 / steps as f64
        );
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut criterion = Criterion::default().configure_from_args();
    append_throughput(&mut criterion);
    criterion.final_summary();

    let zipf = Zipf::new(32000);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    println!(
        "\n### Proposal latency (one prompt holding all history; 24-token match, budget 24)\n"
    );
    println!("| history tokens | bytes / token | append Mtok/s (1 core, 8-token steps) | chain p50 (us) | chain p99 (us) | tree p50 (us) | tree p99 (us) | mean draft |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let sizes: &[usize] = if quick {
        &[10_000, 100_000, 1_000_000]
    } else {
        &[10_000, 100_000, 1_000_000, 10_000_000]
    };
    for &size in sizes {
        let (drafter, rollouts) = history(size, &mut rng, &zipf);
        let stats = drafter.stats();
        let (chain50, chain99, drafted) = latency(&drafter, &rollouts, DraftKind::Chain, &mut rng);
        let (tree50, tree99, _) = latency(&drafter, &rollouts, DraftKind::Tree, &mut rng);
        let append = steady_append_rate(&drafter, &zipf, &mut rng);
        println!(
            "| {} | {:.1} | {:.2} | {chain50:.2} | {chain99:.2} | {tree50:.2} | {tree99:.2} | {drafted:.1} |",
            stats.tokens,
            stats.bytes_per_token,
            append
        );
    }
    acceptance();
}
