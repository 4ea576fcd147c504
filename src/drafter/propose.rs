//! Drafts from the occurrences of the context's suffixes: for every match length, a chain (the most frequent
//! continuation, step by step) or a tree (best-first over continuations by path probability), scored by the
//! expected number of accepted tokens; the best score wins (suffix decoding's selection, Oliaro et al.,
//! "SuffixDecoding", arXiv 2411.04975, section 3.2).
//!
//! A cursor stands at one occurrence's continuation. At a draft node, the empirical probability of continuation
//! token `t` is (cursors whose next token is `t`) / (cursors that have a next token); a node's path probability
//! is the product along its path. A node is drafted only if its path probability is at least `min_token_prob`.
//! If the continuations were the target's distribution, a node is accepted with its path probability, so the sum
//! of path probabilities is the expected number of accepted tokens: the draft's score.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::index::{Candidate, SuffixIndex, Token};
use super::DraftKind;

/// A position in a stored sequence: `tokens[next]` is the continuation to consider.
#[derive(Clone, Copy)]
pub(crate) struct Cursor<'a> {
    pub tokens: &'a [Token],
    pub next: usize,
}

/// A draft: `tokens[i]` with `parents[i]` (-1 for a child of the context's last token, otherwise an earlier
/// index, so `parents[i] < i`) and `probs[i]` its path probability. A chain has `parents[i] = i - 1`.
/// `score` is the sum of `probs` (the expected accepted tokens), from the `occurrences` occurrences of the
/// context's last `match_len` tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    /// The drafted tokens.
    pub tokens: Vec<Token>,
    /// Each token's parent: -1 for the context's last token, otherwise an earlier index.
    pub parents: Vec<i32>,
    /// Each token's path probability: the product of its path's empirical probabilities.
    pub probs: Vec<f64>,
    /// The length of the context suffix the draft continues (0 when nothing matched).
    pub match_len: usize,
    /// The expected number of accepted tokens under the history's empirical continuation law: the sum of
    /// `probs` (0 for an empty draft).
    pub score: f64,
    /// How many stored occurrences of the matched suffix the draft was built from.
    pub occurrences: usize,
}

/// The most frequent continuation of `cursors` (ties to the smallest token), its count, and how many cursors
/// have a continuation; `None` if none has.
fn most_frequent(
    cursors: &[Cursor<'_>],
    scratch: &mut Vec<Token>,
) -> Option<(Token, usize, usize)> {
    scratch.clear();
    scratch.extend(cursors.iter().filter_map(|c| c.tokens.get(c.next).copied()));
    scratch.sort_unstable();
    let best = scratch.chunk_by(|a, b| a == b).fold(
        None,
        |best: Option<(Token, usize)>, run| match best {
            Some((_, n)) if n >= run.len() => best,
            _ => Some((run[0], run.len())),
        },
    )?;
    Some((best.0, best.1, scratch.len()))
}

/// Keeps the cursors continuing with `token`, advanced past it.
fn follow(cursors: &mut Vec<Cursor<'_>>, token: Token) {
    cursors.retain_mut(|c| {
        let agrees = c.tokens.get(c.next) == Some(&token);
        c.next += 1;
        agrees
    });
}

/// Follows the most frequent continuation (ties to the smallest token id) for up to `budget` tokens.
fn chain(cursors: &[Cursor<'_>], budget: usize, min_token_prob: f64) -> Draft {
    let mut draft = Draft {
        occurrences: cursors.len(),
        ..Draft::default()
    };
    let mut cursors = cursors.to_vec();
    let mut scratch = Vec::new();
    let mut prob = 1.0f64;
    while draft.tokens.len() < budget {
        let Some((token, count, total)) = most_frequent(&cursors, &mut scratch) else {
            break;
        };
        prob *= count as f64 / total as f64;
        if prob < min_token_prob {
            break;
        }
        draft.parents.push(draft.tokens.len() as i32 - 1);
        draft.tokens.push(token);
        draft.probs.push(prob);
        draft.score += prob;
        follow(&mut cursors, token);
    }
    draft
}

/// A node waiting to be drafted; its cursors are `arena[cursors]` (see [`tree`]).
struct Pending {
    prob: f64,
    parent: i32,
    token: Token,
    cursors: std::ops::Range<usize>,
}

impl Pending {
    fn key(&self) -> (f64, i32, Token) {
        (self.prob, self.parent, self.token)
    }
}

/// Heap order: higher probability first; then the lower parent index; then the smaller token.
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        let (p, parent, token) = self.key();
        let (q, other_parent, other_token) = other.key();
        p.total_cmp(&q)
            .then(other_parent.cmp(&parent))
            .then(other_token.cmp(&token))
    }
}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pending {}

