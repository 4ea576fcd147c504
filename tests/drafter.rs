//! The suffix drafter against a brute-force reference that rescans every stored sequence for every count, on
//! random and repetitive histories, after removals and evictions; budgets, windows, length classes, threads.

mod common;

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use specdec::drafter::{Draft, DraftKind, Drafter, DrafterConfig, LengthClasses, Token};
use specdec::Error;

/// The continuations of every occurrence of `s` (followed by a token) in `sequences`.
fn continuations(sequences: &[Vec<Token>], s: &[Token]) -> Vec<Token> {
    let mut out = Vec::new();
    for seq in sequences {
        for end in s.len()..seq.len() {
            if seq[end - s.len()..end] == *s {
                out.push(seq[end]);
            }
        }
    }
    out
}

/// (token, count) of the continuations of `s`, and their total.
fn counts(sequences: &[Vec<Token>], s: &[Token]) -> (Vec<(Token, usize)>, usize) {
    let all = continuations(sequences, s);
    let mut map: HashMap<Token, usize> = HashMap::new();
    for &t in &all {
        *map.entry(t).or_default() += 1;
    }
    let mut counts: Vec<_> = map.into_iter().collect();
    counts.sort();
    (counts, all.len())
}

/// The reference drafter: `sequences` are the prompt's stored rollouts (prompt and output each), among them
/// the request's own, whose tokens are `context` unless it was evicted. For every match length from
/// `min_match` to `max_match` whose suffix occurs with a continuation, the chain from that suffix; the match
/// length whose chain has the highest score (sum of path probabilities) wins, ties to the longer match. A chain
/// proposal is that chain, a tree proposal the tree from the same suffix.
fn reference(
    sequences: &[Vec<Token>],
    context: &[Token],
    config: &DrafterConfig,
    kind: DraftKind,
) -> Draft {
    let top = config.max_match.min(context.len());
    let budget = |match_len: usize| {
        config.max_draft.min(
            (match_len as f64 * config.match_factor + config.match_offset)
                .floor()
                .max(0.0) as usize,
        )
    };
    let mut best: Option<Draft> = None;
    for match_len in config.min_match..=top {
        let suffix = &context[context.len() - match_len..];
        if continuations(sequences, suffix).is_empty() {
            continue;
        }
        let draft = reference_at(
            sequences,
            suffix,
            config,
            DraftKind::Chain,
            budget(match_len),
        );
        if best.as_ref().is_none_or(|b| draft.score >= b.score) {
            best = Some(draft);
        }
    }
    match (best, kind) {
        (None, _) => Draft::default(),
        (Some(chain), DraftKind::Chain) => chain,
        (Some(chain), DraftKind::Tree) => {
            let suffix = &context[context.len() - chain.match_len..];
            reference_at(sequences, suffix, config, kind, budget(chain.match_len))
        }
    }
}

/// The reference draft from the occurrences of `suffix`, in at most `budget` nodes.
fn reference_at(
    sequences: &[Vec<Token>],
    suffix: &[Token],
    config: &DrafterConfig,
    kind: DraftKind,
    budget: usize,
) -> Draft {
    let mut draft = Draft {
        match_len: suffix.len(),
        occurrences: continuations(sequences, suffix).len(),
        ..Draft::default()
    };
    if budget == 0 {
        return draft;
    }
    let base = suffix.to_vec();
    match kind {
        DraftKind::Chain => {
            let mut s = base;
            let mut prob = 1.0f64;
            while draft.tokens.len() < budget {
                let (counts, total) = counts(sequences, &s);
                let Some(&(token, count)) =
                    counts
                        .iter()
                        .fold(None, |best: Option<&(Token, usize)>, c| match best {
                            Some(b) if b.1 >= c.1 => Some(b),
                            _ => Some(c),
                        })
                else {
                    break;
                };
                prob *= count as f64 / total as f64;
                if prob < config.min_token_prob {
                    break;
                }
                draft.parents.push(draft.tokens.len() as i32 - 1);
                draft.tokens.push(token);
                draft.probs.push(prob);
                draft.score += prob;
                s.push(token);
            }
        }
        DraftKind::Tree => {
            // Candidates: (prob, parent, token, string). Pick the best by (prob desc, parent asc, token asc).
            let mut candidates: Vec<(f64, i32, Token, Vec<Token>)> = Vec::new();
            let push_children =
                |s: &[Token],
                 parent: i32,
                 prob: f64,
                 candidates: &mut Vec<(f64, i32, Token, Vec<Token>)>| {
                    let (counts, total) = counts(sequences, s);
                    for (token, count) in counts {
                        let p = prob * (count as f64 / total as f64);
                        if p >= config.min_token_prob {
                            let mut child = s.to_vec();
                            child.push(token);
                            candidates.push((p, parent, token, child));
                        }
                    }
                };
            push_children(&base, -1, 1.0, &mut candidates);
            while draft.tokens.len() < budget && !candidates.is_empty() {
                let best = (0..candidates.len())
                    .max_by(|&a, &b| {
                        let (pa, qa, ta, _) = &candidates[a];
                        let (pb, qb, tb, _) = &candidates[b];
                        pa.total_cmp(pb).then(qb.cmp(qa)).then(tb.cmp(ta))
                    })
                    .unwrap();
                let (prob, parent, token, s) = candidates.swap_remove(best);
                let index = draft.tokens.len() as i32;
                draft.tokens.push(token);
                draft.parents.push(parent);
                draft.probs.push(prob);
                draft.score += prob;
                push_children(&s, index, prob, &mut candidates);
            }
        }
    }
    draft
}

