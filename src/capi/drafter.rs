//! The suffix drafter over rollout history (`specdec::drafter`).

use super::*;

/// Settings of a suffix drafter. Fill with `specdec_drafter_config_default`, then change fields. Sizes are
/// `int64_t` and must be positive; see the Rust documentation of `specdec::drafter::DrafterConfig`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct specdec_drafter_config {
    /// The shortest context suffix worth matching (at least 1).
    pub min_match: i64,
    /// The longest context suffix matched (the depth cap).
    pub max_match: i64,
    /// The most draft tokens (chain) or nodes (tree) proposed, 1..=SPECDEC_MAX_DRAFTS (63).
    pub max_draft: i64,
    /// Budget from the match length: floor(match_len * match_factor + match_offset).
    pub match_factor: f64,
    /// See match_factor.
    pub match_offset: f64,
    /// Nodes whose path probability falls below this are not drafted.
    pub min_token_prob: f64,
    /// Rollouts started this many iterations ago or more leave the history at specdec_drafter_begin_iteration.
    pub window_iterations: i64,
    /// Most tokens stored for one prompt.
    pub prompt_token_budget: i64,
    /// Most tokens stored overall.
    pub total_token_budget: i64,
    /// 1: cap budgets by length class (the fields below); 0: no length classes.
    pub use_length_classes: i32,
    /// Predicted lengths of at least this many tokens are Long.
    pub long_threshold: i64,
    /// Predicted lengths of at least this many tokens (below long_threshold) are Medium.
    pub medium_threshold: i64,
    /// Draft budget of a Long request.
    pub long_budget: i64,
    /// Draft budget of a Medium request.
    pub medium_budget: i64,
    /// Draft budget of a Short request.
    pub short_budget: i64,
    /// Weight of the newest rollout length in a prompt's moving average, in (0, 1].
    pub length_smoothing: f64,
    /// The most chain entries a proposal visits per gram length, at least 1 (default 16): bounds every
    /// proposal's work. Proposals are exact while no chain walked is longer.
    pub max_occurrences: i64,
}

/// Sizes of a drafter's histories, from `specdec_drafter_get_stats`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct specdec_drafter_stats {
    /// Prompts with a history.
    pub prompts: i64,
    /// Rollouts stored.
    pub rollouts: i64,
    /// Tokens stored (what the budgets count).
    pub tokens: i64,
    /// Bytes the drafter holds: histories, registered requests (their contexts included) and bookkeeping.
    pub bytes: i64,
    /// bytes / tokens (0 when empty).
    pub bytes_per_token: f64,
    /// Requests registered and not finished.
    pub active_requests: i64,
}

/// An opaque suffix drafter over rollout history (see `specdec::drafter`). Usable from several threads at once.
pub struct specdec_drafter {
    drafter: Drafter,
}

/// A drafter configuration error with the argument named as `specdec_drafter_config` names it (the Rust
/// configuration nests the length classes; the C struct is flat).
fn c_config_field_names(e: Error) -> Error {
    match e {
        Error::InvalidArgument { argument, reason } => {
            let argument = match argument.as_str() {
                "length_classes.smoothing" => "length_smoothing".to_string(),
                "length_classes" => "medium_threshold".to_string(),
                _ => argument,
            };
            Error::InvalidArgument { argument, reason }
        }
        other => other,
    }
}

fn config_from_c(c: &specdec_drafter_config) -> Result<DrafterConfig> {
    let length_classes = match c.use_length_classes {
        0 => None,
        1 => Some(LengthClasses {
            long_threshold: size_arg("long_threshold", c.long_threshold)?,
            medium_threshold: size_arg("medium_threshold", c.medium_threshold)?,
            long_budget: size_arg("long_budget", c.long_budget)?,
            medium_budget: size_arg("medium_budget", c.medium_budget)?,
            short_budget: size_arg("short_budget", c.short_budget)?,
            smoothing: c.length_smoothing,
        }),
        other => {
            return Err(Error::invalid(
                "use_length_classes",
                format!("is {other}, not 0 or 1"),
            ))
        }
    };
    Ok(DrafterConfig {
        min_match: size_arg("min_match", c.min_match)?,
        max_match: size_arg("max_match", c.max_match)?,
        max_draft: size_arg("max_draft", c.max_draft)?,
        match_factor: c.match_factor,
        match_offset: c.match_offset,
        min_token_prob: c.min_token_prob,
        window_iterations: u64::try_from(c.window_iterations)
            .map_err(|_| Error::invalid("window_iterations", "cannot be negative"))?,
        prompt_token_budget: size_arg("prompt_token_budget", c.prompt_token_budget)?,
        total_token_budget: size_arg("total_token_budget", c.total_token_budget)?,
        max_occurrences: size_arg("max_occurrences", c.max_occurrences)?,
        length_classes,
    })
}

