//! Launcher of rejection-sampling verification (`cuda/rejection_sampling.cu`). Semantics, layout and
//! validation: [`crate::sampling`].
//!
//! Chains and trees, point-mass and i.i.d. drafts, logits with temperature (0 included), top-k and top-p, or
//! probabilities: everything the CPU reference does.

use std::ffi::c_void;

use cudarc::driver::{result, sys};

use super::memory::{check_device_ptr, StreamScratch};
use super::params::SamplingArgs;
use super::{cuda_error, vocabulary_split, CudaBackend};
use crate::backend::{optional_device, In};
use crate::error::{Error, Result};
use crate::sampling::{Drafts, RowsKind, VerifyInputs, VerifyOutputs, VerifyShape};

const MODULE: &str = "rejection_sampling";
/// Threads per block; must match kThresholdThreads / kRowThreads / kWalkThreads / kResidualThreads in the .cu
/// file.
const THRESHOLD_THREADS: u32 = 256;
const ROW_THREADS: u32 = 256;
/// The vocabulary chunk of one SamplingRowKernel block. Fixed, never derived from the batch or the GPU, because the
/// chunks decide how a row's softmax sum is rounded: a request's tokens must not depend on the requests beside it
/// or on the SM count. 8192 is 8 rounds of 4 elements per thread; a chunk's partials are 20 bytes.
const ROW_CHUNK: usize = 8192;

/// `(chunk, chunks)` of a row of `vocab_size` (at least 1) for SamplingRowKernel: [`ROW_CHUNK`] each, the last
/// one shorter. Only the vocabulary size enters.
fn row_chunks(vocab_size: usize) -> (usize, u32) {
    (ROW_CHUNK, vocab_size.div_ceil(ROW_CHUNK).max(1) as u32)
}
const WALK_THREADS: u32 = 256;
const RESIDUAL_THREADS: u32 = 256;
/// The kernels by family (the indices below); each is instantiated per element type (`DTYPES`).
const KERNEL_FAMILIES: [&str; 4] = [
    "SamplingThresholdKernel",
    "SamplingRowKernel",
    "RejectionWalkKernel",
    "ResidualRaceKernel",
];
/// Element types: f32 (and probabilities), f16, bf16.
const DTYPES: [&str; 3] = ["f32", "f16", "bf16"];

/// The kernel of family `family` (an index into [`KERNEL_FAMILIES`]) for element type `dtype` (into [`DTYPES`]).
/// Names are checked against what ptxas compiled when the kernel is looked up (`module::entry_point`).
fn kernel_name(family: usize, dtype: usize) -> String {
    format!("{}_{}", KERNEL_FAMILIES[family], DTYPES[dtype])
}

/// Every kernel the launchers of this family can ask for (checked against the compiled ones by a test).
#[cfg(test)]
pub(super) fn kernel_names() -> Vec<String> {
    (0..KERNEL_FAMILIES.len())
        .flat_map(|family| (0..DTYPES.len()).map(move |dtype| kernel_name(family, dtype)))
        .collect()
}
const THRESHOLD: usize = 0;
const ROW: usize = 1;
const WALK: usize = 2;
const RESIDUAL: usize = 3;
/// `sizeof(ResidualJob)` in the .cu file: node, level, four floats, MAX_TREE_NODES + 1 doubles.
const RESIDUAL_JOB_BYTES: usize = 24 + 8 * (crate::tree::MAX_TREE_NODES + 1);
/// `sizeof(ThresholdState)` in the .cu file: 256 bins and two sums of 8 bytes, ten 4-byte fields.
const THRESHOLD_STATE_BYTES: usize = 8 * 258 + 4 * 10;
/// Passes of SamplingThresholdKernel (kThresholdPasses): 0-3 top-k, 4-9 top-p.
const TOP_K_PASSES: std::ops::Range<i32> = 0..4;
const TOP_P_PASSES: std::ops::Range<i32> = 4..10;