fn random_sequence(rng: &mut impl Rng, len: usize, vocab: u32) -> Vec<Token> {
    (0..len).map(|_| rng.random_range(0..vocab)).collect()
}

/// A copy of `base` with a few tokens replaced, inserted or deleted: rollouts of one prompt sharing spans.
fn mutated(rng: &mut impl Rng, base: &[Token], vocab: u32) -> Vec<Token> {
    let mut out = Vec::with_capacity(base.len() + 8);
    for &t in base {
        match rng.random_range(0..20) {
            0 => out.push(rng.random_range(0..vocab)),
            1 => {}
            2 => {
                out.push(t);
                out.push(rng.random_range(0..vocab));
            }
            _ => out.push(t),
        }
    }
    out
}

/// Drafts for `probe` from the drafter and from the reference over the drafter's stored history, which holds
/// the probe's own rollout (its prompt and output, i.e. `context`) unless that was evicted.
fn check_probe(drafter: &Drafter, prompt: u64, probe: u64, context: &[Token], what: &str) {
    let sequences = drafter.history(prompt);
    for kind in [DraftKind::Chain, DraftKind::Tree] {
        let got = drafter.propose(probe, kind).unwrap();
        let want = reference(&sequences, context, drafter.config(), kind);
        assert_eq!(
            got, want,
            "{what}: {kind:?} draft differs from the brute-force reference"
        );
    }
}

/// Configurations for the reference tests. Every one looks at all occurrences (`max_occurrences` above any
/// chain's length), where proposals are exact.
fn configs() -> Vec<DrafterConfig> {
    let exact = DrafterConfig {
        max_occurrences: usize::MAX,
        ..DrafterConfig::default()
    };
    vec![
        exact.clone(),
        DrafterConfig {
            min_match: 2,
            max_match: 8,
            max_draft: 12,
            min_token_prob: 0.0,
            ..exact.clone()
        },
        DrafterConfig {
            min_match: 3,
            max_match: 40,
            max_draft: 30,
            match_factor: 0.5,
            match_offset: 2.0,
            min_token_prob: 0.3,
            ..exact.clone()
        },
        // One chain level only (min_match at least the longest gram, 6).
        DrafterConfig {
            min_match: 7,
            match_factor: 2.0,
            min_token_prob: 0.0,
            ..exact.clone()
        },
        // Budgets that fall to 0 for short matches, so that an empty draft can win.
        DrafterConfig {
            match_offset: -3.0,
            min_token_prob: 0.05,
            ..exact
        },
    ]
}

/// Six rollouts of prompt 7 (random, or mutated copies of one base), then a probe generating its own rollout,
/// checked against the reference every 17 tokens.
fn check_rollouts_against_the_reference(
    rng: &mut impl Rng,
    config: &DrafterConfig,
    vocab: u32,
    repetitive: bool,
    what: &str,
) {
    let drafter = Drafter::new(config.clone()).unwrap();
    let base = random_sequence(rng, 300, vocab);
    let prompt_tokens = random_sequence(rng, 20, vocab);
    for r in 0..6u64 {
        drafter.add_request(r, 7, &prompt_tokens).unwrap();
        let rollout = if repetitive {
            mutated(rng, &base, vocab)
        } else {
            random_sequence(rng, 200, vocab)
        };
        drafter.append(r, &rollout).unwrap();
        drafter.finish_request(r).unwrap();
    }
    // The probe generates its own rollout; draft at several points along it.
    let probe_output = if repetitive {
        mutated(rng, &base, vocab)
    } else {
        random_sequence(rng, 120, vocab)
    };
    drafter.add_request(100, 7, &prompt_tokens).unwrap();
    let mut context = prompt_tokens.clone();
    for (i, chunk) in probe_output.chunks(17).enumerate() {
        drafter.append(100, chunk).unwrap();
        context.extend_from_slice(chunk);
        let what = format!("{what}, vocab {vocab}, repetitive {repetitive}, step {i}");
        check_probe(&drafter, 7, 100, &context, &what);
    }
}

#[test]
fn proposals_match_the_brute_force_reference() {
    let mut rng = common::rng("drafter reference");
    for (c, config) in configs().into_iter().enumerate() {
        for (vocab, repetitive) in [(3u32, false), (12, false), (50, true), (1000, true)] {
            check_rollouts_against_the_reference(
                &mut rng,
                &config,
                vocab,
                repetitive,
                &format!("config {c}"),
            );
        }
    }
}

