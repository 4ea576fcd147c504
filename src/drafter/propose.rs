//! Drafts from the occurrences of the context's suffixes. Every match length is scored by the expected number
//! of accepted tokens of its chain (the most frequent continuation, step by step), and the best score wins
//! (suffix decoding's selection, Oliaro et al., "SuffixDecoding", arXiv 2411.04975, section 3.2). A chain
//! proposal is the winning chain; a tree proposal is the best-first tree (by path probability) over the
//! continuations of the winning match length.
//!
//! A cursor stands at one occurrence's continuation. At a draft node, the empirical probability of continuation
//! token `t` is (cursors whose next token is `t`) / (cursors that have a next token); a node's path probability
//! is the product along its path. A node is drafted only if its path probability is at least `min_token_prob`.
//! If the continuations were the target's distribution, a node is accepted with its path probability, so the sum
//! of path probabilities is the expected number of accepted tokens: the draft's score.
//!
//! Why trees are chosen by their chain: scoring each match length by its whole tree drafts a best-first tree of
//! up to 63 nodes per match length, 40 us at the 99th percentile with a 1M-token history, and on the real-text
//! replay (`benches/drafter.rs`) it accepted as many tokens per step as choosing by the chain (1.464 and 1.465
//! per prompt, 1.416 and 1.417 global, at 1M tokens). The chain is the tree's most probable path, and one tree
//! is drafted per proposal.
//!
//! How: the cursors of the candidate occurrences go into one [`ContinuationTrie`], longest match first, so that
//! after the occurrences matching at least `v` tokens are in, the trie's counts are those of match length `v`:
//! a chain is then a walk down the trie, with no rescan of the cursors per match length or per token. A match
//! length whose budget alone cannot beat the best score is never inserted.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

use super::index::{Candidate, Occurrence, SuffixIndex, Token, LEVELS};
use super::DraftKind;

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

impl Draft {
    fn with_capacity(nodes: usize, occurrences: usize) -> Self {
        Draft {
            tokens: Vec::with_capacity(nodes),
            parents: Vec::with_capacity(nodes),
            probs: Vec::with_capacity(nodes),
            occurrences,
            ..Draft::default()
        }
    }
}

const NO_NODE: u32 = u32::MAX;

/// The end of a trie edge: the edge holds the tokens `sequence[start..start + len]`, its first token the
/// node's key among its siblings.
#[derive(Clone, Copy)]
struct TrieNode<'a> {
    sequence: &'a [Token],
    start: u32,
    len: u32,
    /// The edge's first token, kept here so that finding a child reads no history.
    first: Token,
    /// Cursors whose continuation runs through the whole edge.
    count: u32,
    /// Of those, the cursors whose sequence ends at the edge's end (no next token there).
    ends: u32,
    first_child: u32,
    next_sibling: u32,
}

impl TrieNode<'_> {
    fn edge(&self) -> &[Token] {
        &self.sequence[self.start as usize..(self.start + self.len) as usize]
    }
    /// Cursors with a next token at the edge's end: the denominator of the children's probabilities.
    fn continuing(&self) -> u32 {
        self.count - self.ends
    }
}

/// The continuations of a set of cursors, as a path-compressed trie cut at `depth_cap` tokens: a node's count
/// is the number of cursors whose continuation starts with the node's path, so the empirical probability of a
/// child is its count over its parent's continuing cursors, and along an edge (one child) it is 1. The cap
/// may be lowered between insertions (a shorter match has a smaller budget): a node's count then covers the
/// cursors inserted while the cap was at least its depth, which is every cursor for the nodes a draft within
/// the current cap reaches. Inserting a cursor costs the length of its common prefix with the cursors already
/// in (at most `depth_cap` node visits, plus a rekey of the split node's children in hash-map mode), and a chain
/// or tree of `n` nodes then costs `O(n)` node visits (times the children at a branch), however many cursors
/// agree along it.
pub(crate) struct ContinuationTrie<'a> {
    nodes: Vec<TrieNode<'a>>,
    depth_cap: usize,
    /// The largest count among the root's children (the most frequent first token's).
    top_first: u32,
    /// `(node, first token) -> child`, kept when more than [`Self::SCAN_CURSORS`] cursors may come (the
    /// configured walks allow it: `max_occurrences` times the levels; a node may then have hundreds of
    /// children); otherwise a node's children are found by scanning its sibling list, which is faster for the
    /// few that short walks give.
    children: Option<HashMap<(u32, Token), u32>>,
}