/// Raw device pointers of one call (0 for an absent optional array), after validation by [`Self::check`].
pub(crate) struct SamplingDevicePtrs {
    pub kind: RowsKind,
    pub target: sys::CUdeviceptr,
    pub draft: sys::CUdeviceptr,
    pub offsets: sys::CUdeviceptr,
    pub tokens: sys::CUdeviceptr,
    pub parents: sys::CUdeviceptr,
    pub temperature: sys::CUdeviceptr,
    pub top_k: sys::CUdeviceptr,
    pub top_p: sys::CUdeviceptr,
    pub draft_temperature: sys::CUdeviceptr,
    pub draft_top_k: sys::CUdeviceptr,
    pub draft_top_p: sys::CUdeviceptr,
    pub seeds: sys::CUdeviceptr,
    pub steps: sys::CUdeviceptr,
    pub accepted: sys::CUdeviceptr,
    pub emitted: sys::CUdeviceptr,
    pub nodes: sys::CUdeviceptr,
    pub flags: sys::CUdeviceptr,
    pub status: sys::CUdeviceptr,
}

impl SamplingDevicePtrs {
    /// The device addresses of a call's arrays (each non-null unless empty, and aligned for its element), for
    /// arrays whose lengths `VerifyShape::of` has checked.
    pub(crate) fn of(inputs: &VerifyInputs<'_>, outputs: &VerifyOutputs<'_>) -> Result<Self> {
        let (offsets, tokens, parents) = match &inputs.drafts {
            Drafts::Chain {
                draft_offsets,
                draft_tokens,
            } => (
                draft_offsets.device("draft_offsets")?,
                draft_tokens.device("draft_tokens")?,
                0,
            ),
            Drafts::Tree {
                node_offsets,
                node_tokens,
                parents,
            } => (
                node_offsets.device("node_offsets")?,
                node_tokens.device("node_tokens")?,
                parents.device("parents")?,
            ),
        };
        let optional_in =
            |array: Option<&In<'_, f32>>, name: &str| array.map_or(Ok(0), |a| a.device(name));
        let (params, draft_params) = (inputs.params.as_ref(), inputs.draft_params.as_ref());
        Ok(SamplingDevicePtrs {
            kind: inputs.target.kind(),
            target: inputs.target.device("target")?,
            draft: inputs.draft.as_ref().map_or(Ok(0), |d| d.device("draft"))?,
            offsets,
            tokens,
            parents,
            temperature: optional_in(params.map(|p| &p.temperature), "temperature")?,
            top_k: params
                .and_then(|p| p.top_k.as_ref())
                .map_or(Ok(0), |k| k.device("top_k"))?,
            top_p: optional_in(params.and_then(|p| p.top_p.as_ref()), "top_p")?,
            draft_temperature: optional_in(
                draft_params.map(|p| &p.temperature),
                "draft_temperature",
            )?,
            draft_top_k: draft_params
                .and_then(|p| p.top_k.as_ref())
                .map_or(Ok(0), |k| k.device("draft_top_k"))?,
            draft_top_p: optional_in(draft_params.and_then(|p| p.top_p.as_ref()), "draft_top_p")?,
            seeds: inputs.seeds.device("seeds")?,
            steps: inputs.steps.device("steps")?,
            accepted: outputs.accepted_counts.device("accepted_counts")?,
            emitted: outputs.emitted_tokens.device("emitted_tokens")?,
            nodes: optional_device(&outputs.accepted_nodes, "accepted_nodes")?,
            flags: optional_device(&outputs.accept_flags, "accept_flags")?,
            status: optional_device(&outputs.request_status, "request_status")?,
        })
    }

