//! Lossless rejection-sampling verification on the CPU: the reference of every rule in [`crate::sampling`],
//! written to be read. Requests run in parallel; each walks its tree from the root, reading only the rows of
//! the nodes it visits.

use rayon::prelude::*;

use super::simd::{largest, Kernel};
use super::softmax::softmax_in_place;
use crate::backend::{Backend, Stream};
use crate::error::Result;
use crate::greedy::REQUEST_INVALID;
use crate::sampling::noise::{self, RequestNoise};
use crate::sampling::{
    check_drafted_token, check_request, row_owner, CheckedRequest, HostDrafts, HostInputs,
    HostOutputs, HostRows, Node, RequestParams, RowTemperature, VerifyInputs, VerifyOutputs,
    VerifyShape,
};
use crate::status::{settle, write_statuses, RequestResult, RequestStatus};

/// Verifies a batch of chains or trees ([`crate::sampling`] has the semantics) on host arrays: shorthand for
/// [`Backend::Cpu.rejection_verify`](crate::backend::Backend::rejection_verify). Every request is checked before
/// any output is written. With [`VerifyOutputs::request_status`], a request that breaks a rule is flagged alone
/// (its status, `accepted_counts[b] = -1`, rows of -1), as the CUDA kernels do; without it, the first failing
/// request's error is returned and the outputs are untouched.
pub fn rejection_verify(inputs: &VerifyInputs<'_>, outputs: VerifyOutputs<'_>) -> Result<()> {
    Backend::Cpu.rejection_verify(Stream::Default, inputs, outputs)
}

/// The CPU sampler, on host arrays whose lengths `shape` has checked.
pub(crate) fn rejection_verify_checked(
    shape: &VerifyShape,
    inputs: &HostInputs<'_>,
    outputs: &mut HostOutputs<'_>,
) -> Result<()> {
    let shape = *shape;
    let checked: Vec<RequestResult<VerifiedRequest>> = super::pool::install(|| {
        (0..shape.num_requests)
            .into_par_iter()
            .map(|b| verify_request(&shape, inputs, b))
            .collect()
    });
    let (results, statuses) = settle(checked, outputs.request_status.as_deref())?;
    write_statuses(&statuses, outputs.request_status.as_deref_mut());
    let w = shape.emit_width;
    for (b, result) in results.iter().enumerate() {
        let Some(result) = result else {
            outputs.accepted_counts[b] = REQUEST_INVALID;
            outputs.emitted_tokens[b * w..(b + 1) * w].fill(-1);
            if let Some(nodes) = outputs.accepted_nodes.as_deref_mut() {
                nodes[b * w..(b + 1) * w].fill(-1);
            }
            if let Some(flags) = outputs.accept_flags.as_deref_mut() {
                flags[b * w..(b + 1) * w].fill(-1);
            }
            continue;
        };
        outputs.accepted_counts[b] = result.path.len() as i32;
        let emitted = &mut outputs.emitted_tokens[b * w..(b + 1) * w];
        emitted.fill(-1);
        emitted[..result.emitted.len()].copy_from_slice(&result.emitted);
        if let Some(nodes) = outputs.accepted_nodes.as_deref_mut() {
            let nodes = &mut nodes[b * w..(b + 1) * w];
            nodes.fill(-1);
            for (slot, &node) in nodes.iter_mut().zip(&result.path) {
                *slot = node as i32;
            }
        }
        if let Some(flags) = outputs.accept_flags.as_deref_mut() {
            let flags = &mut flags[b * w..(b + 1) * w];
            flags.fill(-1);
            flags[..result.flags.len()].copy_from_slice(&result.flags);
        }
    }
    Ok(())
}

/// One request's outcome.
struct VerifiedRequest {
    /// Accepted node indices, root excluded.
    path: Vec<usize>,
    /// The accepted tokens, then the correction or bonus token.
    emitted: Vec<i32>,
    /// One entry per depth visited: 1 accepted, 0 all children rejected, -1 no children.
    flags: Vec<i8>,
}