impl<'a> ContinuationTrie<'a> {
    /// Cursors beyond which children are found through a hash map.
    const SCAN_CURSORS: usize = 64;

    /// An empty trie for about `cursors` cursors; no draft from it is ever deeper than `depth_cap` tokens.
    fn new(depth_cap: usize, cursors: usize) -> Self {
        let mut nodes = Vec::with_capacity(2 * cursors.min(1 << 12) + 1);
        nodes.push(TrieNode {
            sequence: &[],
            start: 0,
            len: 0,
            first: 0,
            count: 0,
            ends: 0,
            first_child: NO_NODE,
            next_sibling: NO_NODE,
        });
        ContinuationTrie {
            nodes,
            depth_cap,
            top_first: 0,
            children: (cursors > Self::SCAN_CURSORS).then(HashMap::new),
        }
    }

    /// Lowers the depth cap to `cap` for the cursors inserted from now on.
    fn lower_cap(&mut self, cap: usize) {
        self.depth_cap = self.depth_cap.min(cap);
    }

    /// Cursors inserted.
    fn cursors(&self) -> usize {
        self.nodes[0].count as usize
    }

    /// The share of the continuing cursors whose next token is the most frequent one (0 if none continues):
    /// every path probability of a draft from the trie is at most this.
    fn top_first_share(&self) -> f64 {
        match self.nodes[0].continuing() {
            0 => 0.0,
            continuing => f64::from(self.top_first) / f64::from(continuing),
        }
    }

    fn child_with(&self, node: u32, token: Token) -> u32 {
        if let Some(children) = &self.children {
            return children.get(&(node, token)).copied().unwrap_or(NO_NODE);
        }
        let mut child = self.nodes[node as usize].first_child;
        while child != NO_NODE && self.nodes[child as usize].first != token {
            child = self.nodes[child as usize].next_sibling;
        }
        child
    }

    /// Adds the cursor standing at `sequence[next]`.
    fn insert(&mut self, sequence: &'a [Token], next: usize) {
        let (mut node, mut depth, mut at) = (0u32, 0usize, next);
        self.nodes[0].count += 1;
        while depth < self.depth_cap {
            let Some(&token) = sequence.get(at) else {
                self.nodes[node as usize].ends += 1;
                return;
            };
            let child = self.child_with(node, token);
            if child == NO_NODE {
                let len = (sequence.len() - at).min(self.depth_cap - depth);
                let leaf = self.nodes.len() as u32;
                let parent = &mut self.nodes[node as usize];
                let next_sibling = std::mem::replace(&mut parent.first_child, leaf);
                self.nodes.push(TrieNode {
                    sequence,
                    start: at as u32,
                    len: len as u32,
                    first: token,
                    count: 1,
                    ends: u32::from(at + len == sequence.len() && depth + len < self.depth_cap),
                    first_child: NO_NODE,
                    next_sibling,
                });
                if let Some(children) = &mut self.children {
                    children.insert((node, token), leaf);
                }
                if node == 0 {
                    self.top_first = self.top_first.max(1);
                }
                return;
            }
            let edge = self.nodes[child as usize].edge();
            let common = edge
                .iter()
                .zip(&sequence[at..])
                .take(self.depth_cap - depth)
                .take_while(|(a, b)| a == b)
                .count();
            if common < edge.len() {
                self.split(child, common);
            }
            let reached = &mut self.nodes[child as usize];
            reached.count += 1;
            if node == 0 {
                self.top_first = self.top_first.max(reached.count);
            }
            (node, depth, at) = (child, depth + common, at + common);
        }
    }

