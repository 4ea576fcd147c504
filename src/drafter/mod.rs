//! A training-free drafter over rollout history: suffix matching against earlier and concurrent rollouts of
//! the same prompt, and against the request's own prompt and output.
//!
//! In RL the same prompts are rolled out again and again (GRPO samples several responses per prompt at once
//! and revisits prompts every epoch), and the rollouts of one prompt share long spans. Matching the end of a
//! request's context against them proposes drafts that need no training and follow the policy as it changes.
//! The drafts are point masses: verify them with the rejection sampler's no-q path (chain or tree), or with
//! greedy verification at temperature 0.
//!
//! # Sources and semantics
//!
//! * Each prompt has a **history**: the token sequences of its rollouts that started in the last
//!   `window_iterations` training iterations ([`Drafter::begin_iteration`]). Rollouts in flight are included as
//!   their tokens are appended, so the rollouts of one prompt generated together help each other.
//! * A rollout is stored as its prompt followed by its output, so each request also matches against **its own
//!   context** (its own rollout), and matches may run from the prompt into the output.
//! * **Matches**: every suffix of the request's context, of `min_match..=max_match` tokens, that occurs in the
//!   prompt's history followed by at least one token. Each occurrence of a suffix is a cursor.
//! * **Chain**: follow the most frequent continuation among the cursors (ties to the smallest token id), keep
//!   the cursors that agree, repeat. **Tree**: best-first by path probability (ties to the lower parent index,
//!   then the smaller token). A token's empirical probability is the share of cursors continuing with it; a
//!   node is drafted only while its path probability is at least `min_token_prob`. See [`Draft`].
//! * **Selection**: every matching suffix length is scored by its chain (the sum of the chain's path
//!   probabilities: the expected number of accepted tokens if the history's continuations were the target's),
//!   and the best score wins, ties to the longer match (suffix decoding's rule, arXiv 2411.04975, section 3.2).
//!   A chain proposal is the winning chain; a tree proposal is the tree from the winning suffix, so one tree is
//!   drafted per proposal (choosing trees by their own score instead accepted as many tokens per step on the
//!   real-text replay, at several times the latency). A shorter match can win: after a mismatch the long
//!   suffixes are often new, and a frequent short one predicts better than a rare long one.
//! * **Budget** (draft tokens for a chain, nodes for a tree) of a match of `m` tokens: `min(max_draft,
//!   floor(m * match_factor + match_offset))`, further capped by the request's length class if
//!   [`LengthClasses`] are configured.
//! * **Bounded work**: a proposal visits no more than `max_occurrences` entries of each chain it walks (those of
//!   the context's last `min_match` tokens, its last 3 and its last 6), in chain order (the most recently
//!   stored first, until a table resize relinks them), however often a gram occurs. A chain holds the gram's
//!   occurrences and, rarely, those of other grams sharing its hash bucket. While every chain walked is that
//!   short, a proposal is exact: equal to a scan of the whole history (`tests/drafter.rs`).
//!
//! # Memory
//!
//! Rollout tokens count against a per-prompt and an overall token budget. A rollout that would exceed a budget
//! first evicts the oldest rollouts, of that prompt or of any prompt respectively, so the stored tokens never
//! exceed either budget (prompt tokens count too, once per rollout). A rollout that is itself evicted stops
//! growing in the history; its request then drafts from the other rollouts. A rollout that could not fit even
//! alone stops growing without evicting anything. Either way it never grows again, so every stored rollout is a
//! prefix of a real one.
//!
//! A prompt costs nothing once it has no rollout stored and no request registered: its history (index, length
//! average and all) is released, and a later request of that prompt starts a new one. A rollout still empty when
//! its request finishes leaves then, so every stored rollout of a finished request holds a token and the budgets
//! bound their number too. Beyond the stored tokens (about 70 to 90 bytes each), the drafter holds about a kilobyte
//! per prompt with a history and a few hundred bytes per stored rollout and per registered request, plus each
//! request's own context. [`Drafter::stats`] reports every byte
//! the drafter holds, computed from the capacities of its containers (`tests/drafter_memory.rs` compares it
//! with what the allocator hands out).
//!
//! # Threads
//!
//! A [`Drafter`] is `Sync`. Requests of different prompts append and draft in parallel; requests of one
//! prompt share its history behind a reader-writer lock. Every call takes its locks in one documented order (see
//! [`Drafter`]), so no mix of calls on any number of threads can deadlock (tested with 8 threads mixing every
//! call), and [`Drafter::stats`] is a consistent snapshot: its tokens never exceed the budgets.

