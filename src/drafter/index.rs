//! The suffix index of one source of token sequences (one prompt's rollouts, or one request's own context).
//!
//! What it answers: the occurrences of the context's suffixes (at most `max_match` tokens, at least
//! `min_match`) in the stored sequences *followed by another token*, each with its match length.
//!
//! How: every occurrence of a k-gram that has a continuation is linked into a chain of positions holding the
//! same k-gram, for three gram lengths (levels): `min_match`, 3 and 6. A query walks the chains of the
//! context's last grams at the levels it is asked for, in lockstep when several (their cache misses overlap),
//! at most a given number of entries each (the most recently linked first), extending each candidate backwards
//! token by token to get its exact match length. The 6-gram chain gives the long matches, the 3-gram chain those of 3 to 5 tokens, the `min_match` chain the shorter ones: a frequent
//! short gram's chain then need not be walked far to find a match of middling length. Because every candidate
//! is compared token by token, hash collisions never produce a wrong match; a walk that reaches the end of its
//! chain has seen every occurrence.
//!
//! Why not a suffix tree: a depth-capped suffix tree updates up to `depth` nodes per appended token, each a
//! map operation. Here an appended token touches one bucket of a head table and one older link per gram
//! length, and a stored token costs its 4 bytes, plus a 16-byte link and one or two 8-byte buckets per gram
//! length. Removing a sequence unlinks each of its positions in O(1) (the chains are doubly linked).
//!
//! The head tables are keyless, as in zlib's hash chains: a power-of-two array indexed by the top bits of
//! the gram's hash, holding the newest position. Grams whose hashes share a bucket share a chain, and the
//! token-by-token comparison of every candidate filters them out. A table grows fourfold (and its chains are
//! relinked, O(positions)) when it holds more than two positions per bucket, which keeps chains short and
//! costs a third of a relink per token, amortised; it shrinks back when removals leave it under one position
//! per 8 buckets, so a history's memory follows what it stores. At 10^6 tokens and more every table access is
//! a cache miss, so the number of them per appended token is what bounds appends.

use std::collections::HashMap;

/// A token id.
pub type Token = u32;

/// The gram lengths indexed: `min_match`, then these (each raised to `min_match` if that is longer). Each
/// level's chain gives the matches from its gram length up to the next level's.
const UPPER_GRAMS: [usize; LEVELS - 1] = [3, 6];
pub(crate) const LEVELS: usize = 3;
const ANCHOR: usize = UPPER_GRAMS[LEVELS - 2];
const NONE: u64 = u64::MAX;

/// An occurrence: the matched tokens end just before `end` in the sequence in `slot`, and `tokens[end]` is
/// the continuation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Occurrence {
    pub slot: u32,
    pub end: u32,
}

impl Occurrence {
    /// The packed position of the occurrence ending at `end` in `slot`.
    fn at(slot: u32, end: usize) -> u64 {
        Occurrence {
            slot,
            end: end as u32,
        }
        .pack()
    }
    fn pack(self) -> u64 {
        (u64::from(self.slot) << 32) | u64::from(self.end)
    }
    fn unpack(p: u64) -> Self {
        Occurrence {
            slot: (p >> 32) as u32,
            end: p as u32,
        }
    }
}

#[derive(Clone, Copy)]
struct Link {
    next: u64,
    prev: u64,
}

const UNLINKED: Link = Link {
    next: NONE,
    prev: NONE,
};

struct Sequence {
    tokens: Vec<Token>,
    /// `links[level][i]`: the chain links of the occurrence ending at `i` (used for `i >= gram length`).
    links: [Vec<Link>; LEVELS],
}

/// Chain heads by gram hash: see the module documentation.
struct HeadTable {
    buckets: Vec<u64>,
    shift: u32,
    /// Positions linked into this level's chains.
    linked: usize,
}

impl HeadTable {
    /// Small, so that a prompt with a short history costs little: growing from here costs a few relinks of a
    /// few positions.
    const INITIAL_BITS: u32 = 4;
    /// Positions per bucket before the table grows: chains then hold about this many other grams' positions.
    const MAX_LOAD: usize = 2;
    /// Growth by 4x: each position is relinked a third of a time on average over the table's life.
    const GROWTH_BITS: u32 = 2;

    fn new() -> Self {
        HeadTable {
            buckets: vec![NONE; 1 << Self::INITIAL_BITS],
            shift: 64 - Self::INITIAL_BITS,
            linked: 0,
        }
    }

    fn bucket(&self, hash: u64) -> usize {
        (hash >> self.shift) as usize
    }