    /// Cuts `node`'s edge after its first `keep` tokens: the rest becomes its only child, which takes over its
    /// children and ends.
    fn split(&mut self, node: u32, keep: usize) {
        let lower = self.nodes.len() as u32;
        let upper = &mut self.nodes[node as usize];
        let mut rest = *upper;
        rest.start += keep as u32;
        rest.len -= keep as u32;
        rest.first = rest.sequence[rest.start as usize];
        rest.next_sibling = NO_NODE;
        upper.len = keep as u32;
        upper.ends = 0;
        upper.first_child = lower;
        self.nodes.push(rest);
        if let Some(children) = &mut self.children {
            let mut child = rest.first_child;
            while child != NO_NODE {
                let c = &self.nodes[child as usize];
                children.remove(&(node, c.first));
                children.insert((lower, c.first), child);
                child = c.next_sibling;
            }
            children.insert((node, rest.first), lower);
        }
    }

    /// The most frequent child of `node` (ties to the smaller token), or `NO_NODE`.
    fn most_frequent_child(&self, node: u32) -> u32 {
        let mut best = NO_NODE;
        let mut child = self.nodes[node as usize].first_child;
        while child != NO_NODE {
            let c = &self.nodes[child as usize];
            if best == NO_NODE || {
                let b = &self.nodes[best as usize];
                (c.count, std::cmp::Reverse(c.first)) > (b.count, std::cmp::Reverse(b.first))
            } {
                best = child;
            }
            child = c.next_sibling;
        }
        best
    }

    /// Follows the most frequent continuation (ties to the smallest token id) for up to `budget` tokens, into
    /// `chain` (whose `match_len` is left alone).
    fn chain(&self, budget: usize, min_token_prob: f64, chain: &mut Chain<'a>) {
        chain.segments.clear();
        (chain.len, chain.score, chain.occurrences) = (0, 0.0, self.cursors());
        let (mut node, mut prob) = (0u32, 1.0f64);
        while chain.len < budget {
            let child = self.most_frequent_child(node);
            if child == NO_NODE {
                break;
            }
            let c = &self.nodes[child as usize];
            prob *= f64::from(c.count) / f64::from(self.nodes[node as usize].continuing());
            if prob < min_token_prob {
                break;
            }
            // Along the edge every cursor continues alike: each further token has probability 1.
            let tokens =
                &c.sequence[c.start as usize..][..(c.len as usize).min(budget - chain.len)];
            for _ in tokens {
                chain.score += prob;
            }
            chain.len += tokens.len();
            chain.segments.push((tokens, prob));
            node = child;
        }
    }

    /// Queues the children of the end of `node`'s edge whose path probability reaches the floor.
    fn queue_children(
        &self,
        node: u32,
        parent: i32,
        prob: f64,
        min_token_prob: f64,
        pending: &mut BinaryHeap<Pending>,
    ) {
        let continuing = f64::from(self.nodes[node as usize].continuing());
        let mut child = self.nodes[node as usize].first_child;
        while child != NO_NODE {
            let c = &self.nodes[child as usize];
            let child_prob = prob * (f64::from(c.count) / continuing);
            if child_prob >= min_token_prob {
                pending.push(Pending {
                    prob: child_prob,
                    parent,
                    token: c.first,
                    node: child,
                    offset: 0,
                });
            }
            child = c.next_sibling;
        }
    }

    /// Best-first: repeatedly drafts the pending node of highest path probability, until `budget` nodes.
    fn tree(&self, budget: usize, min_token_prob: f64) -> Draft {
        let mut draft = Draft::with_capacity(budget, self.cursors());
        let mut pending = BinaryHeap::with_capacity(4 * budget);
        if budget > 0 {
            self.queue_children(0, -1, 1.0, min_token_prob, &mut pending);
        }
        while draft.tokens.len() < budget {
            let Some(point) = pending.pop() else { break };
            let index = draft.tokens.len() as i32;
            draft.tokens.push(point.token);
            draft.parents.push(point.parent);
            draft.probs.push(point.prob);
            draft.score += point.prob;
            let edge = self.nodes[point.node as usize].edge();
            match edge.get(point.offset as usize + 1) {
                // Inside an edge: one child, with probability 1.
                Some(&token) => pending.push(Pending {
                    token,
                    parent: index,
                    offset: point.offset + 1,
                    ..point
                }),
                None => {
                    self.queue_children(point.node, index, point.prob, min_token_prob, &mut pending)
                }
            }
        }
        draft
    }
}