/// A host array of tokens: non-negative int32 ids.
///
/// # Safety
/// As [`host_slice`].
unsafe fn tokens_arg(argument: &str, ptr: *const i32, len: i64) -> Result<Vec<Token>> {
    let tokens = host_slice(argument, ptr, size_arg(argument, len)?)?;
    tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            u32::try_from(t).map_err(|_| {
                Error::invalid(
                    format!("{argument}[{i}]"),
                    format!("is {t}; token ids are >= 0"),
                )
            })
        })
        .collect()
}

fn drafter_arg<'a>(drafter: *const specdec_drafter) -> Result<&'a Drafter> {
    // SAFETY: live_handle only returns a pointer the registry holds as a live drafter.
    Ok(unsafe { &(*live_handle("drafter", drafter, HandleKind::Drafter)?).drafter })
}

/// Writes the default drafter settings into `*out`.
///
/// # Safety
/// `out` must be null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_config_default(
    out: *mut specdec_drafter_config,
) -> specdec_status {
    boundary(|| {
        let out = non_null("out", out)?;
        let d = DrafterConfig::default();
        let c = LengthClasses::default();
        *out = specdec_drafter_config {
            min_match: d.min_match as i64,
            max_match: d.max_match as i64,
            max_draft: d.max_draft as i64,
            match_factor: d.match_factor,
            match_offset: d.match_offset,
            min_token_prob: d.min_token_prob,
            window_iterations: d.window_iterations as i64,
            prompt_token_budget: d.prompt_token_budget as i64,
            total_token_budget: d.total_token_budget as i64,
            use_length_classes: 0,
            long_threshold: c.long_threshold as i64,
            medium_threshold: c.medium_threshold as i64,
            long_budget: c.long_budget as i64,
            medium_budget: c.medium_budget as i64,
            short_budget: c.short_budget as i64,
            length_smoothing: c.smoothing,
            max_occurrences: d.max_occurrences as i64,
        };
        Ok(())
    })
}

/// Creates a drafter with `*config` in `*out`. The settings are checked; a bad one is named in the error.
///
/// # Safety
/// `config` must be null (rejected) or readable; `out` null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_create(
    config: *const specdec_drafter_config,
    out: *mut *mut specdec_drafter,
) -> specdec_status {
    boundary(|| {
        let config = non_null("config", config as *mut specdec_drafter_config)?;
        let out = non_null("out", out)?;
        let drafter = Drafter::new(config_from_c(config)?).map_err(c_config_field_names)?;
        *out = register_handle(HandleKind::Drafter, specdec_drafter { drafter });
        Ok(())
    })
}

/// Releases a drafter and everything it stores. Null is accepted and ignored. A drafter already destroyed, or
/// a pointer that is not a drafter, is SPECDEC_INVALID_ARGUMENT (see the handle rules at `specdec_context`).
///
/// # Safety
/// `drafter` must be null or a drafter from `specdec_drafter_create`, used by no other thread during the call.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_destroy(drafter: *mut specdec_drafter) -> specdec_status {
    boundary(|| destroy_handle("drafter", drafter, HandleKind::Drafter))
}

/// Starts training iteration `iteration` (non-decreasing): rollouts older than the window leave the history.
///
/// # Safety
/// `drafter` must be null (rejected) or live.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_begin_iteration(
    drafter: *const specdec_drafter,
    iteration: u64,
) -> specdec_status {
    boundary(|| drafter_arg(drafter)?.begin_iteration(iteration))
}

/// Registers request `request` (an id of the caller's choosing, unique among registered requests) of prompt
/// `prompt`, with its `num_tokens` prompt tokens.
///
/// # Safety
/// `drafter` must be null (rejected) or live; `prompt_tokens` must hold `num_tokens` ids (null if 0).
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_add_request(
    drafter: *const specdec_drafter,
    request: u64,
    prompt: u64,
    prompt_tokens: *const i32,
    num_tokens: i64,
) -> specdec_status {
    boundary(|| {
        let drafter = drafter_arg(drafter)?;
        drafter.add_request(
            request,
            prompt,
            &tokens_arg("prompt_tokens", prompt_tokens, num_tokens)?,
        )
    })
}

