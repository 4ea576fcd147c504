//! Greedy verification, rejection sampling and the tree converters between primitives.

use super::*;

/// Greedy verification of a batch of drafted chains (temperature 0).
///
/// Request `b` drafted `k_b = draft_offsets[b+1] - draft_offsets[b]` tokens, stored at
/// `draft_tokens[draft_offsets[b] ..]`; the offsets cover the drafts (`draft_offsets[0] = 0`,
/// `draft_offsets[num_requests] = num_draft_tokens`). `logits` is `[num_draft_tokens + num_requests, vocab_size]` of
/// `logits_dtype`: rows `draft_offsets[b] + b + j`, `j = 0..k_b`, are request `b`'s target positions (the last one
/// gives the bonus token). With `a_j` the argmax of row `j` (ties to the lowest index), the request accepts its
/// longest draft prefix equal to `a_0, a_1, ...`: `accepted_counts[b]` = that count `n`, and
/// `emitted_tokens[b * emit_width ..]` = `a_0 .. a_n` then -1 up to `emit_width` (which must be at least
/// `k_b + 1` for every request). A request's rows may hold no NaN and no +inf, and need a finite logit.
///
/// `request_status` (NULL, or `[num_requests]`): when given, a request that breaks a rule is flagged alone on
/// either context: its `specdec_request_status` code there, `accepted_counts[b] = -1` and a row of -1; the
/// others are verified and the call returns SPECDEC_OK. When NULL, a CPU context returns
/// SPECDEC_INVALID_ARGUMENT naming the first bad element (writing nothing), and a CUDA kernel still marks the
/// request with -1. On a CPU context every pointer is host memory and `stream` is ignored. On a CUDA context
/// every array is device memory, the work is enqueued on `stream` (a `cudaStream_t` / `CUstream`; NULL is the
/// legacy default stream) and the call returns without waiting.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated above, valid (on a CUDA context: until the
/// work on `stream` has finished), and the output arrays must not overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn specdec_greedy_verify(
    ctx: *const specdec_context,
    logits: *const c_void,
    logits_dtype: i32,
    vocab_size: i64,
    draft_offsets: *const i32,
    num_requests: i64,
    draft_tokens: *const i32,
    num_draft_tokens: i64,
    emit_width: i64,
    accepted_counts: *mut i32,
    emitted_tokens: *mut i32,
    request_status: *mut i32,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let dtype = dtype_arg("logits_dtype", logits_dtype)?;
        let shape = GreedyShape::new(
            size_arg("num_requests", num_requests)?,
            size_arg("vocab_size", vocab_size)?,
            size_arg("num_draft_tokens", num_draft_tokens)?,
            size_arg("emit_width", emit_width)?,
        )?;
        /// The call with the logits as `T`; every array is resolved in the order of the arguments, inputs
        /// first, so that both contexts name the same bad one.
        #[allow(clippy::too_many_arguments)]
        unsafe fn run<T: LogitsElement>(
            backend: &Backend,
            shape: &GreedyShape,
            logits: *const c_void,
            draft_offsets: *const i32,
            draft_tokens: *const i32,
            accepted_counts: *mut i32,
            emitted_tokens: *mut i32,
            request_status: *mut i32,
            stream: Stream<'_>,
        ) -> Result<()> {
            let (b, emitted_len) = (shape.num_requests, shape.emitted_len());
            let inputs = GreedyInputs {
                logits: array_in(backend, "logits", logits as *const T, shape.logits_len())?,
                vocab_size: shape.vocab_size,
                draft_offsets: array_in(backend, "draft_offsets", draft_offsets, b + 1)?,
                draft_tokens: array_in(
                    backend,
                    "draft_tokens",
                    draft_tokens,
                    shape.num_draft_tokens,
                )?,
            };
            let outputs = GreedyOutputs {
                emit_width: shape.emit_width,
                accepted_counts: array_out(backend, "accepted_counts", accepted_counts, b)?,
                emitted_tokens: array_out(backend, "emitted_tokens", emitted_tokens, emitted_len)?,
                request_status: optional_out(backend, "request_status", request_status, b)?,
            };
            backend.greedy_verify(stream, &inputs, outputs)
        }
        let run = match dtype {
            DType::F32 => run::<f32>,
            DType::F16 => run::<f16>,
            DType::BF16 => run::<bf16>,
        };
        run(
            &ctx.backend,
            &shape,
            logits,
            draft_offsets,
            draft_tokens,
            accepted_counts,
            emitted_tokens,
            request_status,
            stream_arg(stream),
        )
    })
}

