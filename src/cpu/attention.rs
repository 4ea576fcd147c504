//! Tree attention over a paged KV cache and accepted-path compaction, on the CPU: the KV append, RoPE and the
//! checks here, the attention itself in f32 by the kernel of `attention_kernel.rs` (AVX-512, AVX2 and FMA, or
//! portable) on the backend's threads. Semantics, layouts and rules: [`crate::attention`]. The readable f64 reference the
//! tests hold both this and `cuda/tree_attention.cu` to is `Problem::reference` in `tests/common/attention.rs`.

use rayon::prelude::*;

use super::attention_kernel::{attend, WorkItem};
use super::simd::Kernel;

use crate::attention::{
    rotate_pair, CompactionShape, KvCompaction, TreeAttentionInputs, TreeAttentionOutputs,
    TreeAttentionShape, TreeBatch, TreeRequest,
};
use crate::backend::{Backend, Out, Stream};
use crate::dtype::HalfElement;
use crate::error::{Error, Result};
use crate::status::{settle, write_statuses, RequestResult, RequestStatus};

/// Tree attention with the tree's KV appended to the cache (see [`crate::attention`]) on host slices,
/// shorthand for [`Backend::Cpu.tree_attention`](crate::backend::Backend::tree_attention): writes the (rotated)
/// keys and the values of every node to `k_cache` / `v_cache` at slots `L_b + i`, `out[N, Hq, D]` and, if
/// given, `lse[N, Hq]`. Every request is checked before anything is written.
///
/// `request_status` (`[B]`, [`crate::RequestStatus`] codes), as the CUDA kernel writes it: when given, a bad
/// request is flagged alone (nothing appended to the cache for it, NaN in its rows of `out` and `lse`, or
/// nothing at all when its `token_offsets` are broken, as its rows are then unknown) and the others are
/// computed. Without it, the first bad request's error fails the call and nothing is written.
#[allow(clippy::too_many_arguments)]
pub fn tree_attention<T: HalfElement>(
    shape: &TreeAttentionShape,
    q: &[T],
    k: &[T],
    v: &[T],
    batch: &TreeBatch<'_>,
    cos_sin_cache: Option<&[f32]>,
    softmax_scale: f32,
    k_cache: &mut [T],
    v_cache: &mut [T],
    out: &mut [T],
    lse: Option<&mut [f32]>,
    request_status: Option<&mut [i32]>,
) -> Result<()> {
    let inputs = TreeAttentionInputs {
        shape: *shape,
        q: q.into(),
        k: k.into(),
        v: v.into(),
        token_offsets: batch.token_offsets.into(),
        parents: batch.parents.into(),
        prefix_lens: batch.prefix_lens.into(),
        page_table: batch.page_table.into(),
        cos_sin_cache: cos_sin_cache.map(Into::into),
        softmax_scale,
    };
    let outputs = TreeAttentionOutputs {
        k_cache: k_cache.into(),
        v_cache: v_cache.into(),
        out: out.into(),
        lse: lse.map(Into::into),
        request_status: request_status.map(Into::into),
    };
    Backend::Cpu.tree_attention(Stream::Default, &inputs, outputs)
}