#[test]
fn capped_walks_match_the_reference_while_every_chain_is_shorter_than_the_cap() {
    // With at most 64 entries per level the levels below the longest gram's are walked together; over 1000
    // token ids no gram occurs that often here, so the proposals are still exact. With 21 per level (at most 63
    // cursors) the trie scans sibling lists instead of keeping a hash map.
    let mut rng = common::rng("drafter lockstep reference");
    for (c, config) in configs().into_iter().enumerate() {
        for max_occurrences in [21, 64] {
            let capped = DrafterConfig {
                max_occurrences,
                ..config.clone()
            };
            // A chain also holds other grams sharing its hash bucket: in the repetitive histories a token of
            // the shared prompt and base occurs a dozen times, and with a bucket's other grams its chain can pass
            // 21 entries, where the walk stops and proposals are no longer exact.
            let repetitive: &[bool] = if max_occurrences >= 64 {
                &[false, true]
            } else {
                &[false]
            };
            for &repetitive in repetitive {
                check_rollouts_against_the_reference(
                    &mut rng,
                    &capped,
                    1000,
                    repetitive,
                    &format!("config {c}, {max_occurrences} per level"),
                );
            }
        }
    }
}

#[test]
fn capped_walks_never_count_an_occurrence_twice() {
    // Over 2 to 4 token ids every gram's chain is far longer than the cap, so a level's walk stops before it
    // reaches the longer matches its level above found, and the levels' candidates overlap. Debug builds
    // assert that no occurrence goes into a proposal's trie twice; a proposal built from one counted twice
    // could also report more occurrences than the matched suffix has.
    let mut rng = common::rng("drafter capped overlap");
    // Short walks (the earlier candidates scanned), then long ones over long rollouts (looked up in a set).
    let mut cases: Vec<(u32, usize, usize)> = Vec::new();
    for _ in 0..200 {
        cases.push((rng.random_range(2..5), rng.random_range(1..7), 150));
    }
    for _ in 0..10 {
        cases.push((2, rng.random_range(80..120), 2000));
    }
    for (case, (vocab, max_occurrences, rollout_len)) in cases.into_iter().enumerate() {
        let config = DrafterConfig {
            max_occurrences,
            min_token_prob: 0.0,
            // Long walks: matches of at most 8 tokens, so that no long match ends the proposal at the 6-gram
            // level and the shorter grams are walked too.
            max_match: if rollout_len < 1000 { 32 } else { 8 },
            ..DrafterConfig::default()
        };
        let drafter = Drafter::new(config.clone()).unwrap();
        let rollouts: Vec<Vec<Token>> = (0..4)
            .map(|_| random_sequence(&mut rng, rollout_len, vocab))
            .collect();
        store_rollouts(&drafter, 1, rollouts.iter().map(Vec::as_slice));
        // Short walks: the context copies a stretch of a stored rollout, so that long matches with few
        // occurrences exist. Long walks: a random context, whose long matches do not end the proposal early.
        let context = if rollout_len < 1000 {
            let source = &rollouts[rng.random_range(0..rollouts.len())];
            let start = rng.random_range(0..source.len() - 40);
            source[start..start + 40].to_vec()
        } else {
            random_sequence(&mut rng, 40, vocab)
        };
        drafter.add_request(100, 1, &context).unwrap();
        let sequences = drafter.history(1);
        for kind in [DraftKind::Chain, DraftKind::Tree] {
            let draft = drafter.propose(100, kind).unwrap();
            let suffix = &context[context.len() - draft.match_len..];
            let occurring = continuations(&sequences, suffix).len();
            assert!(
                draft.occurrences <= occurring.min(3 * config.max_occurrences),
                "case {case}, {kind:?}: {} occurrences of a {}-token suffix that occurs {occurring} times",
                draft.occurrences,
                draft.match_len
            );
        }
    }
}

/// Stores finished rollouts of `prompt` (no prompt tokens), as requests 0, 1, ...
fn store_rollouts<'a>(
    drafter: &Drafter,
    prompt: u64,
    rollouts: impl IntoIterator<Item = &'a [Token]>,
) {
    for (r, rollout) in (0u64..).zip(rollouts) {
        drafter.add_request(r, prompt, &[]).unwrap();
        drafter.append(r, rollout).unwrap();
        drafter.finish_request(r).unwrap();
    }
}

/// Prompt 1's history [1 2 3 4], [1 2 3 5], [1 2 3 4 9], [7 2 3 4], and request 10 with prompt [8 2 3].
fn hand_worked_history(drafter: &Drafter) {
    let rollouts: [&[Token]; 4] = [
        &[1, 2, 3, 4],
        &[1, 2, 3, 5],
        &[1, 2, 3, 4, 9],
        &[7, 2, 3, 4],
    ];
    store_rollouts(drafter, 1, rollouts);
    drafter.add_request(10, 1, &[8, 2, 3]).unwrap();
}