/// The scratch space of one tree: every queued node's cursors, back to back, and a sort buffer.
struct TreeArena<'a> {
    cursors: Vec<Cursor<'a>>,
    by_token: Vec<(Token, Cursor<'a>)>,
}

/// Queues the children of a node (the continuations of `arena.cursors[range]`) whose path probability reaches
/// the floor. One sort groups the cursors by their next token, so a node with many children costs
/// O(c log c) for its `c` cursors, not one pass over them per child.
fn expand<'a>(
    arena: &mut TreeArena<'a>,
    range: std::ops::Range<usize>,
    parent: i32,
    prob: f64,
    min_token_prob: f64,
    pending: &mut BinaryHeap<Pending>,
) {
    let TreeArena { cursors, by_token } = arena;
    by_token.clear();
    by_token.extend(cursors[range].iter().filter_map(|c| {
        c.tokens.get(c.next).map(|&t| {
            (
                t,
                Cursor {
                    tokens: c.tokens,
                    next: c.next + 1,
                },
            )
        })
    }));
    by_token.sort_unstable_by_key(|&(t, _)| t);
    let total = by_token.len();
    for group in by_token.chunk_by(|a, b| a.0 == b.0) {
        let child = prob * (group.len() as f64 / total as f64);
        if child >= min_token_prob {
            let start = cursors.len();
            cursors.extend(group.iter().map(|&(_, c)| c));
            pending.push(Pending {
                prob: child,
                parent,
                token: group[0].0,
                cursors: start..cursors.len(),
            });
        }
    }
}

/// Best-first: repeatedly drafts the pending node of highest path probability, until `budget` nodes.
fn tree(cursors: &[Cursor<'_>], budget: usize, min_token_prob: f64) -> Draft {
    let mut draft = Draft {
        occurrences: cursors.len(),
        ..Draft::default()
    };
    let mut arena = TreeArena {
        cursors: cursors.to_vec(),
        by_token: Vec::with_capacity(cursors.len()),
    };
    let mut pending = BinaryHeap::new();
    if budget > 0 {
        expand(
            &mut arena,
            0..cursors.len(),
            -1,
            1.0,
            min_token_prob,
            &mut pending,
        );
    }
    while draft.tokens.len() < budget {
        let Some(node) = pending.pop() else { break };
        let index = draft.tokens.len() as i32;
        draft.tokens.push(node.token);
        draft.parents.push(node.parent);
        draft.probs.push(node.prob);
        draft.score += node.prob;
        expand(
            &mut arena,
            node.cursors,
            index,
            node.prob,
            min_token_prob,
            &mut pending,
        );
    }
    draft
}

/// What a proposal needs besides the index and the context.
pub(crate) struct Settings<'b> {
    pub kind: DraftKind,
    /// Chain entries visited per gram level (see [`SuffixIndex::collect`]).
    pub max_occurrences: usize,
    pub min_token_prob: f64,
    /// The draft budget for a match of this many tokens.
    pub budget: &'b dyn Fn(usize) -> usize,
}

