//! Greedy verification on the CPU. Semantics and validation: [`crate::greedy`].

use rayon::prelude::*;

use crate::dtype::LogitsElement;
use crate::error::Result;
use crate::greedy::GreedyShape;

/// The index of the largest element of `row` in specdec's order ([`LogitsElement::order_key`]): ties go to
/// the lowest index, and a NaN is above every number. `row` must not be empty.
pub fn argmax<T: LogitsElement>(row: &[T]) -> usize {
    // Two passes keep each loop simple enough for the compiler to vectorise: the best key, then where it is.
    let best = row
        .iter()
        .map(|x| x.order_key())
        .max()
        .expect("argmax of an empty row");
    row.iter()
        .position(|x| x.order_key() == best)
        .expect("the maximum is in the row")
}

/// Greedy verification of a batch of drafted chains; see [`crate::greedy`] for the layout and semantics.
///
/// Inputs are validated in full before any output is written; the first bad element is named in the error.
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
/// specdec::cpu::greedy_verify(&logits, 4, &[0, 2, 2], &[2, 1], 3, &mut accepted, &mut emitted)?;
/// assert_eq!(accepted, [1, 0]);
/// assert_eq!(emitted, [2, 3, -1, 1, -1, -1]);
/// # Ok::<(), specdec::Error>(())
/// ```
pub fn greedy_verify<T: LogitsElement>(
    logits: &[T],
    vocab_size: usize,
    draft_offsets: &[i32],
    draft_tokens: &[i32],
    emit_width: usize,
    accepted_counts: &mut [i32],
    emitted_tokens: &mut [i32],
) -> Result<()> {
    let shape = GreedyShape::from_lengths(
        vocab_size,
        draft_offsets.len(),
        draft_tokens.len(),
        emit_width,
    )?;
    shape.check_lengths(
        logits.len(),
        draft_offsets.len(),
        draft_tokens.len(),
        accepted_counts.len(),
        emitted_tokens.len(),
    )?;
    for b in 0..shape.num_requests {
        shape.check_request(b, draft_offsets, draft_tokens)?;
    }

    accepted_counts
        .par_iter_mut()
        .zip(emitted_tokens.par_chunks_mut(emit_width.max(1)))
        .enumerate()
        .for_each(|(b, (accepted, emitted))| {
            let first = draft_offsets[b] as usize;
            let drafts = &draft_tokens[first..draft_offsets[b + 1] as usize];
            let rows = logits[(first + b) * vocab_size..].chunks_exact(vocab_size);
            emitted.fill(-1);
            let mut n = 0;
            for (j, row) in rows.take(drafts.len() + 1).enumerate() {
                let target = argmax(row) as i32;
                emitted[j] = target;
                if drafts.get(j) != Some(&target) {
                    break;
                }
                n += 1;
            }
            *accepted = n as i32;
        });
    Ok(())
}