mod index;
mod propose;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};
use index::SuffixIndex;
pub use index::Token;
pub use propose::Draft;

/// Request length classes after DAS: a request's predicted length (the moving average of its prompt's past
/// rollout lengths, or its current length once that is larger) picks its draft budget.
#[derive(Debug, Clone, PartialEq)]
pub struct LengthClasses {
    /// Predicted lengths of at least this many tokens are Long.
    pub long_threshold: usize,
    /// Predicted lengths of at least this many tokens (and below `long_threshold`) are Medium.
    pub medium_threshold: usize,
    /// Draft budget of a Long request.
    pub long_budget: usize,
    /// Draft budget of a Medium request.
    pub medium_budget: usize,
    /// Draft budget of a Short request.
    pub short_budget: usize,
    /// Weight of the newest rollout length in the prompt's moving average, in (0, 1]. The average is kept as
    /// long as the prompt has a history (see the module documentation, Memory).
    pub smoothing: f64,
}

impl Default for LengthClasses {
    /// Budgets 24 / 8 / 0 at thresholds 1024 / 256 tokens (the values of an independent DAS reimplementation).
    fn default() -> Self {
        LengthClasses {
            long_threshold: 1024,
            medium_threshold: 256,
            long_budget: 24,
            medium_budget: 8,
            short_budget: 0,
            smoothing: 0.5,
        }
    }
}

/// The drafter's settings. [`DrafterConfig::default`] gives usable values (each field's default below).
#[derive(Debug, Clone, PartialEq)]
pub struct DrafterConfig {
    /// The shortest context suffix worth matching (default 1).
    pub min_match: usize,
    /// The longest context suffix matched, the depth cap (default 32, at most 1024).
    pub max_match: usize,
    /// The most draft tokens (chain) or nodes (tree) ever proposed (default 24, at most
    /// [`DrafterConfig::MAX_DRAFT`] = 63).
    pub max_draft: usize,
    /// Budget from the match length: `floor(match_len * match_factor + match_offset)` (default 1.0).
    pub match_factor: f64,
    /// See `match_factor` (default 0.0).
    pub match_offset: f64,
    /// Nodes whose path probability falls below this are not drafted (default 0.1).
    pub min_token_prob: f64,
    /// The most chain entries a proposal visits per gram length, at least 1 (default 16): it walks at most this
    /// many entries of the chains of the context's last `min_match`, 3 and 6 tokens, so no proposal's work
    /// grows with the history. A chain holds its gram's occurrences, the most recently linked first, and
    /// (rarely, as the head tables keep no keys) those of other grams sharing its hash bucket. Proposals are
    /// exact (equal to a scan of the whole history) while every chain walked has at most this many entries;
    /// beyond that they use the entries linked most recently.
    pub max_occurrences: usize,
    /// Rollouts started this many iterations ago or more are dropped by [`Drafter::begin_iteration`] (default 4).
    pub window_iterations: u64,
    /// Most rollout tokens stored for one prompt (default 2^20, at most 2^32 - 1).
    pub prompt_token_budget: usize,
    /// Most rollout tokens stored overall (default 64 * 2^20: about 5.5 GB at about 80 bytes per token).
    pub total_token_budget: usize,
    /// Length-class budgets, if any (default none).
    pub length_classes: Option<LengthClasses>,
}

impl Default for DrafterConfig {
    fn default() -> Self {
        DrafterConfig {
            min_match: 1,
            max_match: 32,
            max_draft: 24,
            match_factor: 1.0,
            match_offset: 0.0,
            min_token_prob: 0.1,
            max_occurrences: 16,
            window_iterations: 4,
            prompt_token_budget: 1 << 20,
            total_token_budget: 64 << 20,
            length_classes: None,
        }
    }
}