/// The distribution at one node, ready to be drawn from or compared.
enum Dist {
    /// Log weights (logits over the temperature), `-inf` where removed by top-k / top-p or masked.
    Log(Vec<f32>),
    /// Non-negative weights (probabilities).
    Weights(Vec<f32>),
}

fn verify_request(
    shape: &VerifyShape,
    inputs: &HostInputs<'_>,
    b: usize,
) -> RequestResult<VerifiedRequest> {
    let CheckedRequest {
        nodes,
        params,
        draft_params,
    } = check_request(shape, inputs, b)?;
    let children = children_of(&nodes);
    let v = shape.vocab_size;
    let temperature = |name, p: Option<RequestParams>| {
        p.map(|p| RowTemperature {
            name,
            request: b,
            temperature: p.temperature,
        })
    };
    let draft_name = if inputs.draft_params.is_some() {
        "draft_temperature"
    } else {
        "temperature"
    };
    let greedy = params.is_some_and(|p| p.temperature == 0.0);
    // Every row the walk may read is the request's own, by the kernels' rule (row_owner); then its values.
    let offsets = match inputs.drafts {
        HostDrafts::Chain { draft_offsets, .. } => draft_offsets,
        HostDrafts::Tree { node_offsets, .. } => node_offsets,
    };
    let reads_draft_row = |i: usize| inputs.draft.is_some() && !greedy && !children[i].is_empty();
    for (i, node) in nodes.iter().enumerate() {
        let draft_row = node.draft_row.filter(|_| reads_draft_row(i));
        let rows = [(false, Some(node.target_row)), (true, draft_row)];
        for (draft, row) in rows {
            let Some(row) = row else { continue };
            if row_owner(shape, offsets, draft, row) != Some(b) {
                let kind = if draft { "draft" } else { "target" };
                return Err(RequestStatus::Offsets.failure(
                    format!("{}[{b}]", if shape.tree { "node_offsets" } else { "draft_offsets" }),
                    format!(
                        "request {b}'s {kind} row {row} is claimed by another request's offsets (which are broken)"
                    ),
                ));
            }
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        inputs.target.check_row(
            "target",
            node.target_row,
            v,
            temperature("temperature", params),
            true,
        )?;
        // A draft row is read only by a node with children, and never at temperature 0.
        if let (Some(draft), Some(row), false, false) = (
            &inputs.draft,
            node.draft_row,
            greedy,
            children[i].is_empty(),
        ) {
            draft.check_row("draft", row, v, temperature(draft_name, draft_params), true)?;
        }
    }
    // Each drafted token must have probability under the draft row it was drawn from (ignored when greedy). The
    // first draft distributions are kept for the walk, which reads the same rows (all of a chain's, up to
    // [`KEPT_DRAFT_ROWS`]; a wide tree's others are computed again if its path reaches them).
    let mut draft_probabilities: Vec<Option<Vec<f32>>> = vec![None; nodes.len()];
    let mut kept = 0;
    if let (Some(draft), false) = (&inputs.draft, greedy) {
        for (parent, kids) in children.iter().enumerate() {
            let (Some(draft_row), false) = (nodes[parent].draft_row, kids.is_empty()) else {
                continue;
            };
            let q = probabilities(distribution(draft, draft_row, v, draft_params.as_ref()));
            for &kid in kids {
                let (name, index) = match inputs.drafts {
                    HostDrafts::Chain { .. } => ("draft_tokens", nodes[kid].target_row - b - 1),
                    HostDrafts::Tree { .. } => ("node_tokens", nodes[kid].target_row),
                };
                let token = nodes[kid].token;
                check_drafted_token(name, index, token, q[token as usize], draft_row)?;
            }
            if kept < KEPT_DRAFT_ROWS {
                draft_probabilities[parent] = Some(q);
                kept += 1;
            }
        }
    }
    let noise = RequestNoise {
        seed: inputs.seeds[b],
        step: inputs.steps[b],
    };
    let mut result = VerifiedRequest {
        path: Vec::new(),
        emitted: Vec::new(),
        flags: Vec::new(),
    };
    let mut node = 0;
    loop {
        let kids = &children[node];
        let flag_if_rejected = if kids.is_empty() { -1 } else { 0 };
        let target_row = nodes[node].target_row;
        let next = if greedy {
            let y = argmax_row(&inputs.target, target_row, v) as i32;
            Step::from_point_mass(&nodes, kids, y)
        } else {
            let p = distribution(&inputs.target, target_row, v, params.as_ref());
            let q = match (&inputs.draft, nodes[node].draft_row) {
                (Some(draft), Some(draft_row)) if !kids.is_empty() => {
                    Some(draft_probabilities[node].take().unwrap_or_else(|| {
                        probabilities(distribution(draft, draft_row, v, draft_params.as_ref()))
                    }))
                }
                _ => None,
            };
            match q {
                Some(q) => verify_iid_children(&nodes, kids, p, &q, &noise, node as u32),
                None => Step::from_point_mass(&nodes, kids, draw(&p, &noise, node as u32) as i32),
            }
        };
        match next {
            Step::Accept(child) => {
                result.path.push(child);
                result.emitted.push(nodes[child].token);
                result.flags.push(1);
                node = child;
            }
            Step::Emit(token) => {
                result.emitted.push(token);
                result.flags.push(flag_if_rejected);
                return Ok(result);
            }
        }
    }
}

/// Draft distributions computed by a request's checks and kept for its walk: at V = 152k, 16 rows are 9.3 MiB
/// per request in flight.
const KEPT_DRAFT_ROWS: usize = 16;

fn children_of(nodes: &[Node]) -> Vec<Vec<usize>> {
    let mut children = vec![Vec::new(); nodes.len()];
    for (i, node) in nodes.iter().enumerate().skip(1) {
        children[node.parent as usize].push(i);
    }
    children
}

enum Step {
    /// Move to this child.
    Accept(usize),
    /// Stop, emitting this token.
    Emit(i32),
}

impl Step {
    /// The point-mass rule in its single-draw form: `y` was drawn from the node's target distribution; the first
    /// child holding `y` is accepted, else `y` is the emitted token.
    fn from_point_mass(nodes: &[Node], kids: &[usize], y: i32) -> Step {
        match kids.iter().find(|&&c| nodes[c].token == y) {
            Some(&c) => Step::Accept(c),
            None => Step::Emit(y),
        }
    }
}

/// SpecInfer's multi-step speculative sampling at one node whose children were drawn i.i.d. from `q` (the draft
/// probabilities; for a chain, the single child is Leviathan's rule). `r / mass` is the current residual
/// distribution: `p` as given (mass 1) before the first rejection, so a chain needs no normalising sum.
fn verify_iid_children(
    nodes: &[Node],
    kids: &[usize],
    p: Dist,
    q: &[f32],
    noise: &RequestNoise,
    node: u32,
) -> Step {
    let p = probabilities(p);
    // The residual is copied from `p` at the first rejection (most nodes accept their first child).
    let mut residual: Option<Vec<f32>> = None;
    let mut mass = 1.0f64;
    for (j, &child) in kids.iter().enumerate() {
        let x = nodes[child].token as usize;
        let u = noise.coin(node, j as u32);
        let r = residual.as_deref().unwrap_or(&p);
        // Exact in f64 while mass is 1 (a product of two f32): u q(x) < p(x) never accepts p(x) = 0, and always
        // accepts p(x) >= q(x) > 0 because u < 1.
        if f64::from(u) * f64::from(q[x]) * mass < f64::from(r[x]) {
            return Step::Accept(child);
        }
        let r = residual.get_or_insert_with(|| p.clone());
        let scale = if mass == 1.0 { 1.0 } else { mass as f32 };
        for (rx, &qx) in r.iter_mut().zip(q) {
            let residual = if scale == 1.0 {
                *rx - qx
            } else {
                *rx / scale - qx
            };
            *rx = residual.max(0.0);
        }
        mass = r.iter().map(|&x| f64::from(x)).sum();
    }
    // No residual mass is reachable only through rounding (the rejected children's p <= q everywhere means
    // p = q); then the draw falls back to p.
    let weights = match residual {
        Some(r) if mass > 0.0 => r,
        _ => p,
    };
    Step::Emit(draw(&Dist::Weights(weights), noise, node) as i32)
}

/// The node's distribution: log weights for logits (temperature, top-k, top-p applied), or the given
/// probabilities.
fn distribution(rows: &HostRows<'_>, row: usize, v: usize, params: Option<&RequestParams>) -> Dist {
    let values = rows.row_f32(row, v);
    let Some(params) = params else {
        return Dist::Weights(values);
    };
    let t = params.temperature;
    let mut z = values;
    for x in z.iter_mut() {
        *x /= t;
    }
    if let Some(k) = params.top_k {
        let threshold = kth_largest(&z, k);
        mask_below(&mut z, threshold);
    }
    if params.top_p < 1.0 {
        let threshold = top_p_threshold(&z, params.top_p);
        mask_below(&mut z, threshold);
    }
    Dist::Log(z)
}

fn mask_below(z: &mut [f32], threshold: f32) {
    for x in z.iter_mut() {
        if *x < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// The `k`-th largest value (counting repeats), `1 <= k <= len`.
fn kth_largest(z: &[f32], k: usize) -> f32 {
    let mut sorted = z.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    sorted[k - 1]
}

/// The smallest kept log weight: walking the softmax of `z` in decreasing order, the first at which the
/// cumulative mass reaches `top_p` (everything if rounding never gets there).
fn top_p_threshold(z: &[f32], top_p: f32) -> f32 {
    let probs = softmax(z);
    let mut order: Vec<usize> = (0..z.len()).filter(|&i| z[i] > f32::NEG_INFINITY).collect();
    order.sort_unstable_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
    let mut cumulative = 0.0f64;
    for &i in &order {
        cumulative += probs[i];
        if cumulative >= f64::from(top_p) {
            return z[i];
        }
    }
    f32::NEG_INFINITY
}

/// Softmax of log weights: exponentials in f32, their sum and the quotients in f64.
fn softmax(z: &[f32]) -> Vec<f64> {
    // exp in f32 (as the GPU does), accumulated in f64.
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = z.iter().map(|&x| f64::from((x - max).exp())).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Probabilities (f32) of a distribution: for log weights, their softmax ([`softmax_in_place`]: f32
/// exponentials, an f64 sum, quotients rounded to f32), computed in the log weights' own buffer.
fn probabilities(d: Dist) -> Vec<f32> {
    match d {
        Dist::Weights(w) => w,
        Dist::Log(mut z) => {
            softmax_in_place(&mut z);
            z
        }
    }
}

/// A token drawn from `d` with the node's noise: the exponential race `argmax w(x) / E_x` over `w(x) > 0`, or
/// its log form `argmax z(x) - ln E_x` over `z(x) > -inf`; ties go to the lowest index.
///
/// Tokens are visited in increasing order, by chunks of [`RACE_CHUNK`], and a chunk whose keys cannot exceed the
/// best key so far (by the bounds on the noise, [`noise::MIN_EXPONENTIAL`] and [`noise::MAX_GUMBEL`]) is
/// skipped without drawing its noise: exact, since a skipped key is at most the best and a tie goes to the earlier
/// token. A chunk's noise is computed side by side (16 Philox blocks, then the exponentials and logarithms as
/// straight-line code), compiled for the CPU's vector instructions: the same bits as the scalar functions of
/// [`noise`], which the CUDA kernels also give.
fn draw(d: &Dist, noise: &RequestNoise, node: u32) -> usize {
    draw_with(Kernel::detect(), d, noise, node)
}

fn draw_with(kernel: Kernel, d: &Dist, noise: &RequestNoise, node: u32) -> usize {
    assert!(
        kernel.runs_here(),
        "{kernel:?} kernel on a CPU without its instructions"
    );
    match kernel {
        Kernel::Portable => draw_by_chunks(d, noise, node),
        // SAFETY: the CPU has the kernel's instructions (asserted above).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => unsafe { draw_avx2(d, noise, node) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512 => unsafe { draw_avx512(d, noise, node) },
    }
}

/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn draw_avx2(d: &Dist, noise: &RequestNoise, node: u32) -> usize {
    draw_by_chunks(d, noise, node)
}

/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn draw_avx512(d: &Dist, noise: &RequestNoise, node: u32) -> usize {
    draw_by_chunks(d, noise, node)
}

/// Tokens whose noise is computed together: 16 Philox blocks of 4.
const RACE_CHUNK: usize = 64;

/// The race of [`draw`], as loops over a chunk's tokens (no closures: a closure would not be compiled with the
/// caller's target features).
#[inline(always)]
fn draw_by_chunks(d: &Dist, noise: &RequestNoise, node: u32) -> usize {
    let (values, logs) = match d {
        Dist::Weights(w) => (w.as_slice(), false),
        Dist::Log(z) => (z.as_slice(), true),
    };
    // A drawn token's key is positive (w / E) or above -inf (z - ln E); -inf marks a token without mass.
    let (mut best_key, mut best) = (f32::NEG_INFINITY, None);
    let mut exponentials = [0.0f32; RACE_CHUNK];
    let mut keys = [0.0f32; RACE_CHUNK];
    for first in (0..values.len()).step_by(RACE_CHUNK) {
        let chunk = &values[first..values.len().min(first + RACE_CHUNK)];
        if best.is_some() {
            let top = largest(chunk);
            let ceiling = match logs {
                true => f64::from(top) + noise::MAX_GUMBEL,
                false if top > 0.0 => f64::from(top) / noise::MIN_EXPONENTIAL,
                false => f64::NEG_INFINITY,
            };
            if ceiling < f64::from(best_key) {
                continue;
            }
        }
        let blocks = noise.token_highs::<{ RACE_CHUNK / 4 }>(node, first as u32);
        let mut highs = [0u32; RACE_CHUNK];
        let mut needs_low_word = false;
        for (i, high) in highs.iter_mut().enumerate() {
            *high = blocks[i % 4][i / 4];
            needs_low_word |= high.leading_zeros() > 9;
        }
        for (e, &high) in exponentials.iter_mut().zip(&highs) {
            *e = noise::exponential_of_high(high);
        }
        if needs_low_word {
            for (i, (e, &high)) in exponentials[..chunk.len()]
                .iter_mut()
                .zip(&highs)
                .enumerate()
            {
                if high.leading_zeros() > 9 {
                    *e = noise.token_exponential_from(node, (first + i) as u32, high);
                }
            }
        }
        if logs {
            for ((k, &z), &e) in keys.iter_mut().zip(chunk).zip(&exponentials) {
                let key = z - noise::ln(e);
                *k = if z > f32::NEG_INFINITY {
                    key
                } else {
                    f32::NEG_INFINITY
                };
            }
        } else {
            for ((k, &w), &e) in keys.iter_mut().zip(chunk).zip(&exponentials) {
                *k = if w > 0.0 { w / e } else { f32::NEG_INFINITY };
            }
        }
        // Most chunks do not hold a better key: their largest (by lanes) says so, and only a chunk that does is
        // searched for its first largest key.
        let keys = &keys[..chunk.len()];
        let top = largest(keys);
        if top > best_key {
            let mut at = 0;
            while keys[at] != top {
                at += 1;
            }
            (best_key, best) = (top, Some(first + at));
        }
    }
    best.expect("a validated row has mass")
}

fn argmax_row(rows: &HostRows<'_>, row: usize, v: usize) -> usize {
    let range = row * v..(row + 1) * v;
    match rows {
        HostRows::LogitsF32(r) | HostRows::Probs(r) => super::argmax(&r[range]),
        HostRows::LogitsF16(r) => super::argmax(&r[range]),
        HostRows::LogitsBF16(r) => super::argmax(&r[range]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The race token by token, as the noise module defines it: every token's exponential, its key, the first
    /// largest key.
    fn race(d: &Dist, noise: &RequestNoise, node: u32) -> usize {
        let mut best: Option<(f32, usize)> = None;
        let values = match d {
            Dist::Weights(w) => w,
            Dist::Log(z) => z,
        };
        for (x, &value) in values.iter().enumerate() {
            let e = noise.token_exponential(node, x as u32);
            let key = match d {
                Dist::Weights(_) if value > 0.0 => value / e,
                Dist::Log(_) if value > f32::NEG_INFINITY => value - noise::ln(e),
                _ => continue,
            };
            if best.is_none_or(|(k, _)| key > k) {
                best = Some((key, x));
            }
        }
        best.expect("mass").1
    }

    /// Every kernel's chunked race draws the token-by-token race's token: rows of probabilities and of logits,
    /// with zero and `-inf` entries, flat rows (where the noise alone decides), one hot token, sizes around the
    /// chunk, and enough draws that high words needing their low word (1 in 1024) occur.
    #[test]
    fn the_chunked_race_draws_the_token_by_token_race_on_every_kernel() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for kernel in Kernel::available() {
            let mut draws = 0;
            for (case, v) in [1, 3, 63, 64, 65, 200, 1000, 4099, 49152]
                .into_iter()
                .enumerate()
            {
                for trial in 0..[40, 40, 40, 40, 40, 40, 30, 20, 4][case] {
                    let kind = trial % 4;
                    let mut row: Vec<f32> = (0..v).map(|_| next()).collect();
                    match kind {
                        0 => row
                            .iter_mut()
                            .for_each(|x| *x = if *x < 0.3 { 0.0 } else { *x }),
                        1 => row.iter_mut().for_each(|x| *x = 1.0),
                        2 => row[v / 2] = 1e6,
                        _ => {}
                    }
                    if row.iter().all(|&x| x == 0.0) {
                        row[0] = 1.0;
                    }
                    let weights = Dist::Weights(row.clone());
                    let logits = Dist::Log(
                        row.iter()
                            .map(|&x| if x == 0.0 { f32::NEG_INFINITY } else { 8.0 * x })
                            .collect(),
                    );
                    let noise = RequestNoise {
                        seed: 77 + trial as u64,
                        step: case as u64,
                    };
                    for (d, label) in [(&weights, "weights"), (&logits, "logits")] {
                        for node in [0, 5] {
                            assert_eq!(
                                draw_with(kernel, d, &noise, node),
                                race(d, &noise, node),
                                "{kernel:?} {label} V={v} trial {trial} node {node}"
                            );
                            draws += v;
                        }
                    }
                }
            }
            assert!(draws > 1 << 20, "{draws} tokens raced");
        }
    }

    /// Exact ties at the top, built from the noise itself (`w = E` gives the key 1.0 exactly, `z = ln E` the key
    /// 0.0), within a chunk, across chunks and in the last partial chunk, go to the first tied token; rows with
    /// one token of mass, in the first, a middle or the last partial chunk, skip the empty chunks and draw it.
    #[test]
    fn ties_go_to_the_first_token_and_single_tokens_are_found_on_every_kernel() {
        let v = 300;
        let noise = RequestNoise { seed: 11, step: 3 };
        let node = 2;
        let e = |x: usize| noise.token_exponential(node, x as u32);
        for kernel in Kernel::available() {
            for tied in [
                vec![70, 100],
                vec![100, 130],
                vec![130, 299],
                vec![5, 6, 250],
            ] {
                let mut weights = vec![0.0f32; v];
                let mut logits = vec![f32::NEG_INFINITY; v];
                for &x in &tied {
                    weights[x] = e(x);
                    logits[x] = noise::ln(e(x));
                }
                for d in [Dist::Weights(weights), Dist::Log(logits)] {
                    assert_eq!(
                        draw_with(kernel, &d, &noise, node),
                        tied[0],
                        "{kernel:?} ties {tied:?}"
                    );
                    assert_eq!(
                        race(&d, &noise, node),
                        tied[0],
                        "the reference, ties {tied:?}"
                    );
                }
            }
            for x in [0, 63, 64, 150, 299] {
                let mut weights = vec![0.0f32; v];
                weights[x] = 0.25;
                let mut logits = vec![f32::NEG_INFINITY; v];
                logits[x] = -3.0;
                for d in [Dist::Weights(weights), Dist::Log(logits)] {
                    assert_eq!(
                        draw_with(kernel, &d, &noise, node),
                        x,
                        "{kernel:?} single token {x}"
                    );
                }
            }
        }
    }
}