/// A chain drafted from the trie, as the edges it runs along: `(tokens, path probability)` each. Scoring a
/// match length needs only its score; the tokens are written out for the winner alone.
#[derive(Default)]
struct Chain<'a> {
    segments: Vec<(&'a [Token], f64)>,
    len: usize,
    score: f64,
    occurrences: usize,
    match_len: usize,
}

impl Chain<'_> {
    fn draft(&self) -> Draft {
        let mut draft = Draft::with_capacity(self.len, self.occurrences);
        for &(tokens, prob) in &self.segments {
            for &token in tokens {
                draft.parents.push(draft.tokens.len() as i32 - 1);
                draft.tokens.push(token);
                draft.probs.push(prob);
            }
        }
        (draft.match_len, draft.score) = (self.match_len, self.score);
        draft
    }
}

/// A draft node waiting in the tree's queue: the token at `offset` in `node`'s edge.
struct Pending {
    prob: f64,
    parent: i32,
    token: Token,
    node: u32,
    offset: u32,
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

/// What a proposal needs besides the index and the context.
pub(crate) struct Settings<'b> {
    pub kind: DraftKind,
    /// Chain entries visited per gram level (see [`SuffixIndex::collect`]).
    pub max_occurrences: usize,
    pub min_token_prob: f64,
    /// The draft budget for a match of this many tokens.
    pub budget: &'b dyn Fn(usize) -> usize,
}

/// The most chain entries per level for which the levels below the longest gram's are walked together.
const LOCKSTEP_VISITS: usize = 64;

/// The best draft over every match length of the context's suffix (by chain score, ties to the longer match;
/// see the module documentation); an empty draft with `match_len` 0 when no suffix of at least `min_match`
/// tokens occurs with a continuation.
///
/// The chain levels are scored from the longest gram down: each gives the matches from its gram length up to
/// the next level's (the longer ones came from that level, unless its walk stopped at the cap first: then this
/// level's longer matches that it did not reach count too, for the shorter match lengths). A level is scored
/// only if one of its matches could still score higher, i.e. while the best score is below the budget of a
/// match one token shorter than the level above (a chain's score is at most its length). The drafts of the
/// match lengths between two occurrences' match lengths are prefixes of the longer one's, so only the match
/// lengths that occur are drafted.
pub(crate) fn best_draft(index: &SuffixIndex, context: &[Token], settings: &Settings<'_>) -> Draft {
    let grams = index.gram_lens();
    let longest = context.len().min(index.max_match());
    // The levels to walk, longest gram first; a level with the gram length of the level above adds nothing.
    let levels: Vec<usize> = (0..grams.len())
        .rev()
        .filter(|&level| grams.get(level + 1) != Some(&grams[level]))
        .collect();
    let mut found: [Vec<Candidate>; LEVELS] = Default::default();
    let mut complete = [true; LEVELS];
    let mut walked = 0;
    let mut trie = Trie {
        continuations: ContinuationTrie::new(
            (settings.budget)(longest),
            settings.max_occurrences.saturating_mul(levels.len()),
        ),
        pending: Vec::new(),
        holds_from: usize::MAX,
        #[cfg(debug_assertions)]
        inserted: HashSet::new(),
    };
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut best: Option<Chain<'_>> = None;
    let mut upper_complete = true;
    let mut winner_pool = 0;
    for (i, &level) in levels.iter().enumerate() {
        let upper = grams.get(level + 1).copied().unwrap_or(usize::MAX);
        if upper != usize::MAX
            && best
                .as_ref()
                .is_some_and(|b| b.score >= (settings.budget)(upper - 1) as f64)
        {
            break;
        }
        if i == walked {
            // The longest gram's level alone first: a long match often makes the others unnecessary. Then the
            // rest together, so that their cache misses overlap, unless walks are long (one by one then: a
            // level above may spare the walk of a frequent short gram).
            walked = if i == 0 || settings.max_occurrences > LOCKSTEP_VISITS {
                i + 1
            } else {
                levels.len()
            };
            let done = index.collect(
                context,
                &levels[i..walked],
                settings.max_occurrences,
                &mut found,
            );
            for &l in &levels[i..walked] {
                complete[l] = done[l];
            }
        }
        let mut found = std::mem::take(&mut found[level]);
        // A match of the level above's gram length or more is also on that level's chain: it is new here only
        // if that walk stopped at the cap before reaching it.
        // (A few earlier candidates are scanned; many, from long walks, are looked up in a set.)
        if upper_complete {
            found.retain(|c| c.match_len < upper);
        } else if candidates.len() <= ContinuationTrie::SCAN_CURSORS {
            found.retain(|c| {
                c.match_len < upper || !candidates.iter().any(|o| o.occurrence == c.occurrence)
            });
        } else {
            let known: HashSet<Occurrence> = candidates.iter().map(|c| c.occurrence).collect();
            found.retain(|c| c.match_len < upper || !known.contains(&c.occurrence));
        }
        let scored = best.as_ref().map(|b| b.match_len);
        upper_complete = complete[level];
        score_match_lengths(
            index,
            &mut found,
            grams[level]..upper,
            settings,
            &mut trie,
            &mut best,
        );
        candidates.extend(found);
        if best.as_ref().map(|b| b.match_len) != scored {
            // The occurrences the winner's chain could count: none a later level adds.
            winner_pool = candidates.len();
        }
    }
    let Some(best) = best else {
        return Draft::default();
    };
    let trie_holds_from = trie.holds_from;
    match settings.kind {
        DraftKind::Chain => best.draft(),
        DraftKind::Tree => {
            let budget = (settings.budget)(best.match_len);
            // The trie holds the occurrences of the winner's match length unless a shorter one was scored after.
            let mut trie = trie.continuations;
            if trie_holds_from != best.match_len {
                let from = candidates[..winner_pool]
                    .iter()
                    .filter(|c| c.match_len >= best.match_len);
                trie = ContinuationTrie::new(budget, from.clone().count());
                for c in from {
                    trie.insert(index.tokens_of(c.occurrence), c.occurrence.end as usize);
                }
            }
            Draft {
                match_len: best.match_len,
                ..trie.tree(budget, settings.min_token_prob)
            }
        }
    }
}

