//! The step cost model and the speculation policies (`specdec::policy`).

use super::*;
use crate::tree::MAX_DRAFTS;

/// A step cost model (see `specdec::policy::CostModel`): a GPU's rates, a model's shape, the drafter's weight
/// bytes and the fitted overheads, in SI units (bytes, seconds, FLOP). Fill it with
/// `specdec_cost_model_preset`, then adjust fields (for example the overheads from a fit).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct specdec_cost_model {
    /// Peak memory bandwidth, bytes per second.
    pub bandwidth: f64,
    /// Peak bf16 matrix rate, FLOP per second.
    pub flops: f64,
    /// Fraction of the bandwidth reached, in (0, 1].
    pub bandwidth_efficiency: f64,
    /// Fraction of the matrix rate reached, in (0, 1].
    pub compute_efficiency: f64,
    /// All parameters of the target model.
    pub params: f64,
    /// Transformer layers.
    pub layers: i64,
    /// Model width.
    pub hidden: i64,
    /// Query heads.
    pub q_heads: i64,
    /// Key/value heads.
    pub kv_heads: i64,
    /// Head dimension.
    pub head_dim: i64,
    /// Vocabulary size.
    pub vocab: i64,
    /// 1 if the LM head shares the embedding table, else 0.
    pub tied_embeddings: i32,
    /// Bytes of weights one draft step reads.
    pub drafter_weight_bytes: f64,
    /// Seconds per target or verification step.
    pub t0: f64,
    /// Seconds per sequence on a target or verification step.
    pub t1: f64,
    /// Seconds per draft step.
    pub d0: f64,
    /// Seconds per sequence on a draft step.
    pub d1: f64,
    /// Seconds per verified token.
    pub v1: f64,
}

fn cost_model_from_c(c: &specdec_cost_model) -> Result<CostModel> {
    let positive = |argument: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(Error::invalid(
                argument,
                format!("is {v}; it must be finite and positive"),
            ))
        }
    };
    let fraction = |argument: &str, v: f64| {
        if v > 0.0 && v <= 1.0 {
            Ok(v)
        } else {
            Err(Error::invalid(argument, format!("is {v}, outside (0, 1]")))
        }
    };
    let count = |argument: &str, v: i64| match size_arg(argument, v)? {
        0 => Err(Error::invalid(argument, "is 0")),
        n => Ok(n),
    };
    let overhead = |argument: &str, v: f64| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(Error::invalid(
                argument,
                format!("is {v}; overheads are finite and >= 0"),
            ))
        }
    };
    let gpu = Gpu {
        name: "custom",
        bandwidth: positive("bandwidth", c.bandwidth)?,
        flops: positive("flops", c.flops)?,
        bandwidth_efficiency: fraction("bandwidth_efficiency", c.bandwidth_efficiency)?,
        compute_efficiency: fraction("compute_efficiency", c.compute_efficiency)?,
    };
    let model = ModelShape {
        name: "custom",
        params: positive("params", c.params)?,
        layers: count("layers", c.layers)?,
        hidden: count("hidden", c.hidden)?,
        q_heads: count("q_heads", c.q_heads)?,
        kv_heads: count("kv_heads", c.kv_heads)?,
        head_dim: count("head_dim", c.head_dim)?,
        vocab: count("vocab", c.vocab)?,
        tied_embeddings: match c.tied_embeddings {
            0 => false,
            1 => true,
            other => {
                return Err(Error::invalid(
                    "tied_embeddings",
                    format!("is {other}, not 0 or 1"),
                ))
            }
        },
    };
    if model.matmul_params() <= 0.0 {
        return Err(Error::invalid(
            "params",
            "is not more than the embedding table (vocab x hidden)",
        ));
    }
    let overheads = Overheads {
        t0: overhead("t0", c.t0)?,
        t1: overhead("t1", c.t1)?,
        d0: overhead("d0", c.d0)?,
        d1: overhead("d1", c.d1)?,
        v1: overhead("v1", c.v1)?,
    };
    let mut cost = CostModel::new(gpu, model, overheads);
    cost.drafter_weight_bytes = positive("drafter_weight_bytes", c.drafter_weight_bytes)?;
    Ok(cost)
}

/// A GPU of `specdec_cost_model_preset`, passed as `int32_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum specdec_gpu {
    /// NVIDIA A100-SXM4-80GB.
    SPECDEC_GPU_A100 = 0,
    /// NVIDIA H100-SXM5-80GB.
    SPECDEC_GPU_H100 = 1,
}