/// Appends `num_tokens` verified tokens to a request's output.
///
/// # Safety
/// `drafter` must be null (rejected) or live; `tokens` must hold `num_tokens` ids (null if 0).
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_append(
    drafter: *const specdec_drafter,
    request: u64,
    tokens: *const i32,
    num_tokens: i64,
) -> specdec_status {
    boundary(|| {
        let drafter = drafter_arg(drafter)?;
        drafter.append(request, &tokens_arg("tokens", tokens, num_tokens)?)
    })
}

/// Ends a request; its rollout stays in the history until the window or a budget drops it.
///
/// # Safety
/// `drafter` must be null (rejected) or live.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_finish_request(
    drafter: *const specdec_drafter,
    request: u64,
) -> specdec_status {
    boundary(|| drafter_arg(drafter)?.finish_request(request))
}

/// The shape of a proposal (`specdec_drafter_propose`'s `kind`), passed as `int32_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum specdec_draft_kind {
    /// A chain: each node the child of the one before.
    SPECDEC_DRAFT_CHAIN = 0,
    /// A tree of the suffix index's branches.
    SPECDEC_DRAFT_TREE = 1,
}

c_enum_table!(specdec_draft_kind {
    SPECDEC_DRAFT_CHAIN,
    SPECDEC_DRAFT_TREE,
});

/// Proposes a draft continuing a request's context: `kind` a `specdec_draft_kind` (chain or tree). Writes up to `capacity`
/// nodes: `out_tokens[i]`, `out_parents[i]` (-1 for a child of the context's last token, otherwise an earlier
/// index: the first n nodes always form a valid tree) and `out_probs[i]` (path probability); `*out_count` =
/// nodes written, `*out_match_len` = length of the matched context suffix (0: nothing matched), and, unless
/// `out_score` is null, `*out_score` = the draft's score (expected accepted tokens: the sum of the path
/// probabilities of all its nodes, including any beyond `capacity`). For tree
/// verification, `specdec_draft_to_verify_tree` puts the context's last token as node 0 and shifts the parents by
/// one (the one tree vocabulary of `specdec::tree`).
///
/// # Safety
/// `drafter` must be null (rejected) or live; each output array must hold `capacity` elements; `out_count`
/// and `out_match_len` must be writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_propose(
    drafter: *const specdec_drafter,
    request: u64,
    kind: i32,
    capacity: i64,
    out_tokens: *mut i32,
    out_parents: *mut i32,
    out_probs: *mut f64,
    out_count: *mut i64,
    out_match_len: *mut i64,
    out_score: *mut f64,
) -> specdec_status {
    boundary(|| {
        let drafter = drafter_arg(drafter)?;
        let kind = match enum_arg::<specdec_draft_kind>("kind", kind)? {
            specdec_draft_kind::SPECDEC_DRAFT_CHAIN => DraftKind::Chain,
            specdec_draft_kind::SPECDEC_DRAFT_TREE => DraftKind::Tree,
        };
        let capacity = size_arg("capacity", capacity)?;
        if capacity == 0 {
            return Err(Error::invalid("capacity", "is 0; no draft fits"));
        }
        let tokens = host_slice_mut("out_tokens", out_tokens, capacity)?;
        let parents = host_slice_mut("out_parents", out_parents, capacity)?;
        let probs = host_slice_mut("out_probs", out_probs, capacity)?;
        let count = non_null("out_count", out_count)?;
        let match_len = non_null("out_match_len", out_match_len)?;
        let draft = drafter.propose(request, kind)?;
        let n = draft.tokens.len().min(capacity);
        for i in 0..n {
            tokens[i] = draft.tokens[i] as i32;
            parents[i] = draft.parents[i];
            probs[i] = draft.probs[i];
        }
        *count = n as i64;
        *match_len = draft.match_len as i64;
        if !out_score.is_null() {
            *out_score = draft.score;
        }
        Ok(())
    })
}

/// Writes the sizes of a drafter's histories into `*out`.
///
/// # Safety
/// `drafter` must be null (rejected) or live; `out` null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_get_stats(
    drafter: *const specdec_drafter,
    out: *mut specdec_drafter_stats,
) -> specdec_status {
    boundary(|| {
        let stats = drafter_arg(drafter)?.stats();
        *non_null("out", out)? = specdec_drafter_stats {
            prompts: stats.prompts as i64,
            rollouts: stats.rollouts as i64,
            tokens: stats.tokens as i64,
            bytes: stats.bytes as i64,
            bytes_per_token: stats.bytes_per_token,
            active_requests: stats.active_requests as i64,
        };
        Ok(())
    })
}