/// Adds the occurrences `found` (all new, each matching at least `lengths.start` tokens) to `trie`, longest match
/// first, and after those of each match length `v` in `lengths` scores the chain of the occurrences matching at
/// least `v` tokens; keeps the best score in `best` (a shorter match must score strictly higher). Every
/// occurrence already in `trie` matches at least `lengths.end` tokens. A match length is skipped when its bound
/// cannot beat `best`: its budget (checked before its occurrences are inserted), or its first token's
/// probability times its budget (every path probability is at most the first's).
fn score_match_lengths<'a>(
    index: &'a SuffixIndex,
    found: &mut [Candidate],
    lengths: std::ops::Range<usize>,
    settings: &Settings<'_>,
    trie: &mut Trie<'a>,
    best: &mut Option<Chain<'a>>,
) {
    found.sort_by_key(|c| std::cmp::Reverse(c.match_len));
    let mut chain = Chain::default();
    let mut i = 0;
    while i < found.len() {
        let v = found[i].match_len;
        debug_assert!(v >= lengths.start);
        while i < found.len() && found[i].match_len == v {
            trie.pending.push(found[i]);
            i += 1;
        }
        if v >= lengths.end {
            continue;
        }
        let budget = (settings.budget)(v);
        if best.as_ref().is_some_and(|b| budget as f64 <= b.score) {
            continue;
        }
        trie.flush(index, v, budget);
        // A margin for rounding: the bound must never drop a draft that would tie or win.
        if best.as_ref().is_some_and(|b| {
            trie.continuations.top_first_share() * budget as f64 * (1.0 + 1e-9) < b.score
        }) {
            continue;
        }
        trie.continuations
            .chain(budget, settings.min_token_prob, &mut chain);
        chain.match_len = v;
        if best.as_ref().is_none_or(|b| chain.score > b.score) {
            let previous = best.replace(chain);
            chain = previous.unwrap_or_default();
        }
    }
}

/// The selection's trie and the occurrences not in it yet: they are inserted only when a chain is to be scored,
/// so a match length pruned by its budget alone (an uncapped walk of a frequent short gram) costs no insertion.
struct Trie<'a> {
    continuations: ContinuationTrie<'a>,
    pending: Vec<Candidate>,
    /// Every occurrence matching at least this many tokens is in `continuations` (`usize::MAX`: none).
    holds_from: usize,
    /// What went in, to check that no occurrence goes in twice (the levels' walks overlap).
    #[cfg(debug_assertions)]
    inserted: HashSet<Occurrence>,
}