c_enum_table!(specdec_gpu {
    SPECDEC_GPU_A100,
    SPECDEC_GPU_H100,
});

/// A model shape of `specdec_cost_model_preset`, passed as `int32_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum specdec_model {
    /// Qwen2.5-7B.
    SPECDEC_MODEL_QWEN25_7B = 0,
    /// Llama-3-8B.
    SPECDEC_MODEL_LLAMA3_8B = 1,
}

c_enum_table!(specdec_model {
    SPECDEC_MODEL_QWEN25_7B,
    SPECDEC_MODEL_LLAMA3_8B,
});

/// Fills `*out` with a named GPU (`gpu`, a `specdec_gpu`) and model (`model`, a `specdec_model`), its int4
/// self-drafter, and the overheads calibrated to EfficientRollout's published A100
/// operating point (replace them with fitted ones for real decisions).
///
/// # Safety
/// `out` must be null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_cost_model_preset(
    gpu: i32,
    model: i32,
    out: *mut specdec_cost_model,
) -> specdec_status {
    boundary(|| {
        let out = non_null("out", out)?;
        let gpu = match enum_arg::<specdec_gpu>("gpu", gpu)? {
            specdec_gpu::SPECDEC_GPU_A100 => Gpu::A100,
            specdec_gpu::SPECDEC_GPU_H100 => Gpu::H100,
        };
        let model = match enum_arg::<specdec_model>("model", model)? {
            specdec_model::SPECDEC_MODEL_QWEN25_7B => ModelShape::QWEN25_7B,
            specdec_model::SPECDEC_MODEL_LLAMA3_8B => ModelShape::LLAMA3_8B,
        };
        let cost = CostModel::new(gpu, model, Overheads::EFFICIENT_ROLLOUT_A100);
        let o = cost.overheads;
        *out = specdec_cost_model {
            bandwidth: gpu.bandwidth,
            flops: gpu.flops,
            bandwidth_efficiency: gpu.bandwidth_efficiency,
            compute_efficiency: gpu.compute_efficiency,
            params: model.params,
            layers: model.layers as i64,
            hidden: model.hidden as i64,
            q_heads: model.q_heads as i64,
            kv_heads: model.kv_heads as i64,
            head_dim: model.head_dim as i64,
            vocab: model.vocab as i64,
            tied_embeddings: i32::from(model.tied_embeddings),
            drafter_weight_bytes: cost.drafter_weight_bytes,
            t0: o.t0,
            t1: o.t1,
            d0: o.d0,
            d1: o.d1,
            v1: o.v1,
        };
        Ok(())
    })
}

/// Seconds of one step: `kind` 0 = plain decode, 1 = draft step, 2 = verification of `verified_tokens`
/// tokens (the sum of k_i + 1; ignored otherwise), for `batch` sequences holding `context_tokens` in all (at most
/// `SPECDEC_MAX_CONTEXT_TOKENS`).
///
/// # Safety
/// `model` must be null (rejected) or readable; `out_seconds` null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_cost_model_step_seconds(
    model: *const specdec_cost_model,
    kind: i32,
    batch: i64,
    context_tokens: i64,
    verified_tokens: i64,
    out_seconds: *mut f64,
) -> specdec_status {
    boundary(|| {
        let cost = cost_model_from_c(non_null("model", model as *mut specdec_cost_model)?)?;
        let batch = size_arg("batch", batch)?;
        let context = context_tokens_arg("context_tokens", context_tokens)?;
        let out = non_null("out_seconds", out_seconds)?;
        let seconds = match kind {
            0 => cost.target_step(batch, context),
            1 => cost.draft_step(batch, context),
            2 => {
                let tokens = size_arg("verified_tokens", verified_tokens)?;
                if tokens < batch {
                    return Err(Error::invalid(
                        "verified_tokens",
                        format!("is {tokens}, fewer than one per sequence ({batch})"),
                    ));
                }
                cost.verify_step(batch, context, tokens)
            }
            other => {
                return Err(Error::invalid(
                    "kind",
                    format!("is {other}, not 0 (target), 1 (draft) or 2 (verify)"),
                ))
            }
        };
        // Each parameter is finite and positive on its own, but a bandwidth such as 5e-324 still overflows the
        // time: a model that cannot price this step is an invalid argument, not an infinite answer.
        if !seconds.is_finite() {
            return Err(Error::invalid(
                "model",
                format!(
                    "gives {seconds} s for this step (a bandwidth or rate too small to divide by)"
                ),
            ));
        }
        *out = seconds;
        Ok(())
    })
}