#[test]
fn hand_worked_chain_and_tree() {
    // History: [1 2 3 4], [1 2 3 5], [1 2 3 4 9], [7 2 3 4]. Context [8 2 3]: the longest match is [2 3]
    // (3 tokens [8 2 3] occur nowhere). Continuations of [2 3]: 4, 5, 4, 4 -> 4 with 3/4.
    // After [2 3 4]: continuations 9 (one of the three [2 3 4] is followed by a token) -> 9 with 1/1.
    let config = DrafterConfig {
        min_token_prob: 0.0,
        ..DrafterConfig::default()
    };
    let drafter = Drafter::new(config).unwrap();
    hand_worked_history(&drafter);
    let chain = drafter.propose(10, DraftKind::Chain).unwrap();
    assert_eq!(chain.match_len, 2);
    // Budget floor(2 * 1.0 + 0) = 2 tokens: 4 (3/4), then 9 (1/1, path 0.75).
    assert_eq!(
        (chain.tokens, chain.parents, chain.probs, chain.score),
        (vec![4, 9], vec![-1, 0], vec![0.75, 0.75], 1.5)
    );
    // Tree, 2 nodes: the root's children are 4 (0.75) and 5 (0.25); 4 is taken first, which queues 9 (0.75);
    // 9 beats 5.
    let tree = drafter.propose(10, DraftKind::Tree).unwrap();
    assert_eq!(
        (tree.tokens, tree.parents, tree.probs),
        (vec![4, 9], vec![-1, 0], vec![0.75, 0.75])
    );
    // With a budget of 3 (match factor 1.5) the tree also takes 5: [4, 9, 5] with parents [-1, 0, -1].
    let wide = Drafter::new(DrafterConfig {
        match_factor: 1.5,
        min_token_prob: 0.0,
        ..DrafterConfig::default()
    })
    .unwrap();
    // A floor of 0.8 stops the chain before its first token (0.75 < 0.8).
    let strict = Drafter::new(DrafterConfig {
        min_token_prob: 0.8,
        ..DrafterConfig::default()
    })
    .unwrap();
    hand_worked_history(&wide);
    hand_worked_history(&strict);
    let tree = wide.propose(10, DraftKind::Tree).unwrap();
    assert_eq!(
        (tree.tokens, tree.parents, tree.probs),
        (vec![4, 9, 5], vec![-1, 0, -1], vec![0.75, 0.75, 0.25])
    );
    // Nothing drafted, but the match and its 4 occurrences are reported.
    assert_eq!(
        strict.propose(10, DraftKind::Chain).unwrap(),
        Draft {
            match_len: 2,
            occurrences: 4,
            ..Draft::default()
        }
    );
}

#[test]
fn a_shorter_match_with_more_expected_accepted_tokens_wins() {
    // History: [9 1 2 3 10], [5 2 3 20 21], [6 2 3 20 21]; context [9 1 2 3]. The longest match, [9 1 2 3],
    // occurs once, followed by 10 and then nothing: score 1. The match [2 3] occurs three times, followed by
    // 10, 20, 20: budget 2 drafts 20 (2/3) then 21 (2/3 * 2/2), score 4/3. [3] alone has the same three
    // occurrences and a budget of 1. So the draft is [20 21] from the 2-token match, where following the
    // longest match (the drafter before issue 18) drafted [10].
    let drafter = Drafter::new(DrafterConfig {
        min_token_prob: 0.0,
        ..DrafterConfig::default()
    })
    .unwrap();
    let rollouts: [&[Token]; 3] = [&[9, 1, 2, 3, 10], &[5, 2, 3, 20, 21], &[6, 2, 3, 20, 21]];
    store_rollouts(&drafter, 1, rollouts);
    drafter.add_request(10, 1, &[9, 1, 2, 3]).unwrap();
    let two_thirds = 2.0 / 3.0;
    assert_eq!(
        drafter.propose(10, DraftKind::Chain).unwrap(),
        Draft {
            tokens: vec![20, 21],
            parents: vec![-1, 0],
            probs: vec![two_thirds, two_thirds],
            match_len: 2,
            score: two_thirds + two_thirds,
            occurrences: 3,
        }
    );
    // A tree of budget 2 from [2 3] takes 20 (2/3), then 21 under it (2/3) over 10 (1/3): the same nodes.
    assert_eq!(
        drafter.propose(10, DraftKind::Tree).unwrap().tokens,
        vec![20, 21]
    );
    // With min_match 3 only [1 2 3] and [9 1 2 3] may match: the old answer, [10], with score 1.
    let long_only = Drafter::new(DrafterConfig {
        min_match: 3,
        min_token_prob: 0.0,
        ..DrafterConfig::default()
    })
    .unwrap();
    store_rollouts(&long_only, 1, drafter.history(1).iter().map(Vec::as_slice));
    long_only.add_request(10, 1, &[9, 1, 2, 3]).unwrap();
    let draft = long_only.propose(10, DraftKind::Chain).unwrap();
    assert_eq!(
        (draft.tokens, draft.match_len, draft.score),
        (vec![10], 4, 1.0)
    );
}

