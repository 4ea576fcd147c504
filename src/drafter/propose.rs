//! Drafts from the occurrences of the matched suffix: a chain (the most frequent continuation, step by step)
//! or a tree (best-first over continuations by path probability).
//!
//! A cursor stands at one occurrence's continuation. At a draft node, the empirical probability of continuation
//! token `t` is (cursors whose next token is `t`) / (cursors that have a next token); a node's path probability
//! is the product along its path. A node is drafted only if its path probability is at least `min_token_prob`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::index::Token;

/// A position in a stored sequence: `tokens[next]` is the continuation to consider.
#[derive(Clone, Copy)]
pub(crate) struct Cursor<'a> {
    pub tokens: &'a [Token],
    pub next: usize,
}

/// A draft: `tokens[i]` with `parents[i]` (-1 for a child of the context's last token, otherwise an earlier
/// index, so `parents[i] < i`) and `probs[i]` its path probability. A chain has `parents[i] = i - 1`.
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
}

/// The continuations of `cursors`, as (token, count) in increasing token order, and their total.
fn tally(cursors: &[Cursor<'_>], scratch: &mut Vec<Token>) -> (Vec<(Token, usize)>, usize) {
    scratch.clear();
    scratch.extend(cursors.iter().filter_map(|c| c.tokens.get(c.next).copied()));
    scratch.sort_unstable();
    let mut counts: Vec<(Token, usize)> = Vec::new();
    for &t in scratch.iter() {
        match counts.last_mut() {
            Some((last, n)) if *last == t => *n += 1,
            _ => counts.push((t, 1)),
        }
    }
    (counts, scratch.len())
}

/// The cursors continuing with `token`, advanced past it.
fn follow<'a>(cursors: &[Cursor<'a>], token: Token) -> Vec<Cursor<'a>> {
    cursors
        .iter()
        .filter(|c| c.tokens.get(c.next) == Some(&token))
        .map(|c| Cursor {
            tokens: c.tokens,
            next: c.next + 1,
        })
        .collect()
}

/// Follows the most frequent continuation (ties to the smallest token id) for up to `budget` tokens.
pub(crate) fn chain(mut cursors: Vec<Cursor<'_>>, budget: usize, min_token_prob: f64) -> Draft {
    let mut draft = Draft::default();
    let mut scratch = Vec::new();
    let mut prob = 1.0f64;
    while draft.tokens.len() < budget {
        let (counts, total) = tally(&cursors, &mut scratch);
        // The largest count; among equal counts the first, i.e. the smallest token.
        let Some(&(token, count)) = counts
            .iter()
            .reduce(|best, c| if c.1 > best.1 { c } else { best })
        else {
            break;
        };
        prob *= count as f64 / total as f64;
        if prob < min_token_prob {
            break;
        }
        draft.parents.push(draft.tokens.len() as i32 - 1);
        draft.tokens.push(token);
        draft.probs.push(prob);
        cursors = follow(&cursors, token);
    }
    draft
}

/// A node waiting to be drafted.
struct Pending<'a> {
    prob: f64,
    parent: i32,
    token: Token,
    cursors: Vec<Cursor<'a>>,
}

impl Pending<'_> {
    fn key(&self) -> (f64, i32, Token) {
        (self.prob, self.parent, self.token)
    }
}

/// Heap order: higher probability first; then the lower parent index; then the smaller token.
impl Ord for Pending<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        let (p, parent, token) = self.key();
        let (q, other_parent, other_token) = other.key();
        p.total_cmp(&q)
            .then(other_parent.cmp(&parent))
            .then(other_token.cmp(&token))
    }
}
impl PartialOrd for Pending<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Pending<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pending<'_> {}

/// Queues the children of a node (its continuations at `cursors`) whose path probability reaches the floor. One
/// stable sort groups the cursors by their next token, so a node with many children costs O(c log c) for its
/// `c` cursors, not one pass over them per child.
fn expand<'a>(
    cursors: &[Cursor<'a>],
    parent: i32,
    prob: f64,
    min_token_prob: f64,
    pending: &mut BinaryHeap<Pending<'a>>,
) {
    let mut advanced: Vec<(Token, Cursor<'a>)> = cursors
        .iter()
        .filter_map(|c| {
            c.tokens.get(c.next).map(|&t| {
                (
                    t,
                    Cursor {
                        tokens: c.tokens,
                        next: c.next + 1,
                    },
                )
            })
        })
        .collect();
    advanced.sort_by_key(|&(t, _)| t);
    let total = advanced.len();
    for group in advanced.chunk_by(|a, b| a.0 == b.0) {
        let child = prob * (group.len() as f64 / total as f64);
        if child >= min_token_prob {
            pending.push(Pending {
                prob: child,
                parent,
                token: group[0].0,
                cursors: group.iter().map(|&(_, c)| c).collect(),
            });
        }
    }
}

/// Best-first: repeatedly drafts the pending node of highest path probability, until `budget` nodes.
pub(crate) fn tree(cursors: Vec<Cursor<'_>>, budget: usize, min_token_prob: f64) -> Draft {
    let mut draft = Draft::default();
    let mut pending = BinaryHeap::new();
    if budget > 0 {
        expand(&cursors, -1, 1.0, min_token_prob, &mut pending);
    }
    while draft.tokens.len() < budget {
        let Some(node) = pending.pop() else { break };
        let index = draft.tokens.len() as i32;
        draft.tokens.push(node.token);
        draft.parents.push(node.parent);
        draft.probs.push(node.prob);
        expand(
            &node.cursors,
            index,
            node.prob,
            min_token_prob,
            &mut pending,
        );
    }
    draft
}