/// Rejection-sampling verification of ragged chains (`specdec_rejection_verify_chain`) or trees
/// (`specdec_rejection_verify_tree`); the semantics, layouts and rules are those of the Rust module
/// `specdec::sampling` (see its documentation and the README).
///
/// * `rows_kind`: a `specdec_rows`. `target` holds `num_draft_tokens + num_requests` rows (chain) or
///   `num_nodes` rows (tree) of `vocab_size`; `draft` (NULL: point-mass drafts) `num_draft_tokens` or
///   `num_nodes` rows of the same kind.
/// * Logits need `temperature[num_requests]` (0 = greedy); `top_k[num_requests]` (-1 = off) and
///   `top_p[num_requests]` (1 = off) may be NULL. Probabilities take none of the three (all NULL).
/// * `seeds[num_requests]`, `steps[num_requests]`: the Philox key and step of each request.
/// * Outputs: `accepted_counts[num_requests]`, `emitted_tokens[num_requests * emit_width]`, and optionally
///   (NULL to skip) `accepted_nodes[num_requests * emit_width]` and `accept_flags[num_requests * emit_width]`.
///
/// With `outputs.request_status`, a request that breaks a rule is flagged alone on either context: its
/// `specdec_request_status`, `accepted_counts[b] = -1` and rows of -1; the others are verified. Without it, a
/// CPU context returns SPECDEC_INVALID_ARGUMENT naming the first bad element, writing no output, and the CUDA
/// kernels still mark a bad request with -1. On a CUDA context every array is device memory and the work is
/// enqueued on `stream` (the call returns without waiting); sizes and pointers are checked on the host.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated, valid for the call, and the outputs must
/// not overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn specdec_rejection_verify_chain(
    ctx: *const specdec_context,
    rows_kind: i32,
    target: *const c_void,
    draft: *const c_void,
    vocab_size: i64,
    draft_offsets: *const i32,
    num_requests: i64,
    draft_tokens: *const i32,
    num_draft_tokens: i64,
    sampling: *const specdec_sampling,
    emit_width: i64,
    outputs: *const specdec_verify_outputs,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let call = RejectionCall {
            ctx,
            rows_kind,
            target,
            draft,
            vocab_size,
            offsets: draft_offsets,
            num_requests,
            tokens: draft_tokens,
            parents: std::ptr::null(),
            num_tokens: num_draft_tokens,
            sampling,
            emit_width,
            outputs,
            stream,
        };
        call.run(false)
    })
}

/// See `specdec_rejection_verify_chain`. Request `b` has nodes `node_offsets[b] .. node_offsets[b+1]` (1 to
/// SPECDEC_MAX_TREE_NODES, node 0 the last accepted token), `node_tokens` and `parents` (`-1` for node 0, else an
/// earlier node) per node: the verification tree of `specdec::tree` (`specdec_draft_to_verify_tree` builds one
/// from a drafter's proposal).
///
/// # Safety
/// As `specdec_rejection_verify_chain`.
#[no_mangle]
pub unsafe extern "C" fn specdec_rejection_verify_tree(
    ctx: *const specdec_context,
    rows_kind: i32,
    target: *const c_void,
    draft: *const c_void,
    vocab_size: i64,
    node_offsets: *const i32,
    num_requests: i64,
    node_tokens: *const i32,
    parents: *const i32,
    num_nodes: i64,
    sampling: *const specdec_sampling,
    emit_width: i64,
    outputs: *const specdec_verify_outputs,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let call = RejectionCall {
            ctx,
            rows_kind,
            target,
            draft,
            vocab_size,
            offsets: node_offsets,
            num_requests,
            tokens: node_tokens,
            parents,
            num_tokens: num_nodes,
            sampling,
            emit_width,
            outputs,
            stream,
        };
        call.run(true)
    })
}