    /// The table size once removals have left fewer than one position per 8 buckets: about one bucket per
    /// position (a quarter of the growth point, so it does not grow back at once), never below the initial
    /// size. `None` while the current size is still right.
    fn shrunk_bits(&self) -> Option<u32> {
        let bits = self.buckets.len().trailing_zeros();
        if bits <= Self::INITIAL_BITS || self.linked * 8 >= self.buckets.len() {
            return None;
        }
        Some(
            self.linked
                .next_power_of_two()
                .trailing_zeros()
                .max(Self::INITIAL_BITS),
        )
    }
}

/// Tokens appended per prefetch batch.
const PREFETCH_BATCH: usize = 16;

#[inline(always)]
fn prefetch_read<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults and changes no state the program can observe.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            value as *const T as *const i8,
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

fn gram_hash(gram: &[Token]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64 ^ gram.len() as u64;
    for &t in gram {
        h = (h.rotate_left(23) ^ u64::from(t)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    h ^ (h >> 29)
}

/// The suffix index of one source. Not synchronised: the drafter wraps it in a lock.
pub(crate) struct SuffixIndex {
    gram_lens: [usize; LEVELS],
    max_match: usize,
    slots: Vec<Option<Sequence>>,
    free_slots: Vec<u32>,
    slot_of: HashMap<u64, u32>,
    heads: [HeadTable; LEVELS],
    num_tokens: usize,
}

impl SuffixIndex {
    /// `1 <= min_match <= max_match` is checked by the drafter's configuration.
    pub fn new(min_match: usize, max_match: usize) -> Self {
        SuffixIndex {
            gram_lens: std::array::from_fn(|level| match level {
                0 => min_match,
                _ => UPPER_GRAMS[level - 1].max(min_match),
            }),
            max_match,
            slots: Vec::new(),
            free_slots: Vec::new(),
            slot_of: HashMap::new(),
            heads: std::array::from_fn(|_| HeadTable::new()),
            num_tokens: 0,
        }
    }

    /// Tokens stored over all sequences.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Whether sequence `id` is stored.
    pub fn contains(&self, id: u64) -> bool {
        self.slot_of.contains_key(&id)
    }

    /// The tokens of sequence `id`.
    pub fn tokens(&self, id: u64) -> Option<&[Token]> {
        self.slot_of
            .get(&id)
            .map(|&s| self.slot(s).tokens.as_slice())
    }

    /// The tokens of the sequence holding an occurrence.
    pub fn tokens_of(&self, occurrence: Occurrence) -> &[Token] {
        &self.slot(occurrence.slot).tokens
    }

    /// Bytes allocated by the index: token and link storage and both hash maps (their entries and control
    /// bytes), from capacities.
    pub fn memory_bytes(&self) -> usize {
        let link = std::mem::size_of::<Link>();
        let sequences: usize = self
            .slots
            .iter()
            .flatten()
            .map(|s| {
                s.tokens.capacity() * 4 + s.links.iter().map(|l| l.capacity() * link).sum::<usize>()
            })
            .sum();
        let heads: usize = self.heads.iter().map(|h| h.buckets.capacity() * 8).sum();
        let ids = super::hash_map_bytes::<u64, u32>(self.slot_of.capacity());
        sequences
            + heads
            + ids
            + self.slots.capacity() * std::mem::size_of::<Option<Sequence>>()
            + self.free_slots.capacity() * std::mem::size_of::<u32>()
    }

    fn slot(&self, slot: u32) -> &Sequence {
        self.slots[slot as usize].as_ref().expect("live slot")
    }

    fn link_mut(&mut self, level: usize, at: u64) -> &mut Link {
        let o = Occurrence::unpack(at);
        &mut self.slots[o.slot as usize]
            .as_mut()
            .expect("live slot")
            .links[level][o.end as usize]
    }

    /// Appends tokens to sequence `id`, creating it if new.
    pub fn extend(&mut self, id: u64, tokens: &[Token]) {
        let slot = match self.slot_of.get(&id) {
            Some(&slot) => slot,
            None => {
                let sequence = Sequence {
                    tokens: Vec::new(),
                    links: Default::default(),
                };
                let slot = match self.free_slots.pop() {
                    Some(slot) => {
                        self.slots[slot as usize] = Some(sequence);
                        slot
                    }
                    None => {
                        self.slots.push(Some(sequence));
                        (self.slots.len() - 1) as u32
                    }
                };
                self.slot_of.insert(id, slot);
                slot
            }
        };
        // In batches: first bring every bucket and old chain head the batch will touch towards the cache,
        // so that their misses overlap instead of following one another.
        for batch in tokens.chunks(PREFETCH_BATCH) {
            self.prefetch(slot, batch);
            for &token in batch {
                self.push(slot, token);
            }
        }
    }

    /// Prefetches the head-table buckets, then the old chain heads' links, that appending `batch` to the
    /// sequence in `slot` will write. Changes nothing; a stale guess only costs a wasted prefetch.
    fn prefetch(&self, slot: u32, batch: &[Token]) {
        let sequence = self.slot(slot);
        let history = &sequence.tokens[sequence
            .tokens
            .len()
            .saturating_sub(self.gram_lens[LEVELS - 1])..];
        let mut window = [0 as Token; 2 * PREFETCH_BATCH + ANCHOR];
        if history.len() + batch.len() > window.len() {
            return; // a long min_match: no prefetching, same results
        }
        window[..history.len()].copy_from_slice(history);
        window[history.len()..history.len() + batch.len()].copy_from_slice(batch);
        let first_end = sequence.tokens.len();
        let mut buckets = [[usize::MAX; PREFETCH_BATCH]; LEVELS];
        for ((level_buckets, &k), table) in buckets.iter_mut().zip(&self.gram_lens).zip(&self.heads)
        {
            for (i, slot_bucket) in level_buckets.iter_mut().take(batch.len()).enumerate() {
                // The gram ending at sequence position first_end + i, i.e. at window position history.len() + i.
                let (end, at) = (first_end + i, history.len() + i);
                if end >= k && at >= k {
                    let bucket = table.bucket(gram_hash(&window[at - k..at]));
                    prefetch_read(&table.buckets[bucket]);
                    *slot_bucket = bucket;
                }
            }
        }
        for (level, level_buckets) in buckets.iter().enumerate() {
            for &bucket in level_buckets
                .iter()
                .take(batch.len())
                .filter(|&&b| b != usize::MAX)
            {
                let head = self.heads[level].buckets[bucket];
                if head != NONE {
                    let o = Occurrence::unpack(head);
                    if let Some(Some(s)) = self.slots.get(o.slot as usize) {
                        if let Some(link) = s.links[level].get(o.end as usize) {
                            prefetch_read(link);
                        }
                    }
                }
            }
        }
    }

    fn push(&mut self, slot: u32, token: Token) {
        let sequence = self.slots[slot as usize].as_mut().expect("live slot");
        let end = sequence.tokens.len();
        sequence.tokens.push(token);
        for level in 0..LEVELS {
            sequence.links[level].push(UNLINKED);
        }
        self.num_tokens += 1;
        for level in 0..LEVELS {
            let k = self.gram_lens[level];
            if end < k {
                continue;
            }
            // The gram ending at `end` now has a continuation: link it in at the head of its chain.
            let sequence = self.slots[slot as usize].as_ref().expect("live slot");
            let hash = gram_hash(&sequence.tokens[end - k..end]);
            self.link_at_head(level, hash, Occurrence::at(slot, end));
            let table = &mut self.heads[level];
            table.linked += 1;
            if table.linked > HeadTable::MAX_LOAD * table.buckets.len() {
                let bits = table.buckets.len().trailing_zeros() + HeadTable::GROWTH_BITS;
                self.relink(level, bits);
            }
        }
    }

    /// Makes `here` the head of the chain of the bucket of `hash`.
    fn link_at_head(&mut self, level: usize, hash: u64, here: u64) {
        let table = &mut self.heads[level];
        let bucket = table.bucket(hash);
        let old_head = std::mem::replace(&mut table.buckets[bucket], here);
        *self.link_mut(level, here) = Link {
            next: old_head,
            prev: NONE,
        };
        if old_head != NONE {
            self.link_mut(level, old_head).prev = here;
        }
    }

    /// Gives a level's head table `1 << bits` buckets and relinks every position of that level into it.
    fn relink(&mut self, level: usize, bits: u32) {
        let table = &mut self.heads[level];
        table.buckets = vec![NONE; 1 << bits];
        table.shift = 64 - bits;
        let k = self.gram_lens[level];
        for slot in 0..self.slots.len() as u32 {
            let Some(sequence) = self.slots[slot as usize].as_ref() else {
                continue;
            };
            let hashes: Vec<u64> = (k..sequence.tokens.len())
                .map(|end| gram_hash(&sequence.tokens[end - k..end]))
                .collect();
            for (end, hash) in (k..).zip(hashes) {
                self.link_at_head(level, hash, Occurrence::at(slot, end));
            }
        }
    }

    /// Removes sequence `id` and returns how many tokens it held (0 if it was not stored).
    pub fn remove(&mut self, id: u64) -> usize {
        let Some(slot) = self.slot_of.remove(&id) else {
            return 0;
        };
        let len = self.slot(slot).tokens.len();
        for level in 0..LEVELS {
            let k = self.gram_lens[level];
            for end in k..len {
                let sequence = self.slot(slot);
                let Link { next, prev } = sequence.links[level][end];
                if prev == NONE {
                    let hash = gram_hash(&sequence.tokens[end - k..end]);
                    let table = &mut self.heads[level];
                    let bucket = table.bucket(hash);
                    table.buckets[bucket] = next;
                } else {
                    self.link_mut(level, prev).next = next;
                }
                if next != NONE {
                    self.link_mut(level, next).prev = prev;
                }
            }
            self.heads[level].linked -= len.saturating_sub(k);
        }
        self.slots[slot as usize] = None;
        self.free_slots.push(slot);
        self.num_tokens -= len;
        if self.slot_of.is_empty() {
            // Nothing stored: give back the slot tables too (a long-lived history that once held many rollouts).
            self.slots = Vec::new();
            self.free_slots = Vec::new();
            self.slot_of = HashMap::new();
        }
        for level in 0..LEVELS {
            if let Some(bits) = self.heads[level].shrunk_bits() {
                self.relink(level, bits);
            }
        }
        len
    }

    /// The longest match reported.
    pub fn max_match(&self) -> usize {
        self.max_match
    }

    /// The gram lengths of the chain levels, ascending: `min_match`, 3 and 6, each at least `min_match` (so
    /// levels may repeat).
    pub fn gram_lens(&self) -> [usize; LEVELS] {
        self.gram_lens
    }

    /// For each level in `levels`, walks at most `max_visits` entries of its chain for the context's last gram,
    /// most recently linked first, and puts in `found[level]` every occurrence that matches at least that
    /// level's gram length of the context's last tokens, with its match length (at most `max_match`). A visit is
    /// one chain entry, another gram sharing the bucket included, so the work is bounded however often a gram
    /// occurs. Returns, per level, whether its chain was walked to its end (then every occurrence of the gram
    /// was seen; `true` for a level not walked).
    ///
    /// The chains are walked in lockstep: each step's link address comes from the one before, so one chain is a
    /// sequence of dependent cache misses, but the chains of different levels are independent and their misses
    /// overlap.
    pub fn collect(
        &self,
        context: &[Token],
        levels: &[usize],
        max_visits: usize,
        found: &mut [Vec<Candidate>; LEVELS],
    ) -> [bool; LEVELS] {
        let mut at = [NONE; LEVELS];
        for &level in levels {
            let k = self.gram_lens[level];
            found[level].clear();
            if context.len() >= k {
                let table = &self.heads[level];
                at[level] = table.buckets[table.bucket(gram_hash(&context[context.len() - k..]))];
            }
        }
        // First the chains, prefetching each occurrence's last matched token so that those cache misses
        // overlap the walks; then the comparisons. (Prefetching whole spans, the match and the continuation,
        // was slower at 10^7 tokens: the extra lines queue ahead of the walks' dependent loads.)
        for _ in 0..max_visits {
            let mut walking = false;
            for &level in levels {
                if at[level] == NONE {
                    continue;
                }
                walking = true;
                let o = Occurrence::unpack(at[level]);
                let sequence = self.slot(o.slot);
                prefetch_read(&sequence.tokens[o.end as usize - 1]);
                at[level] = sequence.links[level][o.end as usize].next;
                found[level].push(Candidate {
                    occurrence: o,
                    match_len: 0,
                });
            }
            if !walking {
                break;
            }
        }
        let limit = self.max_match.min(context.len());
        for &level in levels {
            let k = self.gram_lens[level];
            found[level].retain_mut(|c| {
                let o = c.occurrence;
                c.match_len = self.slot(o.slot).tokens[..o.end as usize]
                    .iter()
                    .rev()
                    .zip(context.iter().rev())
                    .take(limit)
                    .take_while(|(a, b)| a == b)
                    .count();
                c.match_len >= k
            });
        }
        at.map(|a| a == NONE)
    }
}

/// An occurrence of a suffix of the context, and how many of the context's last tokens it matches.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    pub occurrence: Occurrence,
    pub match_len: usize,
}