/// The CPU tree attention, on arrays whose lengths the caller checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tree_attention_checked<T: HalfElement>(
    shape: &TreeAttentionShape,
    q: &[T],
    k: &[T],
    v: &[T],
    batch: &TreeBatch<'_>,
    cos_sin_cache: Option<&[f32]>,
    softmax_scale: f32,
    k_cache: &mut [T],
    v_cache: &mut [T],
    out: &mut [T],
    lse: Option<&mut [f32]>,
    request_status: Option<&mut [i32]>,
) -> Result<()> {
    let checked: Vec<RequestResult<TreeRequest>> = (0..shape.num_requests)
        .map(|b| {
            shape.check_request(
                b,
                batch.token_offsets,
                batch.parents,
                batch.prefix_lens,
                batch.page_table,
            )
        })
        .collect();
    let (requests, statuses) = settle(checked, request_status.as_deref())?;
    check_distinct_append_slots(shape, &requests, batch.page_table)?;
    let (hq, hkv, d) = (
        shape.num_q_heads,
        shape.cache.num_kv_heads,
        shape.cache.head_dim,
    );
    let (q_rot, k_rot) = match (shape.rope, cos_sin_cache) {
        (Some(rope), Some(cos_sin)) => {
            let mut q_rot = q.to_vec();
            let mut k_rot = k.to_vec();
            for request in requests.iter().flatten() {
                for (i, &depth) in request.depths.iter().enumerate() {
                    let row = request.first_row + i;
                    let angles = &cos_sin[(request.prefix_len + depth) * d..][..d];
                    for head in q_rot[row * hq * d..][..hq * d].chunks_mut(d) {
                        rotate_head(head, angles, rope.style);
                    }
                    for head in k_rot[row * hkv * d..][..hkv * d].chunks_mut(d) {
                        rotate_head(head, angles, rope.style);
                    }
                }
            }
            (q_rot, k_rot)
        }
        _ => (q.to_vec(), k.to_vec()),
    };

    for (b, request) in requests.iter().enumerate() {
        let Some(request) = request else { continue };
        for i in 0..request.tree_size() {
            let row = request.first_row + i;
            for head in 0..hkv {
                let at = shape
                    .cache
                    .slot_offset(batch.page_table, b, request.prefix_len + i, head);
                let from = (row * hkv + head) * d;
                k_cache[at..at + d].copy_from_slice(&k_rot[from..from + d]);
                v_cache[at..at + d].copy_from_slice(&v[from..from + d]);
            }
        }
    }

    // One work item per (request, KV head), on the backend's threads: its keys (the prefix from the cache, then
    // the tree's rotated keys) transposed into f32, its values and its group's query rows in f32, then the
    // kernel. Rows outside every request are left as they are.
    let kernel = Kernel::detect();
    let group = shape.group_size();
    let (k_cache, v_cache) = (&*k_cache, &*v_cache);
    let items: Vec<(usize, usize)> = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.as_ref().is_some_and(|r| r.tree_size() > 0))
        .flat_map(|(b, _)| (0..hkv).map(move |kv_head| (b, kv_head)))
        .collect();
    // Per item: `[T * G, D]` outputs and `[T * G]` log-sum-exps, node-major.
    let results: Vec<(Vec<T>, Vec<f32>)> = super::pool::install(|| {
        items
            .par_iter()
            .map(|&(b, kv_head)| {
                let request = requests[b]
                    .as_ref()
                    .expect("items of processed requests only");
                let (prefix, nodes) = (request.prefix_len, request.tree_size());
                let n = prefix + nodes;
                // Key and value rows: the prefix's from the cache, then the tree's.
                let rows = |j: usize| -> (&[T], &[T]) {
                    if j < prefix {
                        let at = shape.cache.slot_offset(batch.page_table, b, j, kv_head);
                        (&k_cache[at..at + d], &v_cache[at..at + d])
                    } else {
                        let at = ((request.first_row + j - prefix) * hkv + kv_head) * d;
                        (&k_rot[at..at + d], &v[at..at + d])
                    }
                };
                let mut keys_t = vec![0.0f32; d * n];
                let mut values = vec![0.0f32; n * d];
                // Transposed by tiles of TILE keys, so that the writes to `keys_t` are TILE floats long.
                const TILE: usize = 16;
                let mut tile = vec![0.0f32; TILE * d];
                for first in (0..n).step_by(TILE) {
                    let width = TILE.min(n - first);
                    for (t, j) in (first..first + width).enumerate() {
                        let (key, value) = rows(j);
                        for (f, x) in tile[t * d..(t + 1) * d].iter_mut().zip(key) {
                            *f = x.to_f32();
                        }
                        for (f, x) in values[j * d..(j + 1) * d].iter_mut().zip(value) {
                            *f = x.to_f32();
                        }
                    }
                    for e in 0..d {
                        let column = &mut keys_t[e * n + first..][..width];
                        for (t, f) in column.iter_mut().enumerate() {
                            *f = tile[t * d + e];
                        }
                    }
                }
                let queries: Vec<f32> = (0..nodes)
                    .flat_map(|i| {
                        let row = request.first_row + i;
                        q_rot[(row * hq + kv_head * group) * d..][..group * d].iter()
                    })
                    .map(|x| x.to_f32())
                    .collect();
                let item = WorkItem {
                    request,
                    keys_t: &keys_t,
                    values: &values,
                    queries: &queries,
                    group,
                    head_dim: d,
                    scale: softmax_scale,
                };
                let mut out = vec![T::from_f32(0.0); nodes * group * d];
                let mut lse = vec![0.0f32; nodes * group];
                attend(kernel, &item, &mut out, &mut lse, T::from_f64);
                (out, lse)
            })
            .collect()
    });

    let mut lse = lse;
    for (&(b, kv_head), (item_out, item_lse)) in items.iter().zip(results) {
        let request = requests[b]
            .as_ref()
            .expect("items of processed requests only");
        for node in 0..request.tree_size() {
            // The group's q heads are adjacent in a row of `out` and `lse`.
            let row = request.first_row + node;
            let heads = row * hq + kv_head * group;
            out[heads * d..][..group * d]
                .copy_from_slice(&item_out[node * group * d..][..group * d]);
            if let Some(lse) = lse.as_deref_mut() {
                lse[heads..heads + group].copy_from_slice(&item_lse[node * group..][..group]);
            }
        }
    }
    // A flagged request's rows, where its offsets say which they are: NaN, as the CUDA kernel writes.
    for (b, &status) in statuses.iter().enumerate() {
        if status == RequestStatus::Ok || status == RequestStatus::Offsets {
            continue;
        }
        let rows = batch.token_offsets[b] as usize..batch.token_offsets[b + 1] as usize;
        out[rows.start * hq * d..rows.end * hq * d].fill(T::from_f32(f32::NAN));
        if let Some(lse) = lse.as_deref_mut() {
            lse[rows.start * hq..rows.end * hq].fill(f32::NAN);
        }
    }
    write_statuses(&statuses, request_status);
    Ok(())
}