impl DrafterConfig {
    /// The largest `max_draft` accepted: the most drafts one verification takes ([`crate::tree::MAX_DRAFTS`]),
    /// so that every proposal is verified in one call; also a bound on a proposal's work and memory.
    pub const MAX_DRAFT: usize = crate::tree::MAX_DRAFTS;

    fn validate(&self) -> Result<()> {
        if self.min_match == 0 || self.min_match > self.max_match {
            return Err(Error::invalid(
                "min_match",
                format!(
                    "is {}; needs 1 <= min_match <= max_match ({})",
                    self.min_match, self.max_match
                ),
            ));
        }
        if self.max_match > 1024 {
            return Err(Error::invalid(
                "max_match",
                format!("is {}, above 1024", self.max_match),
            ));
        }
        if self.max_draft == 0 {
            return Err(Error::invalid(
                "max_draft",
                "is 0; a drafter that may never draft is a mistake",
            ));
        }
        if self.max_draft > Self::MAX_DRAFT {
            return Err(Error::invalid(
                "max_draft",
                format!(
                    "is {}, above {} (the most drafts one verification tree holds)",
                    self.max_draft,
                    Self::MAX_DRAFT
                ),
            ));
        }
        if !(self.match_factor.is_finite() && self.match_factor >= 0.0) {
            return Err(Error::invalid(
                "match_factor",
                format!("is {}; it must be finite and >= 0", self.match_factor),
            ));
        }
        if !self.match_offset.is_finite() {
            return Err(Error::invalid(
                "match_offset",
                format!("is {}; it must be finite", self.match_offset),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_token_prob) {
            return Err(Error::invalid(
                "min_token_prob",
                format!("is {}, outside [0, 1]", self.min_token_prob),
            ));
        }
        if self.max_occurrences == 0 {
            return Err(Error::invalid(
                "max_occurrences",
                "is 0; a proposal must look at one occurrence at least",
            ));
        }
        if self.window_iterations == 0 {
            return Err(Error::invalid(
                "window_iterations",
                "is 0; the window must hold the current iteration",
            ));
        }
        for (name, budget) in [
            ("prompt_token_budget", self.prompt_token_budget),
            ("total_token_budget", self.total_token_budget),
        ] {
            if budget == 0 {
                return Err(Error::invalid(
                    name,
                    "is 0; a budget must be at least 1 token",
                ));
            }
        }
        if self.prompt_token_budget > u32::MAX as usize {
            // The index addresses a rollout's tokens with 32 bits; a prompt's budget bounds its rollouts.
            return Err(Error::invalid(
                "prompt_token_budget",
                format!("is {}, above 2^32 - 1", self.prompt_token_budget),
            ));
        }
        if let Some(c) = &self.length_classes {
            if c.medium_threshold > c.long_threshold {
                return Err(Error::invalid(
                    "length_classes",
                    "medium_threshold is above long_threshold",
                ));
            }
            if !(c.smoothing > 0.0 && c.smoothing <= 1.0) {
                return Err(Error::invalid(
                    "length_classes.smoothing",
                    format!("is {}, outside (0, 1]", c.smoothing),
                ));
            }
        }
        Ok(())
    }
}

/// Chain or tree drafts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraftKind {
    /// Follow the most frequent continuation.
    Chain,
    /// Best-first over continuations.
    Tree,
}

/// What [`Drafter::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrafterStats {
    /// Prompts with a history.
    pub prompts: usize,
    /// Rollouts stored.
    pub rollouts: usize,
    /// Rollout tokens stored (what the budgets count).
    pub tokens: usize,
    /// Bytes the drafter holds: the histories, the registered requests (their contexts included) and the
    /// bookkeeping, from the capacities of their containers.
    pub bytes: usize,
    /// `bytes / tokens` (0 when no token is stored).
    pub bytes_per_token: f64,
    /// Requests registered and not finished.
    pub active_requests: usize,
}

struct PromptHistory {
    index: SuffixIndex,
    /// Rollouts stored, oldest first.
    rollouts: VecDeque<u64>,
    /// Moving average of finished rollout lengths.
    length_average: Option<f64>,
}