#[test]
fn a_tree_is_drafted_from_the_match_length_whose_chain_scores_best() {
    // History: [9 1 2 3 10 11 12] and four rollouts [k 3 a a+1 .. a+5] (a = 20, 30, 40, 50). Context
    // [9 1 2 3], budget 24 at every match length. The 4-token match occurs once: chain [10 11 12], score 3.
    // The 1-token match [3] occurs five times with five different continuations: its chain is [10 11 12] at
    // 1/5 each (score 0.6), while its best-first tree of 24 nodes would take all five branches (score
    // 0.6 + 4 * 6 * 0.2 = 5.4). Trees are chosen by their chain: the proposal is the 4-token match's tree.
    let drafter = Drafter::new(DrafterConfig {
        match_factor: 24.0,
        min_token_prob: 0.0,
        ..DrafterConfig::default()
    })
    .unwrap();
    let mut rollouts: Vec<Vec<Token>> = vec![vec![9, 1, 2, 3, 10, 11, 12]];
    for (k, a) in [(60, 20), (61, 30), (62, 40), (63, 50)] {
        rollouts.push([k, 3].into_iter().chain(a..a + 6).collect());
    }
    store_rollouts(&drafter, 1, rollouts.iter().map(Vec::as_slice));
    drafter.add_request(10, 1, &[9, 1, 2, 3]).unwrap();
    let chain = drafter.propose(10, DraftKind::Chain).unwrap();
    let tree = drafter.propose(10, DraftKind::Tree).unwrap();
    for draft in [&chain, &tree] {
        assert_eq!(
            (
                &draft.tokens,
                draft.match_len,
                draft.score,
                draft.occurrences
            ),
            (&vec![10, 11, 12], 4, 3.0, 1)
        );
    }
    assert_eq!(tree.parents, vec![-1, 0, 1]);
    check_probe(&drafter, 1, 10, &[9, 1, 2, 3], "five continuations of [3]");
}

#[test]
fn window_drops_old_rollouts_and_budgets_evict_the_oldest() {
    let config = DrafterConfig {
        window_iterations: 2,
        prompt_token_budget: 100,
        total_token_budget: 150,
        ..DrafterConfig::default()
    };
    let drafter = Drafter::new(config).unwrap();
    let mut next = 0u64;
    let mut add = |drafter: &Drafter, prompt: u64, len: usize, fill: Token| {
        drafter.add_request(next, prompt, &[]).unwrap();
        drafter.append(next, &vec![fill; len]).unwrap();
        drafter.finish_request(next).unwrap();
        next += 1;
        let stats = drafter.stats();
        assert!(
            stats.tokens <= 150,
            "overall budget exceeded: {}",
            stats.tokens
        );
        for p in 0..3 {
            let held: usize = drafter.history(p).iter().map(Vec::len).sum();
            assert!(held <= 100, "prompt {p} budget exceeded: {held}");
        }
    };
    add(&drafter, 0, 40, 1); // iteration 0
    drafter.begin_iteration(1).unwrap();
    add(&drafter, 0, 40, 2);
    assert_eq!(drafter.history(0), [vec![1; 40], vec![2; 40]]);
    add(&drafter, 0, 40, 3); // prompt 0 would hold 120 > 100: the oldest (1s) goes
    assert_eq!(drafter.history(0), [vec![2; 40], vec![3; 40]]);
    add(&drafter, 1, 60, 4); // overall 140
    add(&drafter, 2, 30, 5); // overall would be 170 > 150: the oldest overall (2s, prompt 0) goes
    assert_eq!(drafter.history(0), [vec![3; 40]]);
    assert_eq!(drafter.stats().tokens, 130);
    drafter.begin_iteration(3).unwrap(); // window 2: rollouts of iterations < 2 leave, i.e. all of them
    assert_eq!(drafter.stats().tokens, 0);
    assert!(drafter.history(0).is_empty() && drafter.history(1).is_empty());
    assert!(
        drafter.begin_iteration(2).is_err(),
        "iterations cannot go back"
    );
}

/// What must not happen at the edges of the budgets (found by a hostile review): an append that could not fit
/// even alone evicted every other rollout first (the drafter was wiped by one oversized append), and a later
/// append was stored after the missing one (a gap); rollouts that
/// never held a token stayed for ever, since the budgets count tokens; a request finished before an append that
/// raced it could still append.
#[test]
fn budgets_evict_nothing_for_what_cannot_fit_and_empty_rollouts_do_not_stay() {
    let drafter = Drafter::new(DrafterConfig {
        total_token_budget: 1000,
        ..DrafterConfig::default()
    })
    .unwrap();
    for p in 0..9u64 {
        drafter.add_request(p, p, &[1; 100]).unwrap();
        drafter.finish_request(p).unwrap();
    }
    drafter.add_request(99, 99, &[1; 10]).unwrap();
    let before = drafter.stats();
    assert_eq!((before.prompts, before.tokens), (10, 910));
    drafter.append(99, &[2; 1001]).unwrap(); // 1011 tokens could never fit: nothing else leaves
    let after = drafter.stats();
    assert_eq!((after.prompts, after.rollouts, after.tokens), (10, 10, 910));
    // The rollout stopped growing: storing what follows would leave a gap, a sequence that never occurred.
    drafter.append(99, &[3; 200]).unwrap();
    let after = drafter.stats();
    assert_eq!((after.prompts, after.rollouts, after.tokens), (10, 10, 910));
    assert_eq!(drafter.history(99), [vec![1; 10]]);
    assert_eq!(drafter.history(0), [vec![1; 100]]);

    // Requests with empty prompts that never append: their rollouts leave when they finish.
    let empty = Drafter::new(DrafterConfig {
        total_token_budget: 1,
        ..DrafterConfig::default()
    })
    .unwrap();
    for r in 0..1000u64 {
        empty.add_request(r, r, &[]).unwrap();
        empty.finish_request(r).unwrap();
    }
    let stats = empty.stats();
    assert_eq!(
        (stats.prompts, stats.rollouts, stats.tokens),
        (0, 0, 0),
        "{stats:?}"
    );

    // A finished request takes no more calls.
    empty.add_request(5, 5, &[4, 5]).unwrap();
    empty.finish_request(5).unwrap();
    assert!(empty.append(5, &[6]).is_err());
    assert!(empty.propose(5, DraftKind::Chain).is_err());
}