/// The most nodes of one verification tree, its root included (`specdec::tree`): the one bound of the sampler,
/// tree attention, compaction, the policy and the drafter, so that the largest tree any of them makes is scored
/// and verified in one call (tree attention's ancestor sets are 64-bit masks).
pub const SPECDEC_MAX_TREE_NODES: i64 = 64;

/// The most drafts of one verification tree or chain: SPECDEC_MAX_TREE_NODES less the root.
pub const SPECDEC_MAX_DRAFTS: i64 = SPECDEC_MAX_TREE_NODES - 1;

const _: () = assert!(SPECDEC_MAX_TREE_NODES as usize == crate::tree::MAX_TREE_NODES);
const MAX_DRAFTS: usize = crate::tree::MAX_DRAFTS;

/// The verification tree of a drafter's proposal (`specdec_drafter_propose`), as the sampler and tree attention
/// take it: node 0 is `last_token` (the context's last token), node `i + 1` is draft `i`, and each parent is
/// shifted by one (the drafter's -1, "the context's last token", becomes node 0). Writes `num_drafts + 1`
/// entries to `out_tokens` and `out_parents`, and the sampler's `emit_width` for the tree (its depth plus one)
/// to `*out_emit_width`. `num_drafts` is in `0..=SPECDEC_MAX_DRAFTS`; `draft_parents[i]` must be in `-1..i`.
/// Host memory only.
///
/// # Safety
/// `draft_tokens` and `draft_parents` hold `num_drafts` values, `out_tokens` and `out_parents` `num_drafts + 1`;
/// `out_emit_width` is writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_draft_to_verify_tree(
    last_token: i32,
    draft_tokens: *const i32,
    draft_parents: *const i32,
    num_drafts: i64,
    out_tokens: *mut i32,
    out_parents: *mut i32,
    out_emit_width: *mut i64,
) -> specdec_status {
    boundary(|| {
        let n = size_arg("num_drafts", num_drafts)?;
        if n > MAX_DRAFTS {
            return Err(Error::invalid(
                "num_drafts",
                format!("is {n}, above SPECDEC_MAX_DRAFTS ({MAX_DRAFTS})"),
            ));
        }
        let tokens = host_slice("draft_tokens", draft_tokens, n)?;
        let parents = host_slice("draft_parents", draft_parents, n)?;
        let draft = crate::drafter::Draft {
            tokens: tokens
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    u32::try_from(t).map_err(|_| {
                        Error::invalid(
                            format!("draft_tokens[{i}]"),
                            format!("is {t}, not a token id"),
                        )
                    })
                })
                .collect::<Result<_>>()?,
            parents: parents.to_vec(),
            ..Default::default()
        };
        let tree =
            crate::tree::VerifyTree::from_draft(last_token, &draft).map_err(|e| match e {
                Error::InvalidArgument { argument, reason } => Error::InvalidArgument {
                    argument: argument.replace("draft.", "draft_"),
                    reason,
                },
                other => other,
            })?;
        // Every output is resolved before any is written: on an error nothing is.
        let width = non_null("out_emit_width", out_emit_width)?;
        let out_tokens = host_slice_mut("out_tokens", out_tokens, n + 1)?;
        let out_parents = host_slice_mut("out_parents", out_parents, n + 1)?;
        out_tokens.copy_from_slice(tree.tokens());
        out_parents.copy_from_slice(tree.parents());
        *width = tree.emit_width() as i64;
        Ok(())
    })
}