/// specdec's policy for one decoding step: for `num_requests` (at most `SPECDEC_MAX_POLICY_REQUESTS`) requests
/// with `contexts[i]` context tokens (at most `SPECDEC_MAX_CONTEXT_TOKENS` each) and per-position acceptance
/// `acceptance[i * positions + j]` (position j + 1, given the earlier ones were accepted; positions past
/// `positions` reuse the last), writes each request's draft length (0..=`max_draft`, 0 = do not draft) to
/// `out_lengths[i]`, maximising expected emitted tokens per second under `model`, and that rate to
/// `*out_goodput`. A model that cannot price the step (each field valid alone, but a rate so small that every
/// step time is infinite) is SPECDEC_INVALID_ARGUMENT naming `model`.
///
/// # Safety
/// `model` must be null (rejected) or readable; `contexts` must hold `num_requests` values, `acceptance`
/// `num_requests * positions`, `out_lengths` `num_requests` (null if 0); `out_goodput` null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_choose_draft_lengths(
    model: *const specdec_cost_model,
    contexts: *const i64,
    acceptance: *const f64,
    num_requests: i64,
    positions: i64,
    max_draft: i64,
    out_lengths: *mut i32,
    out_goodput: *mut f64,
) -> specdec_status {
    boundary(|| {
        let cost = cost_model_from_c(non_null("model", model as *mut specdec_cost_model)?)?;
        let n = policy_requests_arg(num_requests)?;
        let max_draft = size_arg("max_draft", max_draft)?;
        if max_draft > MAX_DRAFTS {
            return Err(Error::invalid(
                "max_draft",
                format!("is {max_draft}, above SPECDEC_MAX_DRAFTS ({MAX_DRAFTS})"),
            ));
        }
        let outlooks = outlooks_from_c(contexts, acceptance, n, positions, max_draft)?;
        let lengths = host_slice_mut("out_lengths", out_lengths, n)?;
        let goodput = non_null("out_goodput", out_goodput)?;
        let (chosen, value) = choose_draft_lengths(&cost, &outlooks, max_draft);
        let value = priced_goodput(value, n)?;
        for (out, k) in lengths.iter_mut().zip(chosen) {
            *out = k as i32;
        }
        *goodput = value;
        Ok(())
    })
}

/// specdec's tree policy for one decoding step, for a drafter whose children are drawn i.i.d. from its
/// distribution and verified by the tree sampler with draft rows: the inputs are those of
/// [`specdec_choose_draft_lengths`] (`acceptance` is each depth's first-child acceptance); for each request it
/// writes the number of drafts `n` (0..=`max_drafts`, 0 = do not draft) to `out_num_drafts[i]` and the tree to
/// row `i` of `out_parents` (`num_requests` rows of `max_drafts + 1`): entry 0 is -1 (the root, the last
/// accepted token), entries `1..=n` the parents (in `0..j` for entry `j`; children of a node in the order the
/// sampler tries them), the rest -1. Trees are at most `max_depth` deep. The expected tokens per second go to
/// `*out_goodput`.
///
/// # Safety
/// As [`specdec_choose_draft_lengths`], with `out_parents` holding `num_requests * (max_drafts + 1)` values and
/// `out_num_drafts` `num_requests` (each null if that is 0).
#[no_mangle]
pub unsafe extern "C" fn specdec_choose_draft_trees(
    model: *const specdec_cost_model,
    contexts: *const i64,
    acceptance: *const f64,
    num_requests: i64,
    positions: i64,
    max_drafts: i64,
    max_depth: i64,
    out_parents: *mut i32,
    out_num_drafts: *mut i32,
    out_goodput: *mut f64,
) -> specdec_status {
    boundary(|| {
        let cost = cost_model_from_c(non_null("model", model as *mut specdec_cost_model)?)?;
        let n = policy_requests_arg(num_requests)?;
        let max_drafts = size_arg("max_drafts", max_drafts)?;
        if !(1..=MAX_DRAFTS).contains(&max_drafts) {
            return Err(Error::invalid(
                "max_drafts",
                format!("is {max_drafts}, not in 1..=SPECDEC_MAX_DRAFTS ({MAX_DRAFTS})"),
            ));
        }
        let max_depth = size_arg("max_depth", max_depth)?;
        if !(1..=max_drafts).contains(&max_depth) {
            return Err(Error::invalid(
                "max_depth",
                format!("is {max_depth}, not in 1..=max_drafts ({max_drafts})"),
            ));
        }
        let outlooks = outlooks_from_c(contexts, acceptance, n, positions, max_depth)?;
        let parents = host_slice_mut("out_parents", out_parents, n * (max_drafts + 1))?;
        let counts = host_slice_mut("out_num_drafts", out_num_drafts, n)?;
        let goodput = non_null("out_goodput", out_goodput)?;
        let (trees, value) = choose_draft_trees(&cost, &outlooks, max_drafts, max_depth);
        let value = priced_goodput(value, n)?;
        for ((row, count), tree) in parents
            .chunks_mut(max_drafts + 1)
            .zip(counts.iter_mut())
            .zip(&trees)
        {
            row.fill(-1);
            for (out, parent) in row.iter_mut().zip(tree.verification_parents()) {
                *out = parent;
            }
            *count = tree.drafts() as i32;
        }
        *goodput = value;
        Ok(())
    })
}