#[test]
fn proposals_match_the_reference_after_evictions() {
    // This seed's probe drafts from a 2-token match whose last token's chain is longer than the default
    // `max_occurrences`: it caught this test running capped walks, where proposals are not exact.
    check_evictions(&mut StdRng::seed_from_u64(9_717_086_693_105_436_944));
    check_evictions(&mut common::rng("drafter evictions"));
}

fn check_evictions(rng: &mut impl Rng) {
    let config = DrafterConfig {
        prompt_token_budget: 700,
        total_token_budget: 1000,
        min_token_prob: 0.05,
        // Exact proposals need every chain walked to its end (see `configs`); with the default cap of 16, the
        // last token's 1-gram chain (about 25 occurrences here) is cut short, and the drafter rightly differs.
        max_occurrences: usize::MAX,
        ..DrafterConfig::default()
    };
    let drafter = Drafter::new(config).unwrap();
    let base = random_sequence(rng, 250, 40);
    for r in 0..20u64 {
        let prompt = r % 2;
        drafter.add_request(r, prompt, &[]).unwrap();
        drafter.append(r, &mutated(rng, &base, 40)).unwrap();
        drafter.finish_request(r).unwrap();
        if r % 7 == 6 {
            drafter.begin_iteration(r / 7).unwrap();
        }
        assert!(drafter.stats().tokens <= 1000);
    }
    let context = mutated(rng, &base[..150], 40);
    drafter.add_request(99, 0, &context).unwrap();
    check_probe(&drafter, 0, 99, &context, "after evictions");
}

#[test]
fn length_classes_cap_the_budget_and_requests_move_up() {
    let classes = LengthClasses {
        long_threshold: 40,
        medium_threshold: 20,
        long_budget: 6,
        medium_budget: 3,
        short_budget: 0,
        smoothing: 1.0,
    };
    let config = DrafterConfig {
        length_classes: Some(classes),
        min_token_prob: 0.0,
        ..DrafterConfig::default()
    };
    let drafter = Drafter::new(config).unwrap();
    let rollout: Vec<Token> = (0..30).collect();
    drafter.add_request(0, 5, &[]).unwrap();
    drafter.append(0, &rollout).unwrap();
    drafter.finish_request(0).unwrap(); // prompt 5's predicted length: 30 (Medium)
    drafter.add_request(1, 5, &[]).unwrap();
    drafter.append(1, &rollout[..10]).unwrap(); // matches [..10] fully: match budget 10
    assert_eq!(
        drafter.propose(1, DraftKind::Chain).unwrap().tokens.len(),
        3,
        "Medium: 3"
    );
    // A new prompt with no history: predicted nothing, 10 tokens generated: Short, budget 0.
    drafter.add_request(2, 6, &[]).unwrap();
    drafter.append(2, &[1, 2, 1, 2, 1, 2, 1, 2, 1, 2]).unwrap();
    assert!(
        drafter
            .propose(2, DraftKind::Chain)
            .unwrap()
            .tokens
            .is_empty(),
        "Short: 0"
    );
    // It grows past 40 tokens: Long, budget 6 (its own context repeats, so there is something to draft).
    drafter.append(2, &[1, 2].repeat(16)).unwrap();
    assert_eq!(
        drafter.propose(2, DraftKind::Chain).unwrap().tokens,
        [1, 2, 1, 2, 1, 2]
    );
}