/// Compaction's inputs from the sampler's outputs (`specdec::tree::compaction_paths`): `accepted_counts
/// [num_requests]` and `accepted_nodes [num_requests * emit_width]` as `specdec_rejection_verify_*` wrote them
/// (each path without its root, then -1) become `out_offsets [num_requests + 1]` and `out_nodes` (each path with
/// node 0 first, `out_offsets[num_requests]` entries in all, never more than `num_requests * emit_width`), ready
/// for `specdec_tree_kv_compact`. Passing the sampler's rows unchanged would move the first accepted draft onto
/// the root's slot. A flagged request (count -1) is an error: nothing of it may be compacted. Host memory only.
///
/// # Safety
/// `accepted_counts` holds `num_requests` values, `accepted_nodes` and `out_nodes` `num_requests * emit_width`,
/// `out_offsets` `num_requests + 1`.
#[no_mangle]
pub unsafe extern "C" fn specdec_compaction_paths(
    accepted_counts: *const i32,
    accepted_nodes: *const i32,
    num_requests: i64,
    emit_width: i64,
    out_offsets: *mut i32,
    out_nodes: *mut i32,
) -> specdec_status {
    boundary(|| {
        let b = size_arg("num_requests", num_requests)?;
        let width = size_arg("emit_width", emit_width)?;
        let cells = b
            .checked_mul(width)
            .ok_or_else(|| Error::invalid("emit_width", "num_requests * emit_width overflows"))?;
        let counts = host_slice("accepted_counts", accepted_counts, b)?;
        let nodes = host_slice("accepted_nodes", accepted_nodes, cells)?;
        let (offsets, paths) = crate::tree::compaction_paths(counts, nodes, width)?;
        // Every output is resolved before any is written: on an error nothing is.
        let out_offsets = host_slice_mut("out_offsets", out_offsets, b + 1)?;
        let out_nodes = host_slice_mut("out_nodes", out_nodes, cells)?;
        out_offsets.copy_from_slice(&offsets);
        out_nodes[..paths.len()].copy_from_slice(&paths);
        Ok(())
    })
}

/// [`array_in`] of `seeds` or `steps`, whose absence gets its own reason.
///
/// # Safety
/// As [`array_in`].
unsafe fn noise_array<'a>(
    backend: &Backend,
    argument: &str,
    ptr: *const u64,
    len: usize,
) -> Result<In<'a, u64>> {
    if ptr.is_null() && len > 0 {
        return Err(crate::sampling::missing_noise_array(argument));
    }
    array_in(backend, argument, ptr, len)
}

/// A seed for sample `sample` of a group sharing `base_seed` (`specdec::sampling::noise::sample_seed`): the same
/// seed and step give the same noise in any batch slot, so several samples of one prompt (a GRPO group) need
/// seeds of their own. Distinct `sample` values give distinct seeds for a fixed `base_seed`.
#[no_mangle]
pub extern "C" fn specdec_sample_seed(base_seed: u64, sample: u64) -> u64 {
    crate::sampling::noise::sample_seed(base_seed, sample)
}

/// Per-request sampling inputs of a rejection-sampling call (each array `[num_requests]`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct specdec_sampling {
    /// Logits: required, finite, `>= 0` (0 = greedy). Probabilities: NULL.
    pub temperature: *const f32,
    /// NULL, or -1 (off) or `1..=vocab_size` per request. Probabilities: NULL.
    pub top_k: *const i32,
    /// NULL, or in (0, 1] per request (1 = off). Probabilities: NULL.
    pub top_p: *const f32,
    /// Required: the Philox key of each request. The same seed and step give the same noise in any batch slot:
    /// several samples of one prompt need different seeds (`specdec_sample_seed`).
    pub seeds: *const u64,
    /// Required: each request's step counter, 0 at its first step and advanced every decoding step.
    pub steps: *const u64,
    /// NULL: the draft rows use `temperature`, `top_k` and `top_p`. Else the temperature (positive) the drafter
    /// sampled its drafts with, applied to the draft rows; logits with draft rows only.
    pub draft_temperature: *const f32,
    /// NULL (off), or the drafter's top-k per request (-1 = off); only with `draft_temperature`.
    pub draft_top_k: *const i32,
    /// NULL (off), or the drafter's top-p per request (1 = off); only with `draft_temperature`.
    pub draft_top_p: *const f32,
}