struct RequestState {
    prompt: u64,
    history: Arc<RwLock<PromptHistory>>,
    rollout: u64,
    /// The request's prompt and output so far (also its rollout in the history, unless that was evicted).
    context: Vec<Token>,
    prompt_len: usize,
    /// Set by `finish_request` under this state's lock: a call that looked the request up before it was
    /// finished, and locked the state after, sees it and fails as if the request were not registered.
    finished: bool,
    /// Whether its rollout still grows in the history: false once an append could not be stored.
    growing: bool,
}

/// A prompt's entry in the prompts map.
struct PromptEntry {
    history: Arc<RwLock<PromptHistory>>,
    /// Requests of this prompt registered and not finished. The history is released when this is 0 and it
    /// holds no rollout; both are only changed or read for that with the prompts map locked for writing.
    active_requests: usize,
}

struct Accounting {
    iteration: u64,
    tokens: usize,
    /// Every rollout stored, by id (ids grow with time, so the first is the oldest): its prompt and the
    /// iteration it started in. Exactly the rollouts stored: each eviction removes its entry.
    rollouts: BTreeMap<u64, (u64, u64)>,
}

/// The drafter: histories per prompt, and the requests drafting from them. See the module documentation.
///
/// # One decoding loop: propose, verify, append
///
/// A request drafts from its prompt's history, the drafts become a verification tree under the context's last
/// token ([`crate::tree`]), the rejection sampler verifies them against the target's rows (here a toy target
/// that always prefers the token after `t` to be `(t + 1) % 8`), and what was verified goes back to the drafter:
///
/// ```
/// use specdec::drafter::{DraftKind, Drafter, DrafterConfig};
/// use specdec::sampling::{Drafts, Rows, SamplingParams, VerifyInputs, VerifyOutputs};
/// use specdec::tree::{PackedTrees, VerifyTree};
///
/// let drafter = Drafter::new(DrafterConfig::default())?;
/// // An earlier rollout of prompt 7, then request 1 of the same prompt.
/// drafter.add_request(100, 7, &[0, 1, 2])?;
/// drafter.append(100, &(3..40).map(|t| t % 8).collect::<Vec<u32>>())?;
/// drafter.finish_request(100)?;
/// drafter.add_request(1, 7, &[0, 1, 2])?;
///
/// let mut context: Vec<u32> = vec![0, 1, 2];
/// for step in 0..5u64 {
///     let draft = drafter.propose(1, DraftKind::Tree)?;
///     let tree = VerifyTree::from_draft(*context.last().unwrap() as i32, &draft)?;
///     let packed = PackedTrees::new([&tree]);
///     // The target's logits after each node (a real engine runs tree attention and the model here).
///     let logits: Vec<f32> = tree
///         .tokens()
///         .iter()
///         .flat_map(|&t| (0..8).map(move |x| if x == (t + 1) % 8 { 9.0 } else { 0.0 }))
///         .collect();
///     let (mut accepted, mut emitted) = ([0], vec![0; packed.emit_width]);
///     specdec::cpu::rejection_verify(
///         &VerifyInputs {
///             vocab_size: 8,
///             drafts: Drafts::Tree {
///                 node_offsets: packed.offsets.as_slice().into(),
///                 node_tokens: packed.tokens.as_slice().into(),
///                 parents: packed.parents.as_slice().into(),
///             },
///             target: Rows::LogitsF32(logits.as_slice().into()),
///             draft: None, // suffix drafts are point masses
///             params: Some(SamplingParams {
///                 temperature: [1.0][..].into(),
///                 top_k: None,
///                 top_p: None,
///             }),
///             draft_params: None,
///             seeds: [specdec::sampling::noise::sample_seed(2024, 1)][..].into(),
///             steps: [step][..].into(),
///         },
///         VerifyOutputs {
///             emit_width: packed.emit_width,
///             accepted_counts: accepted.as_mut_slice().into(),
///             emitted_tokens: emitted.as_mut_slice().into(),
///             accepted_nodes: None,
///             accept_flags: None,
///             request_status: None,
///         },
///     )?;
///     // The accepted drafts, then the correction or bonus token.
///     let verified: Vec<u32> = emitted[..=accepted[0] as usize].iter().map(|&t| t as u32).collect();
///     drafter.append(1, &verified)?;
///     context.extend(&verified);
/// }
/// // The drafts follow the history, which follows the target: most steps verify several tokens.
/// assert!(context.len() > 3 + 10, "{context:?}");
/// # Ok::<(), specdec::Error>(())
/// ```
///
/// Lock order. A thread takes locks only in this order:
///
/// 1. `requests` (the map);
/// 2. a request's `RequestState` (one at a time);
/// 3. `accounting`;
/// 4. prompt histories: one, or a second only while holding `accounting` (eviction across prompts, in
///    `store`), so no two threads ever wait on each other's histories;
/// 5. `prompts` (the map): a leaf, held only to look up, insert or release an entry, never while waiting on
///    another lock.
///
/// Every snapshot of the statistics holds `requests` and `accounting`, so no call that changes the histories
/// runs during it.
pub struct Drafter {
    config: DrafterConfig,
    /// Lock 5 (a leaf).
    prompts: RwLock<HashMap<u64, PromptEntry>>,
    /// Lock 1; each request's state is lock 2.
    requests: RwLock<HashMap<u64, Arc<Mutex<RequestState>>>>,
    /// Lock 3.
    accounting: Mutex<Accounting>,
    next_rollout: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

impl Drafter {
    /// A drafter with `config`, checked.
    pub fn new(config: DrafterConfig) -> Result<Self> {
        config.validate()?;
        Ok(Drafter {
            config,
            prompts: RwLock::default(),
            requests: RwLock::default(),
            accounting: Mutex::new(Accounting {
                iteration: 0,
                tokens: 0,
                rollouts: BTreeMap::new(),
            }),
            next_rollout: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DrafterConfig {
        &self.config
    }

    /// Starts training iteration `iteration` (non-decreasing): rollouts that started `window_iterations` or more
    /// iterations before it leave the history. Costs O(log n) per rollout leaving, nothing per prompt.
    pub fn begin_iteration(&self, iteration: u64) -> Result<()> {
        let mut accounting = lock(&self.accounting);
        if iteration < accounting.iteration {
            return Err(Error::invalid(
                "iteration",
                format!(
                    "is {iteration}, before the current {}",
                    accounting.iteration
                ),
            ));
        }
        accounting.iteration = iteration;
        let oldest_kept = iteration.saturating_sub(self.config.window_iterations - 1);
        // Ids grow with time and so do iterations: the rollouts leaving are the first entries.
        while let Some(entry) = accounting.rollouts.first_entry() {
            let (prompt, started) = *entry.get();
            if started >= oldest_kept {
                break;
            }
            let rollout = *entry.key();
            entry.remove();
            if let Some(history) = self.prompt_history(prompt) {
                let mut history = write(&history);
                remove_oldest(&mut history.rollouts, rollout);
                accounting.tokens -= history.index.remove(rollout);
                self.release_if_unused(prompt, &history, false);
            }
        }
        Ok(())
    }

    /// Registers request `request` of prompt `prompt` with its prompt tokens; its rollout (the prompt, then the
    /// output as it is appended) starts in the current iteration. Fails if `request` is already registered.
    pub fn add_request(&self, request: u64, prompt: u64, prompt_tokens: &[Token]) -> Result<()> {
        let mut requests = write(&self.requests);
        if requests.contains_key(&request) {
            return Err(Error::invalid(
                "request",
                format!("{request} is already registered"),
            ));
        }
        let rollout = self.next_rollout.fetch_add(1, Ordering::Relaxed);
        let history = {
            // Counted as active before the map is released, so the history cannot be released under us.
            let mut prompts = write(&self.prompts);
            let entry = prompts.entry(prompt).or_insert_with(|| PromptEntry {
                history: Arc::new(RwLock::new(PromptHistory {
                    index: SuffixIndex::new(self.config.min_match, self.config.max_match),
                    rollouts: VecDeque::new(),
                    length_average: None,
                })),
                active_requests: 0,
            });
            entry.active_requests += 1;
            entry.history.clone()
        };
        let stored = {
            let mut accounting = lock(&self.accounting);
            let mut h = write(&history);
            h.index.extend(rollout, &[]);
            h.rollouts.push_back(rollout);
            let iteration = accounting.iteration;
            accounting.rollouts.insert(rollout, (prompt, iteration));
            self.store(&mut accounting, prompt, &mut h, rollout, prompt_tokens)
        };
        let state = RequestState {
            prompt,
            history,
            rollout,
            context: prompt_tokens.to_vec(),
            prompt_len: prompt_tokens.len(),
            finished: false,
            growing: stored,
        };
        requests.insert(request, Arc::new(Mutex::new(state)));
        Ok(())
    }

    fn request(&self, request: u64) -> Result<Arc<Mutex<RequestState>>> {
        read(&self.requests)
            .get(&request)
            .cloned()
            .ok_or_else(|| not_registered(request))
    }

    /// Appends verified tokens to a request's output: to its context and to its rollout in the history.
    pub fn append(&self, request: u64, tokens: &[Token]) -> Result<()> {
        let state = self.request(request)?;
        let mut state = lock(&state);
        if state.finished {
            return Err(not_registered(request));
        }
        state.context.extend_from_slice(tokens);
        if state.growing {
            let mut accounting = lock(&self.accounting);
            let history = state.history.clone();
            let mut history = write(&history);
            state.growing = self.store(
                &mut accounting,
                state.prompt,
                &mut history,
                state.rollout,
                tokens,
            );
        }
        Ok(())
    }

    /// Adds `tokens` to `rollout` of `prompt` (whose history the caller holds), first evicting the oldest
    /// rollouts until both budgets have room, and says whether it stored them. If the rollout is gone (evicted
    /// now or before), or it could not fit with the tokens even alone (then nothing is evicted), nothing is
    /// stored, and the caller stops the rollout growing for good: a later append stored after a missing one
    /// would make the history hold a sequence that never occurred.
    fn store(
        &self,
        accounting: &mut Accounting,
        prompt: u64,
        history: &mut PromptHistory,
        rollout: u64,
        tokens: &[Token],
    ) -> bool {
        let extra = tokens.len();
        let Some(own) = history.index.tokens(rollout).map(<[Token]>::len) else {
            return false; // evicted before: it no longer grows
        };
        if own + extra
            > self
                .config
                .prompt_token_budget
                .min(self.config.total_token_budget)
        {
            // It could not fit even alone: evicting the others would make no room, so they stay.
            return false;
        }
        while history.index.num_tokens() + extra > self.config.prompt_token_budget
            && history.index.contains(rollout)
        {
            let Some(oldest) = history.rollouts.pop_front() else {
                break;
            };
            accounting.rollouts.remove(&oldest);
            accounting.tokens -= history.index.remove(oldest);
        }
        while accounting.tokens + extra > self.config.total_token_budget
            && history.index.contains(rollout)
        {
            let Some((victim, (victim_prompt, _))) = accounting.rollouts.pop_first() else {
                break;
            };
            if victim_prompt == prompt {
                remove_oldest(&mut history.rollouts, victim);
                accounting.tokens -= history.index.remove(victim);
            } else if let Some(other) = self.prompt_history(victim_prompt) {
                // A second history, taken only while holding `accounting` (lock order, rule 4).
                let mut other = write(&other);
                remove_oldest(&mut other.rollouts, victim);
                accounting.tokens -= other.index.remove(victim);
                self.release_if_unused(victim_prompt, &other, false);
            }
        }
        let fits = history.index.num_tokens() + extra <= self.config.prompt_token_budget
            && accounting.tokens + extra <= self.config.total_token_budget;
        let stored = history.index.contains(rollout) && fits;
        if stored {
            accounting.tokens += extra;
            history.index.extend(rollout, tokens);
        }
        stored
    }

    /// Releases the history of `prompt` (held by the caller, who just removed a rollout from it, or is finishing
    /// a request of it: `finishing`) if it stores no rollout and no request of the prompt is registered.
    fn release_if_unused(&self, prompt: u64, history: &PromptHistory, finishing: bool) {
        if history.rollouts.is_empty() || finishing {
            let mut prompts = write(&self.prompts);
            let Some(entry) = prompts.get_mut(&prompt) else {
                return;
            };
            if finishing {
                entry.active_requests -= 1;
            }
            if entry.active_requests == 0 && history.rollouts.is_empty() {
                prompts.remove(&prompt);
                shrink_sparse_map(&mut prompts);
            }
        }
    }

    /// Ends a request: its rollout stays in the history (until the window or a budget drops it), and its
    /// length feeds the prompt's moving average for length classes.
    pub fn finish_request(&self, request: u64) -> Result<()> {
        let state = {
            let mut requests = write(&self.requests);
            let state = requests
                .remove(&request)
                .ok_or_else(|| not_registered(request))?;
            shrink_sparse_map(&mut requests);
            state
        };
        let mut state = lock(&state);
        state.finished = true;
        let mut accounting = lock(&self.accounting);
        let mut history = write(&state.history);
        // A rollout that never held a token matches nothing: it leaves now, so that the budgets, which count
        // tokens, bound how many rollouts stay.
        if history
            .index
            .tokens(state.rollout)
            .is_some_and(<[Token]>::is_empty)
        {
            history.index.remove(state.rollout);
            accounting.rollouts.remove(&state.rollout);
            history.rollouts.retain(|&r| r != state.rollout);
        }
        drop(accounting);
        let length = (state.context.len() - state.prompt_len) as f64;
        let smoothing = self
            .config
            .length_classes
            .as_ref()
            .map_or(0.5, |c| c.smoothing);
        history.length_average = Some(match history.length_average {
            Some(average) => smoothing * length + (1.0 - smoothing) * average,
            None => length,
        });
        self.release_if_unused(state.prompt, &history, true);
        Ok(())
    }

    /// The draft budget of a request whose match is `match_len` tokens long.
    fn budget(&self, match_len: usize, generated: usize, predicted: Option<f64>) -> usize {
        let from_match = (match_len as f64 * self.config.match_factor + self.config.match_offset)
            .floor()
            .max(0.0) as usize;
        let mut budget = self.config.max_draft.min(from_match);
        if let Some(classes) = &self.config.length_classes {
            let length = predicted.unwrap_or(0.0).max(generated as f64);
            let class_budget = if length >= classes.long_threshold as f64 {
                classes.long_budget
            } else if length >= classes.medium_threshold as f64 {
                classes.medium_budget
            } else {
                classes.short_budget
            };
            budget = budget.min(class_budget);
        }
        budget
    }

    /// Proposes a draft for `request`, continuing its context (prompt and output so far): the chain, or the tree,
    /// of the matching suffix whose chain scores best (see the module documentation), with its match length,
    /// score and the number of occurrences it was built from. An empty draft means nothing matched (`match_len` 0), the budget is 0,
    /// or no continuation reached `min_token_prob`.
    pub fn propose(&self, request: u64, kind: DraftKind) -> Result<Draft> {
        let state = self.request(request)?;
        let state = lock(&state);
        if state.finished {
            return Err(not_registered(request));
        }
        let history = read(&state.history);
        let generated = state.context.len() - state.prompt_len;
        let budget = |match_len| self.budget(match_len, generated, history.length_average);
        Ok(propose::best_draft(
            &history.index,
            &state.context,
            &propose::Settings {
                kind,
                max_occurrences: self.config.max_occurrences,
                min_token_prob: self.config.min_token_prob,
                budget: &budget,
            },
        ))
    }

    /// The history of `prompt`, if any, with the prompts map released again (it is a leaf of the lock order).
    fn prompt_history(&self, prompt: u64) -> Option<Arc<RwLock<PromptHistory>>> {
        read(&self.prompts).get(&prompt).map(|e| e.history.clone())
    }

    /// The rollouts stored for `prompt`, oldest first (empty if none): what drafts are matched against.
    pub fn history(&self, prompt: u64) -> Vec<Vec<Token>> {
        let Some(history) = self.prompt_history(prompt) else {
            return Vec::new();
        };
        let history = read(&history);
        history
            .rollouts
            .iter()
            .filter_map(|&rollout| history.index.tokens(rollout).map(<[Token]>::to_vec))
            .collect()
    }

    /// Sizes of the histories and the bytes the drafter holds: a consistent snapshot of the histories (no request
    /// is added and no history changes while it is taken), so its tokens never exceed the budgets. The bytes of
    /// the requests' own contexts are read just before, request by request.
    pub fn stats(&self) -> DrafterStats {
        // Lock order: requests, each request's state (one at a time), accounting, the prompts map (released),
        // then each history.
        let requests = read(&self.requests);
        let request_bytes: usize = requests
            .values()
            .map(|state| {
                ARC_COUNTS
                    + std::mem::size_of::<Mutex<RequestState>>()
                    + lock(state).context.capacity() * std::mem::size_of::<Token>()
            })
            .sum();
        let accounting = lock(&self.accounting);
        let (histories, prompts_map_bytes) = {
            let prompts = read(&self.prompts);
            let histories: Vec<_> = prompts.values().map(|e| e.history.clone()).collect();
            (
                histories,
                hash_map_bytes::<u64, PromptEntry>(prompts.capacity()),
            )
        };
        let (mut rollouts, mut tokens, mut history_bytes) = (0, 0, 0);
        for history in &histories {
            let history = read(history);
            rollouts += history.rollouts.len();
            tokens += history.index.num_tokens();
            history_bytes += ARC_COUNTS
                + std::mem::size_of::<RwLock<PromptHistory>>()
                + history.index.memory_bytes()
                + history.rollouts.capacity() * std::mem::size_of::<u64>();
        }
        let bytes = history_bytes
            + prompts_map_bytes
            + request_bytes
            + hash_map_bytes::<u64, Arc<Mutex<RequestState>>>(requests.capacity())
            + btree_map_bytes::<u64, (u64, u64)>(accounting.rollouts.len());
        DrafterStats {
            prompts: histories.len(),
            rollouts,
            tokens,
            bytes,
            bytes_per_token: if tokens == 0 {
                0.0
            } else {
                bytes as f64 / tokens as f64
            },
            active_requests: requests.len(),
        }
    }
}

/// Takes `rollout` off the front of a prompt's rollouts, where the globally oldest rollout always is (ids grow with
/// time, and every removal takes the oldest of its prompt): O(1), where a search would make evicting n rollouts
/// of one prompt O(n^2).
fn not_registered(request: u64) -> Error {
    Error::invalid("request", format!("{request} is not registered"))
}

fn remove_oldest(rollouts: &mut VecDeque<u64>, rollout: u64) {
    let front = rollouts.pop_front();
    debug_assert_eq!(front, Some(rollout), "the oldest rollout is at the front");
}

/// The two reference counts in front of every `Arc` allocation.
const ARC_COUNTS: usize = 2 * std::mem::size_of::<usize>();

/// Bytes a `HashMap<K, V>` of this capacity allocates: a power-of-two number of buckets, at most 7/8 of them
/// usable (all but one below 8), each holding a `(K, V)` and a control byte, plus one group of control bytes.
pub(crate) fn hash_map_bytes<K, V>(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        capacity + 1
    } else {
        capacity * 8 / 7
    }
    .next_power_of_two();
    const GROUP: usize = 16;
    (buckets * std::mem::size_of::<(K, V)>()).next_multiple_of(GROUP) + buckets + GROUP
}

/// Bytes a `BTreeMap<K, V>` of `len` entries allocates, about: nodes of 11 entries, a parent link and two
/// lengths, filled to about half (what inserting in increasing order and removing the first entries leave),
/// with an internal node, 12 edges more, per six leaves.
fn btree_map_bytes<K, V>(len: usize) -> usize {
    const CAPACITY: usize = 11;
    let leaf = std::mem::size_of::<usize>()
        + 4
        + CAPACITY * (std::mem::size_of::<K>() + std::mem::size_of::<V>());
    let internal = leaf + (CAPACITY + 1) * std::mem::size_of::<usize>();
    let leaves = len.div_ceil(6);
    leaves * leaf + leaves.div_ceil(6) * internal
}

/// Gives a map that has shrunk to under a quarter of its capacity half its capacity back (amortised O(1)).
fn shrink_sparse_map<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}
