//! Greedy verification on the CPU. Semantics and validation: [`crate::greedy`].

use std::cmp::Reverse;

use rayon::prelude::*;

use crate::backend::{Backend, Stream};
use crate::dtype::LogitsElement;
use crate::error::Result;
use crate::greedy::{GreedyInputs, GreedyOutputs, GreedyShape, REQUEST_INVALID};
use crate::status::{settle, write_statuses, RequestResult};

/// Rows longer than this are split into chunks of this many elements, reduced on several threads.
const PARALLEL_CHUNK: usize = 1 << 15;

/// The index of the largest element of `row` in specdec's order ([`LogitsElement::order_key`]): ties go to
/// the lowest index, and a NaN is above every number. Panics on an empty row.
pub fn argmax<T: LogitsElement>(row: &[T]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { argmax_avx2(row) };
    }
    argmax_lanes(row)
}

/// [`argmax_lanes`] compiled with AVX2, whose unsigned 32-bit compare and max the x86-64 baseline (SSE2)
/// lacks: the same code, vectorised 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn argmax_avx2<T: LogitsElement>(row: &[T]) -> usize {
    argmax_lanes(row)
}

#[inline(always)]
fn argmax_lanes<T: LogitsElement>(row: &[T]) -> usize {
    // One pass in 16 independent lanes, each keeping its largest key and where that key first occurred (the
    // strict comparison keeps the earliest), so the loop vectorises. Then the largest key over the lanes and
    // the tail, the lowest index among equals.
    const LANES: usize = 16;
    assert!(!row.is_empty(), "argmax of an empty row");
    let mut lane_key = [0u32; LANES];
    let mut lane_index = [0u32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for (c, chunk) in (&mut chunks).enumerate() {
        for lane in 0..LANES {
            let key = chunk[lane].order_key();
            let greater = key > lane_key[lane];
            lane_key[lane] = if greater { key } else { lane_key[lane] };
            lane_index[lane] = if greater {
                (c * LANES + lane) as u32
            } else {
                lane_index[lane]
            };
        }
    }
    // Every real key is above 0, so a lane that saw any element holds a real candidate; a lane that saw none
    // (a row shorter than 16) still has key 0 and loses to any real element.
    let lanes = lane_key
        .iter()
        .zip(&lane_index)
        .map(|(&k, &i)| (k, Reverse(i as usize)));
    let tail_start = row.len() - chunks.remainder().len();
    let tail = chunks
        .remainder()
        .iter()
        .enumerate()
        .map(|(i, x)| (x.order_key(), Reverse(tail_start + i)));
    let (_, Reverse(index)) = lanes.chain(tail).max().expect("row is not empty");
    index
}

/// [`argmax`] with a long row split across threads: the largest key wins, then the lowest index.
fn parallel_argmax<T: LogitsElement>(row: &[T]) -> usize {
    if row.len() <= PARALLEL_CHUNK {
        return argmax(row);
    }
    let (_, Reverse(index)) = row
        .par_chunks(PARALLEL_CHUNK)
        .enumerate()
        .map(|(c, chunk)| {
            let i = argmax(chunk);
            (chunk[i].order_key(), Reverse(c * PARALLEL_CHUNK + i))
        })
        .max()
        .expect("row is not empty");
    index
}

/// Greedy verification of a batch of drafted chains on host slices: shorthand for
/// [`Backend::Cpu.greedy_verify`](crate::backend::Backend::greedy_verify). See [`crate::greedy`] for the layout,
/// semantics and rules.
///
/// With `request_status` (`[B]`), a request that breaks a rule is flagged alone: its
/// [`RequestStatus`](crate::RequestStatus) code, `accepted_counts[b] = -1` and a row of -1, as the CUDA kernel
/// does. Without it, the first failing request's error is returned (naming the offending element) and nothing
/// is written.
///
/// ```
/// // Two requests over a vocabulary of 4: request 0 drafted [2, 1], request 1 drafted nothing.
/// let logits: Vec<f32> = vec![
///     0.0, 0.0, 9.0, 0.0, // request 0, position 0: argmax 2 = draft 0, accepted
///     0.0, 0.0, 0.0, 9.0, // request 0, position 1: argmax 3 != draft 1, so 3 is emitted
///     5.0, 0.0, 0.0, 0.0, // request 0, bonus row (not reached)
///     0.0, 7.0, 0.0, 0.0, // request 1, bonus row: emits 1
/// ];
/// let (mut accepted, mut emitted) = ([0; 2], [0; 2 * 3]);
/// specdec::cpu::greedy_verify(&logits, 4, &[0, 2, 2], &[2, 1], 3, &mut accepted, &mut emitted, None)?;
/// assert_eq!(accepted, [1, 0]);
/// assert_eq!(emitted, [2, 3, -1, 1, -1, -1]);
/// # Ok::<(), specdec::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn greedy_verify<T: LogitsElement>(
    logits: &[T],
    vocab_size: usize,
    draft_offsets: &[i32],
    draft_tokens: &[i32],
    emit_width: usize,
    accepted_counts: &mut [i32],
    emitted_tokens: &mut [i32],
    request_status: Option<&mut [i32]>,
) -> Result<()> {
    let inputs = GreedyInputs {
        logits: logits.into(),
        vocab_size,
        draft_offsets: draft_offsets.into(),
        draft_tokens: draft_tokens.into(),
    };
    let outputs = GreedyOutputs {
        emit_width,
        accepted_counts: accepted_counts.into(),
        emitted_tokens: emitted_tokens.into(),
        request_status: request_status.map(Into::into),
    };
    Backend::Cpu.greedy_verify(Stream::Default, &inputs, outputs)
}

