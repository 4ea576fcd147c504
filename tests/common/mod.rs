//! Test support: seeded random cases and a naive, independent reference for greedy verification.
#![allow(dead_code)]

pub mod attention;
pub mod device;
pub mod greedy;
#[cfg(feature = "cuda")]
pub mod guarded;
pub mod int4;
pub mod sampling;
pub mod stats;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
#[cfg(feature = "cuda")]
use specdec::cuda::CudaBackend;
use specdec::LogitsElement;

/// The device-0 backend, or `None` after printing why the calling test is skipped; with
/// `SPECDEC_REQUIRE_GPU=1` a missing GPU fails the test instead.
#[cfg(feature = "cuda")]
pub fn gpu(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(backend) => Some(backend),
        Err(e) if std::env::var("SPECDEC_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("{test}: SPECDEC_REQUIRE_GPU=1 but CUDA is unusable: {e}")
        }
        Err(e) => {
            // Written to the stderr handle rather than with eprintln!, which the test harness captures.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no usable GPU: {e}");
            None
        }
    }
}

/// A fresh seed per run (printed, so a failure can be replayed), or `SPECDEC_TEST_SEED` when set.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("SPECDEC_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            (nanos as u64) ^ 0x9E37_79B9_7F4A_7C15
        });
    eprintln!("{test}: seed {seed} (replay with SPECDEC_TEST_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// Logits types the tests generate from f32 values.
pub trait TestElement: LogitsElement + device::Element {
    fn from_f32(x: f32) -> Self;
}
impl TestElement for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl TestElement for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}
impl TestElement for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Argmax written the obvious way, independently of specdec's bit-level keys: the first NaN if any, else the
/// first element equal to the maximum (so -0.0 and +0.0 tie and the lower index wins).
pub fn naive_argmax<T: LogitsElement>(row: &[T]) -> usize {
    let values: Vec<f64> = row.iter().map(|x| f64::from(x.to_f32())).collect();
    if let Some(i) = values.iter().position(|v| v.is_nan()) {
        return i;
    }
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    values.iter().position(|&v| v == max).unwrap()
}

/// One greedy-verification problem.
pub struct GreedyCase<T> {
    pub vocab_size: usize,
    pub logits: Vec<T>,
    pub draft_offsets: Vec<i32>,
    pub draft_tokens: Vec<i32>,
    pub emit_width: usize,
}

/// The outputs of greedy verification, `request_status` included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreedyOutput {
    pub accepted: Vec<i32>,
    pub emitted: Vec<i32>,
    pub status: Vec<i32>,
}

/// A value none of the kernels writes: outputs are filled with it before each run, so an element the kernel
/// forgot stands out.
pub const POISON: i32 = 0x05EE_DBAD;

impl GreedyOutput {
    pub fn poisoned(num_requests: usize, emit_width: usize) -> Self {
        GreedyOutput {
            accepted: vec![POISON; num_requests],
            emitted: vec![POISON; num_requests * emit_width],
            status: vec![POISON; num_requests],
        }
    }
}

impl<T: TestElement> GreedyCase<T> {
    pub fn num_requests(&self) -> usize {
        self.draft_offsets.len() - 1
    }

    pub fn emitted_len(&self) -> usize {
        self.num_requests() * self.emit_width
    }

    /// Random ragged drafts of 0..=max_drafts tokens (the first request gets 0 and the last max_drafts, when
    /// there are two or more), logits drawn so that ties happen (`tie_prone`: small integers) or not, and each
    /// draft equal to its row's argmax with probability `match_probability`, so acceptance runs vary in length.
    pub fn random(
        rng: &mut impl Rng,
        num_requests: usize,
        vocab_size: usize,
        max_drafts: usize,
        match_probability: f64,
        tie_prone: bool,
    ) -> Self {
        let mut draft_offsets = vec![0i32];
        for b in 0..num_requests {
            let k = match b {
                0 if num_requests > 1 => 0,
                _ if b + 1 == num_requests && num_requests > 1 => max_drafts,
                _ => rng.random_range(0..=max_drafts),
            };
            draft_offsets.push(draft_offsets[b] + k as i32);
        }
        let rows = *draft_offsets.last().unwrap() as usize + num_requests;
        let logits: Vec<T> = (0..rows * vocab_size)
            .map(|_| {
                if tie_prone {
                    T::from_f32(rng.random_range(0..4) as f32)
                } else {
                    T::from_f32(rng.random_range(-8.0f32..8.0))
                }
            })
            .collect();
        let mut draft_tokens = Vec::new();
        for b in 0..num_requests {
            for j in 0..(draft_offsets[b + 1] - draft_offsets[b]) as usize {
                let row = draft_offsets[b] as usize + b + j;
                let token = if rng.random_bool(match_probability) {
                    naive_argmax(&logits[row * vocab_size..(row + 1) * vocab_size])
                } else {
                    rng.random_range(0..vocab_size)
                };
                draft_tokens.push(token as i32);
            }
        }
        GreedyCase {
            vocab_size,
            logits,
            draft_offsets,
            draft_tokens,
            emit_width: max_drafts + 1,
        }
    }

