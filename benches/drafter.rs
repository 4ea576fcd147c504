//! Benchmarks of the suffix drafter (CPU): append throughput on one core, chain and tree proposal latency
//! (p50, p99 over individual calls) with 10^4 to 10^7 tokens of history, bytes per stored token, and the
//! headline: tokens per decoding step on real text.
//!
//! `cargo bench --bench drafter` (add `-- --quick` for 10^4..10^6 only, `-- --replay` for the real-text
//! replay only).
//!
//! Latency history: rollouts of 4096 tokens drawn from a Zipf(1.1) distribution over 32000 token ids (a
//! word-frequency-like law, so common short n-grams recur), all in one prompt (the worst case: every probe
//! searches the whole history). Each probe's context ends with 24+ tokens copied from a random stored
//! rollout, so the longest match is the 24-token depth cap and the budget is 24.
//!
//! Real text: the Python standard library's source as Debian ships it (see [`Corpus`]). Sixteen held-out
//! files are decoded as an engine decodes a rollout with a point-mass drafter: propose, accept the longest
//! draft path equal to the real text (what greedy verification accepts), append it and one more token. The
//! history holds 100k or 1M tokens of other files: the held-out file's neighbours in path order (per prompt:
//! related rollouts) or files from across the library (global: every prompt's rollouts in one history). The
//! table gives tokens per decoding step, acceptance by draft depth, and the latency of every proposal made.

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
/// rollout (so a 24-token match, the cap, exists), with the mean draft size and match length. Each probe's
/// context joins the history as its own rollout, as every request's does, so later probes also find these
/// copies, whose continuations are short; with `max_occurrences` the newest copies can hide the original
/// rollout, and a shorter match may then win.
fn latency(
    drafter: &Drafter,
    rollouts: &[Vec<Token>],
    kind: DraftKind,
    rng: &mut Rng,
) -> (f64, f64, f64, f64) {
    let mut samples = Vec::new();
    let (mut drafted, mut matched) = (0, 0);
    for probe in 0..2000u64 {
        let rollout = &rollouts[rng.below(rollouts.len())];
        let end = 40 + rng.below(ROLLOUT - 40 - 24);
        let id = (1 << 40) + probe;
        drafter.add_request(id, 0, &rollout[end - 40..end]).unwrap();
        let t = Instant::now();
        let draft = black_box(drafter.propose(id, kind).unwrap());
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        drafted += draft.tokens.len();
        matched += draft.match_len;
        drafter.finish_request(id).unwrap();
    }
    samples.sort_by(f64::total_cmp);
    (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        drafted as f64 / 2000.0,
        matched as f64 / 2000.0,
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

/// The replay corpus: the Python standard library's source files that Debian ships (`/usr/lib/python3.11`,
/// package libpython3.11-stdlib; `SPECDEC_DRAFTER_CORPUS` names another directory), without `encodings/`
/// and `pydoc_data/` (generated tables). Files in path order, each as token ids.
struct Corpus {
    files: Vec<Vec<Token>>,
}

impl Corpus {
    fn load() -> Result<Self, String> {
        let root = std::env::var("SPECDEC_DRAFTER_CORPUS")
            .unwrap_or_else(|_| "/usr/lib/python3.11".to_string());
        let mut paths = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(&root)];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    if !matches!(
                        name.as_str(),
                        "encodings" | "pydoc_data" | "site-packages" | "dist-packages"
                    ) {
                        dirs.push(path);
                    }
                } else if name.ends_with(".py") {
                    paths.push(path);
                }
            }
        }
        paths.sort();
        let mut vocab = HashMap::new();
        let files: Vec<Vec<Token>> = paths
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .map(|bytes| tokenize(&String::from_utf8_lossy(&bytes), &mut vocab))
            .filter(|t| !t.is_empty())
            .collect();
        let total: usize = files.iter().map(Vec::len).sum();
        if total < 1_200_000 {
            return Err(format!(
                "{root} holds {total} tokens of Python source, fewer than the 1.2M the replay needs"
            ));
        }
        Ok(Corpus { files })
    }
}

/// Source-code tokens: identifiers and numbers (`\w+`), each other non-space character, and each newline.
fn tokenize(text: &str, vocab: &mut HashMap<String, Token>) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut push = |w: &str, tokens: &mut Vec<Token>| {
        let next = vocab.len() as Token;
        tokens.push(*vocab.entry(w.to_string()).or_insert(next));
    };
    let mut word = String::new();
    for ch in text.chars() {
        if ch.is_alphanumeric() || ch == '_' {
            word.push(ch);
            continue;
        }
        if !word.is_empty() {
            push(&word, &mut tokens);
            word.clear();
        }
        if ch == '\n' || !ch.is_whitespace() {
            push(&ch.to_string(), &mut tokens);
        }
    }
    if !word.is_empty() {
        push(&word, &mut tokens);
    }
    tokens
}

/// Files decoded per replay, the tokens of each given as the request's prompt, and the most decoded per file.
const HELD_OUT: usize = 16;
const REPLAY_PROMPT: usize = 64;
const REPLAY_DECODE: usize = 2000;