#[test]
fn concurrent_use_gives_the_same_proposals_as_serial_use() {
    let mut rng = common::rng("drafter threads");
    let workloads: Vec<(Vec<Token>, Vec<Vec<Token>>)> = (0..4)
        .map(|_| {
            let base = random_sequence(&mut rng, 300, 30);
            let rollouts = (0..5).map(|_| mutated(&mut rng, &base, 30)).collect();
            (base, rollouts)
        })
        .collect();
    // Each thread drives its own prompt: rollouts one after another, then a probe drafting step by step.
    let run = |drafter: &Drafter, p: usize| -> Vec<Draft> {
        let (_, rollouts) = &workloads[p];
        let prompt = p as u64;
        for (i, rollout) in rollouts[..4].iter().enumerate() {
            let r = prompt * 100 + i as u64;
            drafter.add_request(r, prompt, &[]).unwrap();
            for chunk in rollout.chunks(9) {
                drafter.append(r, chunk).unwrap();
            }
            drafter.finish_request(r).unwrap();
        }
        let probe = prompt * 100 + 99;
        drafter.add_request(probe, prompt, &[]).unwrap();
        let mut drafts = Vec::new();
        for chunk in rollouts[4].chunks(13) {
            drafter.append(probe, chunk).unwrap();
            drafts.push(drafter.propose(probe, DraftKind::Chain).unwrap());
            drafts.push(drafter.propose(probe, DraftKind::Tree).unwrap());
        }
        drafts
    };
    let serial = Drafter::new(DrafterConfig::default()).unwrap();
    let want: Vec<Vec<Draft>> = (0..4).map(|p| run(&serial, p)).collect();
    let shared = Drafter::new(DrafterConfig::default()).unwrap();
    let got: Vec<Vec<Draft>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|p| {
                s.spawn({
                    let (shared, run) = (&shared, &run);
                    move || run(shared, p)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got, want);
    // Many readers of one prompt at once: every thread sees the serial answers.
    let answers: Vec<Draft> = (0..4)
        .map(|p| serial.propose(p * 100 + 99, DraftKind::Tree).unwrap())
        .collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..50 {
                    for p in 0..4u64 {
                        assert_eq!(
                            serial.propose(p * 100 + 99, DraftKind::Tree).unwrap(),
                            answers[p as usize]
                        );
                    }
                }
            });
        }
    });
}

#[test]
fn bad_arguments_are_rejected() {
    let bad = |config: DrafterConfig, argument: &str| match Drafter::new(config) {
        Err(Error::InvalidArgument { argument: got, .. }) => assert_eq!(got, argument),
        Ok(_) => panic!("accepted a config with a bad {argument}"),
        Err(e) => panic!("unexpected {e}"),
    };
    let base = DrafterConfig::default();
    bad(
        DrafterConfig {
            min_match: 0,
            ..base.clone()
        },
        "min_match",
    );
    bad(
        DrafterConfig {
            min_match: 40,
            max_match: 30,
            ..base.clone()
        },
        "min_match",
    );
    bad(
        DrafterConfig {
            max_draft: 0,
            ..base.clone()
        },
        "max_draft",
    );
    bad(
        DrafterConfig {
            max_draft: DrafterConfig::MAX_DRAFT + 1,
            ..base.clone()
        },
        "max_draft",
    );
    bad(
        DrafterConfig {
            min_token_prob: 1.5,
            ..base.clone()
        },
        "min_token_prob",
    );
    bad(
        DrafterConfig {
            window_iterations: 0,
            ..base.clone()
        },
        "window_iterations",
    );
    bad(
        DrafterConfig {
            max_occurrences: 0,
            ..base.clone()
        },
        "max_occurrences",
    );
    // Each budget, factor and offset is named itself (before: "token_budget" for both budgets, "match_factor"
    // for a NaN match_offset).
    bad(
        DrafterConfig {
            total_token_budget: 0,
            ..base.clone()
        },
        "total_token_budget",
    );
    bad(
        DrafterConfig {
            prompt_token_budget: 0,
            ..base.clone()
        },
        "prompt_token_budget",
    );
    bad(
        DrafterConfig {
            match_factor: -1.0,
            ..base.clone()
        },
        "match_factor",
    );
    bad(
        DrafterConfig {
            match_offset: f64::NAN,
            ..base.clone()
        },
        "match_offset",
    );
    let drafter = Drafter::new(base).unwrap();
    assert!(drafter.append(5, &[1]).is_err(), "unknown request");
    assert!(
        drafter.propose(5, DraftKind::Chain).is_err(),
        "unknown request"
    );
    assert!(drafter.finish_request(5).is_err(), "unknown request");
    drafter.add_request(5, 1, &[]).unwrap();
    assert!(drafter.add_request(5, 1, &[]).is_err(), "duplicate request");
}