impl<'a> Trie<'a> {
    /// Inserts the pending occurrences, all those matching at least `v` tokens, as deep as `budget` (the
    /// budget of `v`: those of shorter matches, scored later, are no larger).
    fn flush(&mut self, index: &'a SuffixIndex, v: usize, budget: usize) {
        self.continuations.lower_cap(budget);
        for c in self.pending.drain(..) {
            #[cfg(debug_assertions)]
            assert!(self.inserted.insert(c.occurrence), "{c:?} inserted twice");
            self.continuations
                .insert(index.tokens_of(c.occurrence), c.occurrence.end as usize);
        }
        self.holds_from = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Every path of the trie, token by token: `path -> (cursors whose continuation starts with it, cursors whose
    /// continuation is exactly it)`. Fails on two siblings with the same first token.
    fn expanded(trie: &ContinuationTrie<'_>) -> BTreeMap<Vec<Token>, (u32, u32)> {
        let mut out = BTreeMap::new();
        out.insert(Vec::new(), (trie.nodes[0].count, trie.nodes[0].ends));
        let mut stack = vec![(0u32, Vec::new())];
        while let Some((node, path)) = stack.pop() {
            let mut child = trie.nodes[node as usize].first_child;
            while child != NO_NODE {
                let c = &trie.nodes[child as usize];
                let mut p = path.clone();
                for (i, &t) in c.edge().iter().enumerate() {
                    p.push(t);
                    let ends = if i + 1 == c.edge().len() { c.ends } else { 0 };
                    assert!(
                        out.insert(p.clone(), (c.count, ends)).is_none(),
                        "{p:?} twice"
                    );
                }
                stack.push((child, p));
                child = c.next_sibling;
            }
        }
        out
    }

    /// The same from the cursors themselves, each inserted under its own depth cap.
    fn brute_force(cursors: &[(&[Token], usize, usize)]) -> BTreeMap<Vec<Token>, (u32, u32)> {
        let mut out = BTreeMap::from([(Vec::new(), (0, 0))]);
        for &(sequence, next, cap) in cursors {
            let rest = &sequence[next..];
            for len in 0..=rest.len().min(cap) {
                let entry = out.entry(rest[..len].to_vec()).or_default();
                entry.0 += 1;
                entry.1 += u32::from(len == rest.len() && len < cap);
            }
        }
        out
    }

    #[test]
    fn the_trie_counts_every_prefix_of_every_cursor_under_its_cap_in_both_lookup_modes() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for case in 0..200 {
            let vocab = 1 + next(4) as u32;
            let sequences: Vec<Vec<Token>> = (0..1 + next(6))
                .map(|_| {
                    (0..next(40))
                        .map(|_| next(u64::from(vocab)) as Token)
                        .collect()
                })
                .collect();
            // Cursors in sequence order, under a cap that falls now and then.
            let mut cursors = Vec::new();
            let mut cap = 1 + next(12) as usize;
            for s in &sequences {
                for _ in 0..next(30) {
                    if next(8) == 0 {
                        cap -= next(cap as u64) as usize;
                    }
                    cursors.push((s.as_slice(), next(s.len() as u64 + 1) as usize, cap));
                }
            }
            let want = brute_force(&cursors);
            for expected_cursors in [0, 1000] {
                let mut trie = ContinuationTrie::new(usize::MAX, expected_cursors);
                assert_eq!(trie.children.is_some(), expected_cursors > 0);
                for &(s, at, cap) in &cursors {
                    trie.lower_cap(cap);
                    trie.insert(s, at);
                }
                assert_eq!(
                    expanded(&trie),
                    want,
                    "case {case}, hashed {expected_cursors}"
                );
                let top = want
                    .iter()
                    .filter(|(p, _)| p.len() == 1)
                    .map(|(_, &(count, _))| count)
                    .max()
                    .unwrap_or(0);
                assert_eq!(trie.top_first, top, "case {case}");
            }
        }
    }
}