/// The best-scoring draft over every match length of the context's suffix (ties to the longer match); an empty
/// draft with `match_len` 0 when no suffix of at least `min_match` tokens occurs with a continuation.
///
/// The chain levels are walked from the longest gram down: each gives the matches from its gram length up to
/// the next level's (the longer ones came from that level, unless its walk stopped at the cap first: then
/// this level's longer matches that it did not reach count too, for the shorter match lengths). A level is
/// walked only if one of its matches could still score higher, i.e. while the best score is below the budget
/// of a match one token shorter than the level above (a draft's score is at most its node count). The drafts
/// of the match lengths between two occurrences' match lengths are prefixes of the longer one's, so only the
/// match lengths that occur are drafted.
pub(crate) fn best_draft(index: &SuffixIndex, context: &[Token], settings: &Settings<'_>) -> Draft {
    let grams = index.gram_lens();
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut best: Option<Draft> = None;
    let mut upper_complete = true;
    for level in (0..grams.len()).rev() {
        let upper = grams.get(level + 1).copied().unwrap_or(usize::MAX);
        if grams[level] == upper {
            continue; // the same gram length as the level above: already walked
        }
        if upper != usize::MAX
            && best
                .as_ref()
                .is_some_and(|b| b.score >= (settings.budget)(upper - 1) as f64)
        {
            break;
        }
        let mut found = Vec::new();
        let complete = index.collect(
            context,
            level,
            settings.max_occurrences,
            grams[level],
            &mut found,
        );
        // A match of the level above's gram length or more is also on that level's chain: it is new here only
        // if that walk stopped at the cap before reaching it.
        found.retain(|c| {
            c.match_len < upper
                || !upper_complete && !candidates.iter().any(|o| o.occurrence == c.occurrence)
        });
        candidates.extend(found);
        upper_complete = complete;
        score_match_lengths(
            index,
            &mut candidates,
            grams[level]..upper,
            settings,
            &mut best,
        );
    }
    best.unwrap_or_default()
}

/// Drafts from the occurrences matching at least `v` tokens, for each match length `v` in `lengths` that an
/// occurrence has, longest first, and keeps the best score in `best` (a shorter match must score strictly
/// higher). A match length is skipped when its bound cannot beat `best`: its budget, and for a chain, its first
/// token's probability times its budget (every path probability is at most the first's).
fn score_match_lengths(
    index: &SuffixIndex,
    candidates: &mut [Candidate],
    lengths: std::ops::Range<usize>,
    settings: &Settings<'_>,
    best: &mut Option<Draft>,
) {
    candidates.sort_by_key(|c| std::cmp::Reverse(c.match_len));
    let cursors: Vec<Cursor<'_>> = candidates
        .iter()
        .map(|c| Cursor {
            tokens: index.tokens_of(c.occurrence),
            next: c.occurrence.end as usize,
        })
        .collect();
    // First-token counts of the occurrences so far, for the chain bound: a short list, searched linearly (the
    // capped walks give few candidates). Past `FIRST_TOKENS_TRACKED` distinct tokens (an uncapped walk of a
    // frequent gram) the bound is dropped, which only costs pruning.
    const FIRST_TOKENS_TRACKED: usize = 64;
    let mut first_counts: Vec<(Token, usize)> = Vec::new();
    let mut top_count = Some(0);
    let mut i = 0;
    while i < candidates.len() {
        let v = candidates[i].match_len;
        while i < candidates.len() && candidates[i].match_len == v {
            let token = cursors[i].tokens[cursors[i].next];
            if let Some(top) = top_count {
                let tracked = first_counts.len();
                top_count = match first_counts.iter_mut().find(|(t, _)| *t == token) {
                    Some((_, count)) => {
                        *count += 1;
                        Some(top.max(*count))
                    }
                    None if tracked < FIRST_TOKENS_TRACKED => {
                        first_counts.push((token, 1));
                        Some(top.max(1))
                    }
                    None => None,
                };
            }
            i += 1;
        }
        if v < lengths.start {
            break;
        }
        if v >= lengths.end {
            continue;
        }
        let budget = (settings.budget)(v);
        if let Some(b) = best.as_ref() {
            if budget as f64 <= b.score {
                continue;
            }
            // A margin for rounding: the bound must never drop a draft that would tie or win.
            if let (DraftKind::Chain, Some(top)) = (settings.kind, top_count) {
                let first = top as f64 / i as f64;
                if first * budget as f64 * (1.0 + 1e-9) < b.score {
                    continue;
                }
            }
        }
        let mut draft = match settings.kind {
            DraftKind::Chain => chain(&cursors[..i], budget, settings.min_token_prob),
            DraftKind::Tree => tree(&cursors[..i], budget, settings.min_token_prob),
        };
        draft.match_len = v;
        if best.as_ref().is_none_or(|b| draft.score > b.score) {
            *best = Some(draft);
        }
    }
}