    /// The expected outputs with `request_status`, computed naively (valid offsets and draft ids assumed).
    pub fn expected(&self) -> GreedyOutput {
        let v = self.vocab_size;
        let mut out = GreedyOutput {
            accepted: vec![0; self.num_requests()],
            emitted: vec![-1; self.num_requests() * self.emit_width],
            status: vec![0; self.num_requests()],
        };
        for b in 0..self.num_requests() {
            let first = self.draft_offsets[b] as usize;
            let drafts = &self.draft_tokens[first..self.draft_offsets[b + 1] as usize];
            // Every row of the request, past its first mismatch too, must be free of NaN and +inf and hold a
            // finite logit (the documented rule); otherwise the request is flagged.
            let unusable = (first + b..=first + b + drafts.len()).any(|row| {
                let values = self.logits[row * v..(row + 1) * v]
                    .iter()
                    .map(|x| x.to_f32());
                values.clone().any(|x| x.is_nan() || x == f32::INFINITY)
                    || values.clone().all(|x| x == f32::NEG_INFINITY)
            });
            if unusable {
                out.accepted[b] = -1;
                out.status[b] = specdec::RequestStatus::RowValues.code();
                continue;
            }
            for j in 0..=drafts.len() {
                let row = first + b + j;
                let target = naive_argmax(&self.logits[row * v..(row + 1) * v]) as i32;
                out.emitted[b * self.emit_width + j] = target;
                if j == drafts.len() || drafts[j] != target {
                    out.accepted[b] = j as i32;
                    break;
                }
            }
        }
        out
    }

    /// The CPU backend's outputs with `request_status`: bad requests flagged alone.
    pub fn run_cpu(&self) -> specdec::Result<GreedyOutput> {
        self.run(&device::TestDevice::cpu(), true, 0)
    }

    /// The CPU backend without `request_status`: the first bad request fails the call (statuses read 0).
    pub fn run_cpu_strict(&self) -> specdec::Result<GreedyOutput> {
        self.run(&device::TestDevice::cpu(), false, 0)
    }

    /// The outputs on `device`, poisoned before the call, with or without `request_status` (statuses read
    /// [`POISON`] without it); `logits_offset` starts the logits that many elements into their array (rows
    /// not 16-byte aligned on a device).
    pub fn run(
        &self,
        device: &device::TestDevice,
        with_status: bool,
        logits_offset: usize,
    ) -> specdec::Result<GreedyOutput> {
        use specdec::greedy::{GreedyInputs, GreedyOutputs};
        let poisoned = GreedyOutput::poisoned(self.num_requests(), self.emit_width);
        let mut shifted = vec![T::from_f32(-1.0); logits_offset];
        shifted.extend_from_slice(&self.logits);
        let logits = device.upload(&shifted);
        let offsets = device.upload(&self.draft_offsets);
        let drafts = device.upload(&self.draft_tokens);
        let mut accepted = device.upload_with_spare(&poisoned.accepted, POISON);
        let mut emitted = device.upload_with_spare(&poisoned.emitted, POISON);
        let mut status = device.upload_with_spare(&poisoned.status, POISON);
        let inputs = GreedyInputs {
            logits: logits.input_from(logits_offset),
            vocab_size: self.vocab_size,
            draft_offsets: offsets.input(),
            draft_tokens: drafts.input(),
        };
        let outputs = GreedyOutputs {
            emit_width: self.emit_width,
            accepted_counts: accepted.output(),
            emitted_tokens: emitted.output(),
            request_status: with_status.then(|| status.output()),
        };
        device
            .backend
            .greedy_verify(device.stream(), &inputs, outputs)?;
        Ok(GreedyOutput {
            accepted: accepted.download(device),
            emitted: emitted.download(device),
            status: status.download(device),
        })
    }
}