    pub(crate) fn check(&self, shape: &VerifyShape) -> Result<()> {
        let (b, v, n) = (shape.num_requests, shape.vocab_size, shape.num_tokens);
        let size = self.kind.element_size();
        check_device_ptr("target", self.target, shape.target_rows() * v, size)?;
        // Optional arrays are 0 when absent.
        let optional = |name: &str, ptr: sys::CUdeviceptr, len: usize, align: usize| {
            if ptr == 0 {
                Ok(())
            } else {
                check_device_ptr(name, ptr, len, align)
            }
        };
        optional("draft", self.draft, shape.draft_rows() * v, size)?;
        let (offsets, tokens) = if shape.tree {
            check_device_ptr("parents", self.parents, n, 4)?;
            ("node_offsets", "node_tokens")
        } else {
            ("draft_offsets", "draft_tokens")
        };
        check_device_ptr(offsets, self.offsets, b + 1, 4)?;
        check_device_ptr(tokens, self.tokens, n, 4)?;
        match (self.kind.is_logits(), self.temperature != 0) {
            (true, false) if b > 0 => {
                return Err(Error::invalid(
                    "temperature",
                    "is missing; logits need a temperature per request (0 = greedy)",
                ))
            }
            (false, true) => {
                return Err(Error::invalid(
                    "temperature",
                    "probabilities take no sampling parameters",
                ))
            }
            _ => optional("temperature", self.temperature, b, 4)?,
        }
        for (name, ptr) in [("top_k", self.top_k), ("top_p", self.top_p)] {
            if ptr != 0 && !self.kind.is_logits() {
                return Err(Error::invalid(
                    name,
                    "probabilities take no sampling parameters",
                ));
            }
            optional(name, ptr, b, 4)?;
        }
        // The drafter's parameters: logits with draft rows only, top-k and top-p only with a temperature.
        let draft_params = [
            ("draft_temperature", self.draft_temperature),
            ("draft_top_k", self.draft_top_k),
            ("draft_top_p", self.draft_top_p),
        ];
        for (name, ptr) in draft_params {
            if ptr == 0 {
                continue;
            }
            if !self.kind.is_logits() || self.draft == 0 {
                return Err(Error::invalid(
                    name,
                    "applies to draft logits only: pass none without draft rows or with probabilities",
                ));
            }
            if self.draft_temperature == 0 {
                return Err(Error::invalid(
                    name,
                    "needs draft_temperature (without it the draft rows use the target's parameters)",
                ));
            }
            optional(name, ptr, b, 4)?;
        }
        for (name, ptr) in [("seeds", self.seeds), ("steps", self.steps)] {
            if ptr == 0 && b > 0 {
                return Err(crate::sampling::missing_noise_array(name));
            }
            check_device_ptr(name, ptr, b, 8)?;
        }
        check_device_ptr("accepted_counts", self.accepted, b, 4)?;
        let out = shape.output_len();
        check_device_ptr("emitted_tokens", self.emitted, out, 4)?;
        optional("accepted_nodes", self.nodes, out, 4)?;
        optional("accept_flags", self.flags, out, 1)?;
        optional("request_status", self.status, b, 4)
    }
}

// The kernels' argument block (generated from `SamplingArgs` in the .cu file), whose size the .cu file asserts.
const _: () = assert!(std::mem::size_of::<SamplingArgs>() == 38 * 8);