/// Whose rollouts the history holds.
#[derive(Clone, Copy, PartialEq)]
enum Scope {
    /// The held-out file's neighbours in path order (its package, then further out): a prompt's own rollouts.
    PerPrompt,
    /// Files from across the whole corpus, at a fixed stride: every prompt's rollouts in one history.
    Global,
}

/// The history of `tokens` tokens for decoding held-out file `target`: whole files (the last one cut), never a
/// held-out one, in the scope's order.
fn replay_history<'a>(
    corpus: &'a Corpus,
    held_out: &[usize],
    target: usize,
    scope: Scope,
    tokens: usize,
) -> Vec<&'a [Token]> {
    let n = corpus.files.len();
    let order: Vec<usize> = match scope {
        Scope::PerPrompt => (1..n)
            .flat_map(|d| [target.checked_sub(d), Some(target + d)])
            .flatten()
            .filter(|&i| i < n)
            .collect(),
        // 7919 is prime and does not divide any corpus size in use, so this visits every file once.
        Scope::Global => (0..n).map(|i| (i * 7919 + target) % n).collect(),
    };
    let mut history = Vec::new();
    let mut left = tokens;
    for i in order {
        if left == 0 {
            break;
        }
        if held_out.contains(&i) {
            continue;
        }
        let file = &corpus.files[i];
        let take = file.len().min(left);
        history.push(&file[..take]);
        left -= take;
    }
    history
}

#[derive(Default)]
struct ReplayStats {
    steps: usize,
    emitted: usize,
    accepted: usize,
    with_draft: usize,
    /// `reached[i]`: steps whose draft had a node at depth `i + 1`; `passed[i]`: steps that accepted one there.
    reached: [usize; 8],
    passed: [usize; 8],
    nodes: usize,
    latencies_us: Vec<f64>,
}

/// The longest path of `draft` from the context's last token that equals `text`'s start (a chain is a path).
fn accepted_depth(draft: &specdec::drafter::Draft, text: &[Token]) -> usize {
    let (mut node, mut depth) = (-1i32, 0);
    while depth < text.len() {
        let Some(child) = (0..draft.tokens.len())
            .find(|&i| draft.parents[i] == node && draft.tokens[i] == text[depth])
        else {
            break;
        };
        node = child as i32;
        depth += 1;
    }
    depth
}

/// The depth of every node of `draft`, 1 for a child of the context's last token.
fn max_depths(draft: &specdec::drafter::Draft) -> usize {
    let mut depth = vec![0usize; draft.tokens.len()];
    for i in 0..draft.tokens.len() {
        let p = draft.parents[i];
        depth[i] = if p < 0 { 1 } else { depth[p as usize] + 1 };
    }
    depth.into_iter().max().unwrap_or(0)
}

/// Decodes the held-out files as an engine would with a point-mass drafter and greedy verification of a
/// deterministic continuation: propose, accept the longest draft path equal to the real text, append it and
/// one more token.
fn replay(
    corpus: &Corpus,
    config: &DrafterConfig,
    kind: DraftKind,
    scope: Scope,
    tokens: usize,
) -> ReplayStats {
    let eligible: Vec<usize> = (0..corpus.files.len())
        .filter(|&i| corpus.files[i].len() >= 4 * REPLAY_PROMPT)
        .collect();
    let held_out: Vec<usize> = (0..HELD_OUT)
        .map(|k| eligible[(2 * k + 1) * eligible.len() / (2 * HELD_OUT)])
        .collect();
    let mut stats = ReplayStats::default();
    for (p, &target) in held_out.iter().enumerate() {
        let drafter = Drafter::new(config.clone()).unwrap();
        let prompt = p as u64;
        for (r, rollout) in replay_history(corpus, &held_out, target, scope, tokens)
            .into_iter()
            .enumerate()
        {
            drafter.add_request(r as u64, prompt, &[]).unwrap();
            drafter.append(r as u64, rollout).unwrap();
            drafter.finish_request(r as u64).unwrap();
        }
        let file = &corpus.files[target];
        let text = &file[REPLAY_PROMPT..file.len().min(REPLAY_PROMPT + REPLAY_DECODE)];
        let probe = u64::MAX;
        drafter
            .add_request(probe, prompt, &file[..REPLAY_PROMPT])
            .unwrap();
        let mut at = 0;
        while at < text.len() {
            let t = Instant::now();
            let draft = black_box(drafter.propose(probe, kind).unwrap());
            stats.latencies_us.push(t.elapsed().as_secs_f64() * 1e6);
            let accepted = accepted_depth(&draft, &text[at..]);
            let depth = max_depths(&draft);
            for i in 0..depth.min(8) {
                stats.reached[i] += 1;
                stats.passed[i] += usize::from(i < accepted);
            }
            let emit = (accepted + 1).min(text.len() - at);
            drafter.append(probe, &text[at..at + emit]).unwrap();
            at += emit;
            stats.steps += 1;
            stats.emitted += emit;
            stats.accepted += accepted;
            stats.nodes += draft.tokens.len();
            stats.with_draft += usize::from(!draft.tokens.is_empty());
        }
    }
    stats.latencies_us.sort_by(f64::total_cmp);
    stats
}