/// The most requests one call of the policy entry points takes: a bound on the call's memory and time, which
/// grow with the batch (see README, Policy, for measured figures); real batches are far smaller.
pub const SPECDEC_MAX_POLICY_REQUESTS: i64 = 4096;

fn policy_requests_arg(num_requests: i64) -> Result<usize> {
    let n = size_arg("num_requests", num_requests)?;
    if n > SPECDEC_MAX_POLICY_REQUESTS as usize {
        return Err(Error::invalid(
            "num_requests",
            format!("is {n}, above SPECDEC_MAX_POLICY_REQUESTS ({SPECDEC_MAX_POLICY_REQUESTS})"),
        ));
    }
    Ok(n)
}

/// The longest context (2^40 tokens) the cost model prices: far beyond any model's, and small enough that the contexts of a
/// whole batch add up without overflow.
pub const SPECDEC_MAX_CONTEXT_TOKENS: i64 = 1_099_511_627_776; // 2^40

fn context_tokens_arg(argument: &str, value: i64) -> Result<usize> {
    if value > SPECDEC_MAX_CONTEXT_TOKENS {
        return Err(Error::invalid(
            argument,
            format!("is {value}, above SPECDEC_MAX_CONTEXT_TOKENS (2^40)"),
        ));
    }
    size_arg(argument, value)
}

/// The goodput a policy entry point reports for `requests` requests: 0 for an empty batch; otherwise finite and
/// positive, or the model could not price the step (each field valid alone, but a rate such as 5e-324 makes
/// every step time infinite) and the call fails before writing anything.
fn priced_goodput(value: f64, requests: usize) -> Result<f64> {
    if requests == 0 {
        Ok(0.0)
    } else if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(Error::invalid(
            "model",
            format!("gives a goodput of {value} tokens/s for this batch (a rate too small to divide by)"),
        ))
    }
}

/// The requests of the policy entry points: `contexts[i]` and `acceptance[i * positions ..][..positions]`, of
/// which only the first `used_positions` are kept (the policy never looks further).
///
/// # Safety
/// `contexts` must hold `n` values and `acceptance` `n * positions` (each null if that is 0).
unsafe fn outlooks_from_c(
    contexts: *const i64,
    acceptance: *const f64,
    n: usize,
    positions: i64,
    used_positions: usize,
) -> Result<Vec<RequestOutlook>> {
    let positions = size_arg("positions", positions)?;
    if positions == 0 {
        return Err(Error::invalid(
            "positions",
            "is 0; give at least the first position's acceptance",
        ));
    }
    let total = n
        .checked_mul(positions)
        .ok_or_else(|| Error::invalid("positions", "num_requests * positions overflows"))?;
    let contexts = host_slice("contexts", contexts, n)?;
    let acceptance = host_slice("acceptance", acceptance, total)?;
    let mut outlooks = Vec::with_capacity(n);
    for i in 0..n {
        let context = context_tokens_arg(&format!("contexts[{i}]"), contexts[i])?;
        let row = &acceptance[i * positions..(i + 1) * positions];
        if let Some(j) = row.iter().position(|a| !(0.0..=1.0).contains(a)) {
            return Err(Error::invalid(
                format!("acceptance[{}]", i * positions + j),
                format!("is {}, outside [0, 1]", row[j]),
            ));
        }
        outlooks.push(RequestOutlook {
            context,
            acceptance: row[..positions.min(used_positions.max(1))].to_vec(),
        });
    }
    Ok(outlooks)
}