/// The outputs of a rejection-sampling call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct specdec_verify_outputs {
    /// `[num_requests]`: accepted drafts.
    pub accepted_counts: *mut i32,
    /// `[num_requests * emit_width]`: accepted tokens, then the correction or bonus token, then -1.
    pub emitted_tokens: *mut i32,
    /// NULL or `[num_requests * emit_width]`: the accepted path's node indices, then -1.
    pub accepted_nodes: *mut i32,
    /// NULL or `[num_requests * emit_width]`: 1 accepted, 0 all children rejected, -1 nothing tried.
    pub accept_flags: *mut i8,
    /// NULL or `[num_requests]`: each request's `specdec_request_status`. When given, a request that breaks a
    /// rule is flagged alone on either context (its status, `accepted_counts[b] = -1`, rows of -1) and the call
    /// returns SPECDEC_OK.
    pub request_status: *mut i32,
}

struct RejectionCall {
    ctx: *const specdec_context,
    rows_kind: i32,
    target: *const c_void,
    draft: *const c_void,
    vocab_size: i64,
    offsets: *const i32,
    num_requests: i64,
    tokens: *const i32,
    parents: *const i32,
    num_tokens: i64,
    sampling: *const specdec_sampling,
    emit_width: i64,
    outputs: *const specdec_verify_outputs,
    stream: *mut c_void,
}

impl RejectionCall {
    fn rows_kind(&self) -> Result<RowsKind> {
        Ok(
            match enum_arg::<specdec_rows>("rows_kind", self.rows_kind)? {
                specdec_rows::SPECDEC_ROWS_LOGITS_F32 => RowsKind::LogitsF32,
                specdec_rows::SPECDEC_ROWS_LOGITS_F16 => RowsKind::LogitsF16,
                specdec_rows::SPECDEC_ROWS_LOGITS_BF16 => RowsKind::LogitsBF16,
                specdec_rows::SPECDEC_ROWS_PROBS_F32 => RowsKind::Probs,
            },
        )
    }