/// The replay's table: tokens per decoding step (the headline), acceptance by draft position, and proposal
/// latency over every proposal of the replay.
fn replays(quick: bool) {
    println!("\n### Real text: tokens per decoding step (propose, verify greedily, append)\n");
    let corpus = match Corpus::load() {
        Ok(corpus) => corpus,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let total: usize = corpus.files.iter().map(Vec::len).sum();
    println!(
        "Corpus: {} Python source files, {total} tokens; {HELD_OUT} held-out files, each decoded for up to \
         {REPLAY_DECODE} tokens after its first {REPLAY_PROMPT}.\n",
        corpus.files.len()
    );
    println!("| drafter | history | tokens | steps | tokens / step | accepted / step | steps with a draft | mean nodes | acceptance at depth 1..8 | p50 (us) | p99 (us) | p99.9 (us) | max (us) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|");
    let chain = DrafterConfig::default();
    let uncapped = DrafterConfig {
        max_occurrences: usize::MAX,
        ..DrafterConfig::default()
    };
    let chain_eight = DrafterConfig {
        max_occurrences: 8,
        ..DrafterConfig::default()
    };
    // DAS's budget rule (a length class's budget, whatever the match length), as the only change.
    let chain_flat = DrafterConfig {
        match_factor: DrafterConfig::default().max_draft as f64,
        ..DrafterConfig::default()
    };
    let tree = DrafterConfig {
        max_draft: DrafterConfig::MAX_DRAFT,
        match_factor: DrafterConfig::MAX_DRAFT as f64,
        min_token_prob: 0.0,
        ..DrafterConfig::default()
    };
    let tree_eight = DrafterConfig {
        max_occurrences: 8,
        ..tree.clone()
    };
    let sizes: &[usize] = if quick {
        &[100_000]
    } else {
        &[100_000, 1_000_000]
    };
    for (name, config, kind) in [
        ("chain (defaults)", &chain, DraftKind::Chain),
        ("chain, every occurrence", &uncapped, DraftKind::Chain),
        (
            "chain, 8 occurrences per level",
            &chain_eight,
            DraftKind::Chain,
        ),
        (
            "chain, budget 24 at any match",
            &chain_flat,
            DraftKind::Chain,
        ),
        ("tree, 63 drafts", &tree, DraftKind::Tree),
        (
            "tree, 63 drafts, 8 occurrences per level",
            &tree_eight,
            DraftKind::Tree,
        ),
    ] {
        for &tokens in sizes {
            for (scope_name, scope) in [("per prompt", Scope::PerPrompt), ("global", Scope::Global)]
            {
                let s = replay(&corpus, config, kind, scope, tokens);
                let by_depth: Vec<String> = (0..8)
                    .map(|i| {
                        if s.reached[i] == 0 {
                            "-".to_string()
                        } else {
                            format!("{:.2}", s.passed[i] as f64 / s.reached[i] as f64)
                        }
                    })
                    .collect();
                let l = &s.latencies_us;
                println!(
                    "| {name} | {scope_name} | {tokens} | {} | {:.3} | {:.3} | {:.0}% | {:.1} | {} | {:.2} | {:.2} | {:.1} | {:.1} |",
                    s.steps,
                    s.emitted as f64 / s.steps as f64,
                    s.accepted as f64 / s.steps as f64,
                    100.0 * s.with_draft as f64 / s.steps as f64,
                    s.nodes as f64 / s.steps as f64,
                    by_depth.join(" "),
                    percentile(l, 0.5),
                    percentile(l, 0.99),
                    percentile(l, 0.999),
                    l[l.len() - 1],
                );
            }
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--replay") {
        replays(quick);
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    append_throughput(&mut criterion);
    criterion.final_summary();

    let zipf = Zipf::new(32000);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    println!("\n### Proposal latency (one prompt holding all history; a 24-token match exists, budget 24)\n");
    println!("| history tokens | bytes / token | append Mtok/s (1 core, 8-token steps) | chain p50 (us) | chain p99 (us) | tree p50 (us) | tree p99 (us) | mean chain draft | mean chain match |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let sizes: &[usize] = if quick {
        &[10_000, 100_000, 1_000_000]
    } else {
        &[10_000, 100_000, 1_000_000, 10_000_000]
    };
    for &size in sizes {
        let (drafter, rollouts) = history(size, &mut rng, &zipf);
        let stats = drafter.stats();
        let (chain50, chain99, drafted, matched) =
            latency(&drafter, &rollouts, DraftKind::Chain, &mut rng);
        let (tree50, tree99, _, _) = latency(&drafter, &rollouts, DraftKind::Tree, &mut rng);
        let append = steady_append_rate(&drafter, &zipf, &mut rng);
        println!(
            "| {} | {:.1} | {:.2} | {chain50:.2} | {chain99:.2} | {tree50:.2} | {tree99:.2} | {drafted:.1} | {matched:.1} |",
            stats.tokens,
            stats.bytes_per_token,
            append
        );
    }
    replays(quick);
}