/// Rotates one head in place by the rule of [`crate::attention`].
fn rotate_head<T: HalfElement>(head: &mut [T], angles: &[f32], style: crate::attention::RopeStyle) {
    let d = head.len();
    for j in 0..d / 2 {
        let (a, b) = style.pair(j, d);
        let (x, y) = rotate_pair(
            head[a].to_f32(),
            head[b].to_f32(),
            angles[j],
            angles[d / 2 + j],
        );
        head[a] = T::from_f32(x);
        head[b] = T::from_f32(y);
    }
}

/// Two requests appending to the same cache row is a caller's error the kernels cannot see; the reference
/// names it.
fn check_distinct_append_slots(
    shape: &TreeAttentionShape,
    requests: &[Option<TreeRequest>],
    page_table: &[i32],
) -> Result<()> {
    let mut owner = std::collections::HashMap::new();
    for (b, request) in requests.iter().enumerate() {
        let Some(request) = request else { continue };
        for i in 0..request.tree_size() {
            let slot = request.prefix_len + i;
            let row = shape.cache.slot_offset(page_table, b, slot, 0);
            if let Some(other) = owner.insert(row, b) {
                if other != b {
                    return Err(Error::invalid(
                        format!("page_table[{}]", b * shape.cache.pages_per_request + slot / shape.cache.page_size),
                        format!(
                            "maps request {b}'s append slot {slot} to a cache row request {other} also appends to"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Compaction of accepted paths (see [`crate::attention`]) in every layer's cache: `k_caches[layer]` and
/// `v_caches[layer]`, each `[num_pages, page_size, Hkv, D]`, on host slices: shorthand for
/// [`Backend::Cpu.tree_kv_compact`](crate::backend::Backend::tree_kv_compact). Every request is checked before
/// anything moves. With `request_status` (`[B]`), a bad request is flagged alone and nothing of it moves;
/// without it, the first bad request's error fails the call.
#[allow(clippy::too_many_arguments)]
pub fn tree_kv_compact<T: Copy>(
    shape: &CompactionShape,
    accepted_offsets: &[i32],
    accepted_nodes: &[i32],
    prefix_lens: &[i32],
    page_table: &[i32],
    k_caches: &mut [&mut [T]],
    v_caches: &mut [&mut [T]],
    request_status: Option<&mut [i32]>,
) -> Result<()> {
    let args = KvCompaction {
        shape: *shape,
        accepted_offsets: accepted_offsets.into(),
        accepted_nodes: accepted_nodes.into(),
        prefix_lens: prefix_lens.into(),
        page_table: page_table.into(),
        k_caches: k_caches.iter_mut().map(|c| Out::Host(c)).collect(),
        v_caches: v_caches.iter_mut().map(|c| Out::Host(c)).collect(),
        request_status: request_status.map(Into::into),
    };
    Backend::Cpu.tree_kv_compact(Stream::Default, args)
}

/// The CPU compaction, on arrays whose lengths the caller checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tree_kv_compact_checked<'a, T: Copy>(
    shape: &CompactionShape,
    accepted_offsets: &[i32],
    accepted_nodes: &[i32],
    prefix_lens: &[i32],
    page_table: &[i32],
    k_caches: &mut [&'a mut [T]],
    v_caches: &mut [&'a mut [T]],
    request_status: Option<&mut [i32]>,
) -> Result<()> {
    let checked = (0..shape.num_requests)
        .map(|b| shape.check_request(b, accepted_offsets, accepted_nodes, prefix_lens, page_table))
        .collect();
    let (requests, statuses) = settle(checked, request_status.as_deref())?;

    let d = shape.cache.head_dim;
    for cache in k_caches.iter_mut().chain(v_caches.iter_mut()) {
        for (b, (prefix_len, nodes)) in requests
            .iter()
            .enumerate()
            .filter_map(|(b, r)| Some((b, r.as_ref()?)))
        {
            // Ascending order is safe in place: the source slot of a later entry is above every earlier
            // destination (nodes are strictly increasing, so node_j >= j).
            for (j, &node) in nodes.iter().enumerate() {
                if node as usize == j {
                    continue;
                }
                for head in 0..shape.cache.num_kv_heads {
                    let from =
                        shape
                            .cache
                            .slot_offset(page_table, b, prefix_len + node as usize, head);
                    let to = shape.cache.slot_offset(page_table, b, prefix_len + j, head);
                    cache.copy_within(from..from + d, to);
                }
            }
        }
    }
    write_statuses(&statuses, request_status);
    Ok(())
}