/// 8 threads on one drafter mixing every call (registering, appending, proposing chains and trees, finishing,
/// new iterations, statistics, history reads) over few prompts with small budgets, so evictions cross prompts:
/// all must finish within 60 s (a deadlock fails the test instead of hanging it), and every statistics snapshot
/// must respect the budgets. Before, adding a request (requests, then prompts) and reading statistics (prompts,
/// then requests) on two threads deadlocked within seconds.
#[test]
fn eight_threads_mixing_every_call_finish_and_see_consistent_statistics() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    let seed: u64 = common::rng("drafter stress").random();
    let config = DrafterConfig {
        window_iterations: 3,
        prompt_token_budget: 3000,
        total_token_budget: 9000,
        ..DrafterConfig::default()
    };
    let (prompt_budget, total_budget) = (config.prompt_token_budget, config.total_token_budget);
    let drafter = Arc::new(Drafter::new(config).unwrap());
    let iteration = Arc::new(AtomicU64::new(0));
    let (done, finished) = mpsc::channel();
    for t in 0..8u64 {
        let (drafter, iteration, done) = (drafter.clone(), iteration.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ t);
            let mut mine: Vec<u64> = Vec::new();
            for step in 0..3000u64 {
                let request = t << 32 | step;
                match rng.random_range(0..10) {
                    0 | 1 => {
                        let prompt = rng.random_range(0..6);
                        let tokens: Vec<Token> = (0..rng.random_range(1..40))
                            .map(|_| rng.random_range(0..8))
                            .collect();
                        drafter.add_request(request, prompt, &tokens).unwrap();
                        mine.push(request);
                    }
                    2 | 3 if !mine.is_empty() => {
                        let r = mine[rng.random_range(0..mine.len())];
                        let tokens: Vec<Token> = (0..rng.random_range(1..30))
                            .map(|_| rng.random_range(0..8))
                            .collect();
                        drafter.append(r, &tokens).unwrap();
                    }
                    4 if !mine.is_empty() => {
                        let r = mine[rng.random_range(0..mine.len())];
                        let kind = if rng.random() {
                            DraftKind::Chain
                        } else {
                            DraftKind::Tree
                        };
                        drafter.propose(r, kind).unwrap();
                    }
                    5 if !mine.is_empty() => {
                        let r = mine.swap_remove(rng.random_range(0..mine.len()));
                        drafter.finish_request(r).unwrap();
                    }
                    6 => {
                        let next = iteration.fetch_add(1, Ordering::Relaxed) + 1;
                        // Iterations only go forward; a thread that lost the race may be refused.
                        let _ = drafter.begin_iteration(next);
                    }
                    7 => {
                        let _ = drafter.history(rng.random_range(0..6));
                    }
                    _ => {
                        let stats = drafter.stats();
                        assert!(
                            stats.tokens <= total_budget,
                            "a snapshot over the total budget: {stats:?}"
                        );
                        assert!(
                            stats.tokens <= prompt_budget * stats.prompts.max(1),
                            "{stats:?}"
                        );
                    }
                }
            }
            done.send(t).unwrap();
        });
    }
    drop(done);
    for _ in 0..8 {
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("a drafter call did not return within 60 s: deadlock (seed printed above)");
    }
}

#[test]
fn a_proposal_looks_at_most_at_max_occurrences_per_gram_length() {
    // 20,000 copies of one token then 5,000 of a pair: every suffix of a context in there occurs thousands of
    // times. Capped, a proposal is built from at most `max_occurrences` occurrences per gram length (the
    // chains of the last 1, 3 and 6 tokens), so its work does not grow with the history.
    let history: Vec<Token> = std::iter::repeat_n(7, 20_000)
        .chain((0..10_000).map(|i| 1 + i % 2))
        .collect();
    for (max_occurrences, most) in [(16, 3 * 16), (usize::MAX, usize::MAX)] {
        let drafter = Drafter::new(DrafterConfig {
            max_occurrences,
            min_token_prob: 0.0,
            ..DrafterConfig::default()
        })
        .unwrap();
        store_rollouts(&drafter, 1, [history.as_slice()]);
        for (probe, context) in [(1u64, vec![7; 40]), (2, vec![1, 2, 1, 2, 1, 2, 1, 2, 1])] {
            drafter.add_request(probe, 1, &context).unwrap();
            let draft = drafter.propose(probe, DraftKind::Chain).unwrap();
            assert!(
                draft.occurrences <= most,
                "cap {max_occurrences}: {} occurrences",
                draft.occurrences
            );
            if max_occurrences == usize::MAX {
                // Uncapped, every occurrence of the longest matching suffix counts: thousands.
                assert!(draft.occurrences > 4000, "{}", draft.occurrences);
            }
            let next = if probe == 1 { 7 } else { 2 };
            assert_eq!(draft.tokens[0], next, "cap {max_occurrences}");
        }
    }
}

#[test]
fn a_frequent_token_with_hundreds_of_continuations_matches_the_reference() {
    // Every other token is 0, followed by one of 300 others: the 1-token suffix [0] has hundreds of distinct
    // continuations, past what the drafter tracks for its first-token bound, which it then drops.
    let mut rng = common::rng("drafter many continuations");
    for config in configs() {
        let drafter = Drafter::new(config).unwrap();
        let rollouts: Vec<Vec<Token>> = (0..6)
            .map(|_| {
                (0..400)
                    .map(|i| {
                        if i % 2 == 0 {
                            0
                        } else {
                            rng.random_range(1..301)
                        }
                    })
                    .collect()
            })
            .collect();
        store_rollouts(&drafter, 3, rollouts.iter().map(Vec::as_slice));
        let context: Vec<Token> = vec![5, 0, 17, 0];
        drafter.add_request(100, 3, &context).unwrap();
        check_probe(&drafter, 3, 100, &context, "alternating history");
    }
}