impl CudaBackend {
    /// Enqueues the three kernels. `shape` and `ptrs` are validated by the caller.
    pub(crate) fn launch_rejection_verify(
        &self,
        stream: sys::CUstream,
        shape: &VerifyShape,
        ptrs: &SamplingDevicePtrs,
    ) -> Result<()> {
        if shape.num_requests == 0 {
            return Ok(());
        }
        let _bound = self.bind()?;
        let dtype = match ptrs.kind {
            RowsKind::LogitsF32 | RowsKind::Probs => 0,
            RowsKind::LogitsF16 => 1,
            RowsKind::LogitsBF16 => 2,
        };
        let (any_top_k, any_top_p) = (
            ptrs.top_k != 0 || ptrs.draft_top_k != 0,
            ptrs.top_p != 0 || ptrs.draft_top_p != 0,
        );
        let thresholds = any_top_k || any_top_p;
        let residuals = ptrs.draft != 0;

        let (b, target_rows) = (shape.num_requests, shape.target_rows());
        let draft_rows = if residuals { shape.draft_rows() } else { 0 };
        let rows = target_rows + draft_rows;
        if rows > i32::MAX as usize {
            return Err(Error::invalid(
                "target",
                format!(
                    "{rows} target and draft rows exceed one launch ({} at most)",
                    i32::MAX
                ),
            ));
        }
        let (chunk, splits) = row_chunks(shape.vocab_size);
        if splits > 65535 {
            return Err(Error::invalid(
                "vocab_size",
                format!(
                    "is {}; the CUDA backend takes at most {} tokens (65535 chunks of {ROW_CHUNK})",
                    shape.vocab_size,
                    65535 * ROW_CHUNK
                ),
            ));
        }
        let (residual_chunk, residual_splits) =
            vocabulary_split(b, shape.vocab_size, self.multiprocessors(), 4);
        // One scratch allocation in 8-byte aligned parts: race keys, softmax statistics, row flags, the threshold
        // passes' state and per-chunk sums (top-k / top-p: 2.1 KB per row), and with draft rows the residual jobs, tickets and race partials, plus for trees one
        // residual row per request (a node with several i.i.d. children steps its residual there, O(V) per
        // rejection: 4 V bytes per request, 33 MB at B = 64, V = 128256).
        let partials = rows * splits as usize;
        let residual_rows_bytes = if residuals && shape.tree {
            b.checked_mul(shape.vocab_size)
                .and_then(|n| n.checked_mul(4))
                .map(|n| n.next_multiple_of(8))
                .ok_or_else(|| {
                    Error::invalid(
                        "num_requests",
                        format!(
                            "{b} trees of {} tokens need more residual scratch than the address space holds",
                            shape.vocab_size
                        ),
                    )
                })?
        } else {
            0
        };
        let parts = [
            target_rows * splits as usize * 8,
            partials * 8,
            (partials * 4).next_multiple_of(8),
            if thresholds {
                rows * THRESHOLD_STATE_BYTES
            } else {
                0
            },
            if thresholds { partials * 8 } else { 0 },
            if residuals { b * RESIDUAL_JOB_BYTES } else { 0 },
            if residuals {
                (b * 4).next_multiple_of(8)
            } else {
                0
            },
            if residuals {
                b * residual_splits as usize * 8
            } else {
                0
            },
            residual_rows_bytes,
        ];
        let scratch = StreamScratch::alloc(stream, parts.iter().sum())?;
        let mut at = [0u64; 9];
        for k in 1..parts.len() {
            at[k] = at[k - 1] + parts[k - 1] as u64;
        }
        let base = scratch.ptr();
        let part = |k: usize| if parts[k] == 0 { 0 } else { base + at[k] };

        let mut args = SamplingArgs {
            target: ptrs.target,
            draft: ptrs.draft,
            vocab_size: shape.vocab_size as i64,
            offsets: ptrs.offsets,
            num_requests: b as i64,
            tokens: ptrs.tokens,
            parents: ptrs.parents,
            num_tokens: shape.num_tokens as i64,
            is_tree: i64::from(shape.tree),
            temperature: ptrs.temperature,
            top_k: ptrs.top_k,
            top_p: ptrs.top_p,
            draft_temperature: ptrs.draft_temperature,
            draft_top_k: ptrs.draft_top_k,
            draft_top_p: ptrs.draft_top_p,
            seeds: ptrs.seeds,
            steps: ptrs.steps,
            emit_width: shape.emit_width as i64,
            accepted: ptrs.accepted,
            emitted: ptrs.emitted,
            nodes: ptrs.nodes,
            flags: ptrs.flags,
            status: ptrs.status,
            race: part(0),
            stats: part(1),
            row_flags: part(2),
            thresholds: part(3),
            threshold_sums: part(4),
            jobs: part(5),
            tickets: part(6),
            residual_race: part(7),
            residual_rows: part(8),
            residual_chunk: residual_chunk as i64,
            residual_splits: i64::from(residual_splits),
            target_rows: target_rows as i64,
            draft_rows: draft_rows as i64,
            chunk: chunk as i64,
            splits: i64::from(splits),
        };
        // The threshold passes carry their state from launch to launch in scratch that starts at zero ("no
        // filter yet"); rows of requests without top-k or top-p return at once in every pass.
        if thresholds && rows > 0 {
            // SAFETY: the part lies inside the scratch allocated above on this stream.
            unsafe { result::memset_d8_async(part(3), 0, parts[3], stream) }
                .map_err(|e| cuda_error("cuMemsetD8Async(threshold state)", e))?;
        }
        let mut threshold_passes = Vec::new();
        if any_top_k {
            threshold_passes.extend(TOP_K_PASSES);
        }
        if any_top_p {
            threshold_passes.extend(TOP_P_PASSES);
        }
        let threshold_launches = threshold_passes.into_iter().map(|pass| {
            (
                THRESHOLD,
                (rows as u32, splits, 1),
                THRESHOLD_THREADS,
                Some(pass),
                "cuLaunchKernel(SamplingThresholdKernel)",
            )
        });
        let row_and_walk = [
            (
                ROW,
                (rows as u32, splits, 1),
                ROW_THREADS,
                None,
                "cuLaunchKernel(SamplingRowKernel)",
            ),
            (
                WALK,
                (b as u32, 1, 1),
                WALK_THREADS,
                None,
                "cuLaunchKernel(RejectionWalkKernel)",
            ),
        ];
        let residual = residuals.then_some((
            RESIDUAL,
            (b as u32, residual_splits, 1),
            RESIDUAL_THREADS,
            None,
            "cuLaunchKernel(ResidualRaceKernel)",
        ));
        for (family, grid, threads, pass, name) in
            threshold_launches.chain(row_and_walk).chain(residual)
        {
            // A grid with no blocks has no work (a batch of empty trees has no rows), and the driver refuses it.
            if grid.0 == 0 || grid.1 == 0 {
                continue;
            }
            let function = self.function(MODULE, &kernel_name(family, dtype))?;
            let mut pass = pass.unwrap_or(0);
            let mut with_pass = [
                &mut args as *mut SamplingArgs as *mut c_void,
                &mut pass as *mut i32 as *mut c_void,
            ];
            let mut args_only = [&mut args as *mut SamplingArgs as *mut c_void];
            let params: &mut [*mut c_void] = if family == THRESHOLD {
                &mut with_pass
            } else {
                &mut args_only
            };
            // SAFETY: each kernel takes one SamplingArgs by value (the same layout, asserted on both sides), the
            // threshold kernel an int pass after it; every pointer in it was checked against the shape, and the
            // scratch parts are sized above. The kernels validate each request's contents before indexing with
            // them.
            unsafe { result::launch_kernel(function, grid, (threads, 1, 1), 0, stream, params) }
                .map_err(|e| cuda_error(name, e))?;
        }
        scratch.free()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptrs(kind: RowsKind) -> SamplingDevicePtrs {
        SamplingDevicePtrs {
            kind,
            target: 0x1000,
            draft: 0,
            offsets: 0x2000,
            tokens: 0x3000,
            parents: 0,
            temperature: 0,
            top_k: 0,
            top_p: 0,
            draft_temperature: 0,
            draft_top_k: 0,
            draft_top_p: 0,
            seeds: 0x4000,
            steps: 0x5000,
            accepted: 0x6000,
            emitted: 0x7000,
            nodes: 0,
            flags: 0,
            status: 0,
        }
    }

    fn invalid_argument(result: Result<()>) -> String {
        match result {
            Err(Error::InvalidArgument { argument, .. }) => argument,
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn pointer_checks_allow_absent_optional_arrays_and_name_the_bad_ones() {
        let chain = VerifyShape::new(2, 100, 6, false, 5).unwrap();
        let tree = VerifyShape::new(2, 100, 6, true, 5).unwrap();
        // Probabilities: no temperature, no draft rows, no optional outputs.
        ptrs(RowsKind::Probs).check(&chain).unwrap();
        // Logits need a temperature; probabilities refuse one.
        let logits = ptrs(RowsKind::LogitsBF16);
        assert_eq!(invalid_argument(logits.check(&chain)), "temperature");
        SamplingDevicePtrs {
            temperature: 0x8000,
            ..logits
        }
        .check(&chain)
        .unwrap();
        let probs = SamplingDevicePtrs {
            temperature: 0x8000,
            ..ptrs(RowsKind::Probs)
        };
        assert_eq!(invalid_argument(probs.check(&chain)), "temperature");
        // Trees need parents.
        assert_eq!(
            invalid_argument(ptrs(RowsKind::Probs).check(&tree)),
            "parents"
        );
        SamplingDevicePtrs {
            parents: 0x9000,
            ..ptrs(RowsKind::Probs)
        }
        .check(&tree)
        .unwrap();
        // Present arrays must be aligned for their elements; required ones must be present.
        let misaligned = SamplingDevicePtrs {
            draft: 0x1002,
            ..ptrs(RowsKind::Probs)
        };
        assert_eq!(invalid_argument(misaligned.check(&chain)), "draft");
        let misaligned = SamplingDevicePtrs {
            flags: 0x1001,
            ..ptrs(RowsKind::Probs)
        };
        misaligned.check(&chain).unwrap(); // bytes: any alignment
        let misaligned = SamplingDevicePtrs {
            seeds: 0x4004,
            ..ptrs(RowsKind::Probs)
        };
        assert_eq!(invalid_argument(misaligned.check(&chain)), "seeds");
        // Top-k and top-p: logits only, aligned.
        let with_top_k = SamplingDevicePtrs {
            top_k: 0xA000,
            ..ptrs(RowsKind::Probs)
        };
        assert_eq!(invalid_argument(with_top_k.check(&chain)), "top_k");
        let logits_top_p = SamplingDevicePtrs {
            temperature: 0x8000,
            top_p: 0xB000,
            ..ptrs(RowsKind::LogitsF16)
        };
        logits_top_p.check(&chain).unwrap();
        let misaligned = SamplingDevicePtrs {
            top_p: 0xB002,
            ..logits_top_p
        };
        assert_eq!(invalid_argument(misaligned.check(&chain)), "top_p");
        let missing = SamplingDevicePtrs {
            emitted: 0,
            ..ptrs(RowsKind::Probs)
        };
        assert_eq!(invalid_argument(missing.check(&chain)), "emitted_tokens");
    }

    #[test]
    fn the_drafters_parameters_need_draft_logits_and_a_temperature() {
        let chain = VerifyShape::new(2, 100, 6, false, 5).unwrap();
        let logits = SamplingDevicePtrs {
            temperature: 0x8000,
            draft: 0x9000,
            ..ptrs(RowsKind::LogitsBF16)
        };
        SamplingDevicePtrs {
            draft_temperature: 0xA000,
            draft_top_k: 0xB000,
            draft_top_p: 0xC000,
            ..logits
        }
        .check(&chain)
        .unwrap();
        // Top-k or top-p of the drafter without its temperature.
        let no_temperature = SamplingDevicePtrs {
            draft_top_k: 0xB000,
            ..logits
        };
        assert_eq!(
            invalid_argument(no_temperature.check(&chain)),
            "draft_top_k"
        );
        // Without draft rows, or on probabilities.
        let no_draft_rows = SamplingDevicePtrs {
            draft: 0,
            draft_temperature: 0xA000,
            ..logits
        };
        assert_eq!(
            invalid_argument(no_draft_rows.check(&chain)),
            "draft_temperature"
        );
        let probs = SamplingDevicePtrs {
            draft: 0x9000,
            draft_temperature: 0xA000,
            ..ptrs(RowsKind::Probs)
        };
        assert_eq!(invalid_argument(probs.check(&chain)), "draft_temperature");
        // Misaligned.
        let misaligned = SamplingDevicePtrs {
            draft_temperature: 0xA002,
            ..logits
        };
        assert_eq!(
            invalid_argument(misaligned.check(&chain)),
            "draft_temperature"
        );
    }
}