/// The CPU implementation, on arrays whose lengths `shape` has checked.
pub(crate) fn verify<T: LogitsElement>(
    shape: &GreedyShape,
    logits: &[T],
    draft_offsets: &[i32],
    draft_tokens: &[i32],
    accepted_counts: &mut [i32],
    emitted_tokens: &mut [i32],
    request_status: Option<&mut [i32]>,
) -> Result<()> {
    let (vocab_size, emit_width) = (shape.vocab_size, shape.emit_width);
    // Every row's argmax, in parallel over rows and over chunks of long rows, as the CUDA kernel does: at small
    // batch that keeps every core busy, which stopping at each request's first mismatch would not.
    let targets: Vec<usize> = super::pool::install(|| {
        logits
            .par_chunks_exact(vocab_size)
            .map(|row| parallel_argmax(row))
            .collect()
    });
    let verify = |b: usize| -> RequestResult<(usize, &[usize])> {
        let drafts = shape.check_request(b, draft_offsets, draft_tokens)?;
        let first_row = draft_offsets[b] as usize + b;
        shape.check_row_owners(b, draft_offsets, first_row, drafts.len())?;
        let rows = first_row..=first_row + drafts.len();
        for row in rows.clone() {
            shape.check_row(row, logits[row * vocab_size + targets[row]], targets[row])?;
        }
        let targets = &targets[rows];
        let n = drafts
            .iter()
            .zip(targets)
            .take_while(|(&draft, &target)| draft as usize == target)
            .count();
        Ok((n, targets))
    };
    let checked: Vec<_> = (0..shape.num_requests).map(verify).collect();
    let (results, statuses) = settle(checked, request_status.as_deref())?;

    let outputs = accepted_counts
        .iter_mut()
        .zip(emitted_tokens.chunks_exact_mut(emit_width));
    for ((accepted, emitted), result) in outputs.zip(&results) {
        emitted.fill(-1);
        *accepted = match result {
            Some((n, targets)) => {
                for (slot, &token) in emitted.iter_mut().zip(&targets[..=*n]) {
                    *slot = token as i32;
                }
                *n as i32
            }
            None => REQUEST_INVALID,
        };
    }
    write_statuses(&statuses, request_status);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Where the CPU has AVX2 the tests elsewhere run the AVX2 build; this keeps the portable one checked too.
    #[test]
    fn portable_and_dispatched_argmax_agree() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in [1usize, 2, 15, 16, 17, 31, 33, 100, 1000, 40_000] {
            for _ in 0..20 {
                // Few distinct values (ties), and now and then a NaN, an infinity or a signed zero.
                let row: Vec<f32> = (0..len)
                    .map(|_| match next() % 50 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 => -0.0,
                        _ => (next() % 7) as f32 - 3.0,
                    })
                    .collect();
                assert_eq!(argmax(&row), argmax_lanes(&row), "f32 len {len}");
                let halves: Vec<f16> = row.iter().map(|&x| f16::from_f32(x)).collect();
                assert_eq!(argmax(&halves), argmax_lanes(&halves), "f16 len {len}");
                let brains: Vec<bf16> = row.iter().map(|&x| bf16::from_f32(x)).collect();
                assert_eq!(argmax(&brains), argmax_lanes(&brains), "bf16 len {len}");
            }
        }
    }
}