    /// # Safety
    /// The contract of `specdec_rejection_verify_chain`.
    unsafe fn run(self, tree: bool) -> Result<()> {
        let ctx = context_arg(self.ctx)?;
        let sampling = *non_null("sampling", self.sampling as *mut specdec_sampling)?;
        let outputs = *non_null("outputs", self.outputs as *mut specdec_verify_outputs)?;
        let tokens_name = if tree {
            "num_nodes"
        } else {
            "num_draft_tokens"
        };
        let shape = VerifyShape::new(
            size_arg("num_requests", self.num_requests)?,
            size_arg("vocab_size", self.vocab_size)?,
            size_arg(tokens_name, self.num_tokens)?,
            tree,
            size_arg("emit_width", self.emit_width)?,
        )?;
        let backend = &ctx.backend;
        let b = shape.num_requests;
        let target_len = shape.target_rows() * shape.vocab_size;
        let draft_len = shape.draft_rows() * shape.vocab_size;
        let kind = self.rows_kind()?;
        let rows = |name: &str, ptr: *const c_void, len: usize| -> Result<Rows<'_>> {
            Ok(match kind {
                RowsKind::LogitsF32 => {
                    Rows::LogitsF32(array_in(backend, name, ptr as *const f32, len)?)
                }
                RowsKind::LogitsF16 => {
                    Rows::LogitsF16(array_in(backend, name, ptr as *const f16, len)?)
                }
                RowsKind::LogitsBF16 => {
                    Rows::LogitsBF16(array_in(backend, name, ptr as *const bf16, len)?)
                }
                RowsKind::Probs => Rows::Probs(array_in(backend, name, ptr as *const f32, len)?),
            })
        };
        let target = rows("target", self.target, target_len)?;
        let draft = if self.draft.is_null() {
            None
        } else {
            Some(rows("draft", self.draft, draft_len)?)
        };
        let (offsets_name, tokens_name) = if tree {
            ("node_offsets", "node_tokens")
        } else {
            ("draft_offsets", "draft_tokens")
        };
        let offsets = array_in(backend, offsets_name, self.offsets, b + 1)?;
        let tokens = array_in(backend, tokens_name, self.tokens, shape.num_tokens)?;
        let drafts = if tree {
            let parents = array_in(backend, "parents", self.parents, shape.num_tokens)?;
            Drafts::Tree {
                node_offsets: offsets,
                node_tokens: tokens,
                parents,
            }
        } else {
            Drafts::Chain {
                draft_offsets: offsets,
                draft_tokens: tokens,
            }
        };
        // On either context: logits need temperatures (null only for an empty batch, like every array), and
        // probabilities refuse each sampling parameter by its own (C) name.
        let params = if target.is_logits() {
            if sampling.temperature.is_null() && b > 0 {
                return Err(Error::invalid(
                    "sampling.temperature",
                    "is a null pointer; logits need a temperature per request (0 = greedy)",
                ));
            }
            Some(SamplingParams {
                temperature: array_in(backend, "sampling.temperature", sampling.temperature, b)?,
                top_k: optional_in(backend, "sampling.top_k", sampling.top_k, b)?,
                top_p: optional_in(backend, "sampling.top_p", sampling.top_p, b)?,
            })
        } else {
            let given = [
                ("sampling.temperature", sampling.temperature.is_null()),
                ("sampling.top_k", sampling.top_k.is_null()),
                ("sampling.top_p", sampling.top_p.is_null()),
            ];
            if let Some((name, _)) = given.into_iter().find(|&(_, null)| !null) {
                return Err(Error::invalid(
                    name,
                    "probabilities take no sampling parameters: apply temperature, top-k and top-p before",
                ));
            }
            None
        };
        let draft_params = if sampling.draft_temperature.is_null() {
            let given = [
                ("sampling.draft_top_k", sampling.draft_top_k.is_null()),
                ("sampling.draft_top_p", sampling.draft_top_p.is_null()),
            ];
            if let Some((name, _)) = given.into_iter().find(|&(_, null)| !null) {
                return Err(Error::invalid(
                    name,
                    "needs sampling.draft_temperature (without it the draft rows use the target's parameters)",
                ));
            }
            None
        } else {
            if !target.is_logits() || draft.is_none() {
                return Err(Error::invalid(
                    "sampling.draft_temperature",
                    "applies to draft logits only: pass NULL without draft rows or with probabilities",
                ));
            }
            Some(SamplingParams {
                temperature: array_in(
                    backend,
                    "sampling.draft_temperature",
                    sampling.draft_temperature,
                    b,
                )?,
                top_k: optional_in(backend, "sampling.draft_top_k", sampling.draft_top_k, b)?,
                top_p: optional_in(backend, "sampling.draft_top_p", sampling.draft_top_p, b)?,
            })
        };
        let inputs = VerifyInputs {
            vocab_size: shape.vocab_size,
            drafts,
            target,
            draft,
            params,
            draft_params,
            seeds: noise_array(backend, "sampling.seeds", sampling.seeds, b)?,
            steps: noise_array(backend, "sampling.steps", sampling.steps, b)?,
        };
        let n = shape.output_len();
        let out = VerifyOutputs {
            emit_width: shape.emit_width,
            accepted_counts: array_out(
                backend,
                "outputs.accepted_counts",
                outputs.accepted_counts,
                b,
            )?,
            emitted_tokens: array_out(
                backend,
                "outputs.emitted_tokens",
                outputs.emitted_tokens,
                n,
            )?,
            accepted_nodes: optional_out(
                backend,
                "outputs.accepted_nodes",
                outputs.accepted_nodes,
                n,
            )?,
            accept_flags: optional_out(backend, "outputs.accept_flags", outputs.accept_flags, n)?,
            request_status: optional_out(
                backend,
                "outputs.request_status",
                outputs.request_status,
                b,
            )?,
        };
        backend.rejection_verify(stream_arg(self.stream), &inputs, out)
    }
}
