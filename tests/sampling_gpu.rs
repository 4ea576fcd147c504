//! Rejection-sampling verification on the GPU: the same exactness scenarios as the CPU (tests/common/sampling.rs,
//! false-failure probability below 1e-6 per file), identical tokens to the CPU reference where the documented
//! rules promise it, a counted (and bounded) disagreement rate where softmax sums round differently, and bad
//! requests flagged per request without touching anything else. Outputs are poisoned before every launch.
//!
//! Without a usable GPU every test prints why it was skipped and passes; with `SPECDEC_REQUIRE_GPU=1` it fails.

mod common;

use std::sync::Arc;

use common::device::{Array, TestDevice};
use common::gpu;
use common::sampling::{self, Input, Model, Outcome, Scenario, Shape, Verify, PLAIN};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use half::{bf16, f16};
use rand::Rng;
use specdec::backend::{Backend, In, Out, Stream};
use specdec::cuda::{DeviceIn, DeviceOut};
use specdec::sampling::{Drafts, Rows, SamplingParams, VerifyInputs, VerifyOutputs};
use specdec::Error;

const CPU: Verify = specdec::cpu::rejection_verify;
const GPU: Verify = gpu_verify;
const POISON: i32 = i32::MIN + 7;

/// A device copy of `host` with one spare element (cudarc rejects empty copies).
fn upload<T: DeviceRepr + Default + Clone>(stream: &Arc<CudaStream>, host: &[T]) -> CudaSlice<T> {
    let mut v = host.to_vec();
    v.push(T::default());
    stream.clone_htod(&v).expect("upload")
}

/// The device address of `slice`, for the raw-pointer constructors.
fn raw<T>(slice: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (ptr, _sync) = slice.device_ptr(stream);
    ptr
}

/// The host slice of a host-described call's array.
fn host<'a, T>(array: &In<'a, T>) -> &'a [T] {
    match array {
        In::Host(slice) => slice,
        In::Device(_) => panic!("the harness describes calls in host memory"),
    }
}

/// Runs a host-described call on the GPU through the one backend contract: uploads every array, poisons the
/// outputs, verifies on the device's stream, downloads (checking nothing was written past any output). The
/// statistical harness only passes valid inputs.
fn gpu_verify(inputs: &VerifyInputs<'_>, outputs: VerifyOutputs<'_>) -> Result<(), Error> {
    let device = TestDevice::cuda("gpu_verify").expect("the GPU tests run only with a usable GPU");
    let rows = |rows: &Rows<'_>| match rows {
        Rows::LogitsF32(r) => RowsOn::F32(device.upload(host(r)), false),
        Rows::Probs(r) => RowsOn::F32(device.upload(host(r)), true),
        Rows::LogitsF16(r) => RowsOn::F16(device.upload(host(r))),
        Rows::LogitsBF16(r) => RowsOn::BF16(device.upload(host(r))),
    };
    let (target, draft) = (rows(&inputs.target), inputs.draft.as_ref().map(rows));
    let drafts: Vec<Array<i32>> = match &inputs.drafts {
        Drafts::Chain {
            draft_offsets,
            draft_tokens,
        } => vec![
            device.upload(host(draft_offsets)),
            device.upload(host(draft_tokens)),
        ],
        Drafts::Tree {
            node_offsets,
            node_tokens,
            parents,
        } => vec![
            device.upload(host(node_offsets)),
            device.upload(host(node_tokens)),
            device.upload(host(parents)),
        ],
    };
    let params = |p: &Option<SamplingParams<'_>>| {
        p.as_ref().map(|p| {
            (
                device.upload(host(&p.temperature)),
                p.top_k.as_ref().map(|k| device.upload(host(k))),
                p.top_p.as_ref().map(|t| device.upload(host(t))),
            )
        })
    };
    let (target_params, draft_params) = (params(&inputs.params), params(&inputs.draft_params));
    let (seeds, steps) = (
        device.upload(host(&inputs.seeds)),
        device.upload(host(&inputs.steps)),
    );
    let poisoned = |len: usize| device.upload_with_spare(&vec![POISON; len], POISON);
    let mut accepted = poisoned(outputs.accepted_counts.len());
    let mut emitted = poisoned(outputs.emitted_tokens.len());
    let mut nodes = outputs.accepted_nodes.as_ref().map(|n| poisoned(n.len()));
    let mut flags = outputs
        .accept_flags
        .as_ref()
        .map(|f| device.upload_with_spare(&vec![i8::MIN; f.len()], i8::MIN));
    let mut status = outputs.request_status.as_ref().map(|s| poisoned(s.len()));
    let device_inputs = VerifyInputs {
        vocab_size: inputs.vocab_size,
        drafts: match &inputs.drafts {
            Drafts::Chain { .. } => Drafts::Chain {
                draft_offsets: drafts[0].input(),
                draft_tokens: drafts[1].input(),
            },
            Drafts::Tree { .. } => Drafts::Tree {
                node_offsets: drafts[0].input(),
                node_tokens: drafts[1].input(),
                parents: drafts[2].input(),
            },
        },
        target: target.input(),
        draft: draft.as_ref().map(RowsOn::input),
        params: device_params(&target_params),
        draft_params: device_params(&draft_params),
        seeds: seeds.input(),
        steps: steps.input(),
    };
    let device_outputs = VerifyOutputs {
        emit_width: outputs.emit_width,
        accepted_counts: accepted.output(),
        emitted_tokens: emitted.output(),
        accepted_nodes: nodes.as_mut().map(Array::output),
        accept_flags: flags.as_mut().map(Array::output),
        request_status: status.as_mut().map(Array::output),
    };
    device
        .backend
        .rejection_verify(device.stream(), &device_inputs, device_outputs)?;
    let mut outputs = outputs;
    let copy = |out: &mut Out<'_, i32>, array: &Array<i32>| match out {
        Out::Host(slice) => slice.copy_from_slice(&array.download(&device)),
        Out::Device(_) => unreachable!("the harness describes calls in host memory"),
    };
    copy(&mut outputs.accepted_counts, &accepted);
    copy(&mut outputs.emitted_tokens, &emitted);
    if let (Some(out), Some(array)) = (outputs.accepted_nodes.as_mut(), &nodes) {
        copy(out, array);
    }
    if let (Some(out), Some(array)) = (outputs.request_status.as_mut(), &status) {
        copy(out, array);
    }
    if let (Some(Out::Host(out)), Some(array)) = (outputs.accept_flags.as_mut(), &flags) {
        out.copy_from_slice(&array.download(&device));
    }
    Ok(())
}

/// A call's sampling parameters in a test device's memory: temperature, top-k, top-p.
type ParamsOn = (Array<f32>, Option<Array<i32>>, Option<Array<f32>>);

fn device_params(params: &Option<ParamsOn>) -> Option<SamplingParams<'_>> {
    params.as_ref().map(|(t, k, top_p)| SamplingParams {
        temperature: t.input(),
        top_k: k.as_ref().map(Array::input),
        top_p: top_p.as_ref().map(Array::input),
    })
}

/// Target or draft rows in a test device's memory.
enum RowsOn {
    /// fp32 logits, or probabilities when the flag is set.
    F32(Array<f32>, bool),
    F16(Array<f16>),
    BF16(Array<bf16>),
}

impl RowsOn {
    fn input(&self) -> Rows<'_> {
        match self {
            RowsOn::F32(array, true) => Rows::Probs(array.input()),
            RowsOn::F32(array, false) => Rows::LogitsF32(array.input()),
            RowsOn::F16(array) => Rows::LogitsF16(array.input()),
            RowsOn::BF16(array) => Rows::LogitsBF16(array.input()),
        }
    }
}

macro_rules! gpu_scenarios {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            if gpu(stringify!($name)).is_some() {
                sampling::$name(GPU);
            }
        }
    )*};
}

gpu_scenarios!(
    chain_with_draft_distributions_is_exact,
    chain_of_point_mass_drafts_is_exact,
    tree_of_top_children_is_exact,
    tree_of_iid_children_is_exact,
    wide_iid_tree_with_repeated_children_is_exact,
    temperatures_are_exact_on_both_rows,
    top_k_and_top_p_are_exact_on_both_rows,
    half_precision_logits_and_probabilities_are_exact,
    zero_target_probability_where_the_drafter_has_mass_is_never_emitted,
    zero_draft_probability_where_the_target_has_mass_is_exact,
    equal_distributions_accept_every_draft,
    disjoint_supports_reject_every_draft,
    vocabulary_sizes_one_odd_and_large_are_exact,
    mean_accepted_count_matches_its_expectation,
    draft_parameters_of_their_own_are_exact,
    a_drafter_sampling_its_unfiltered_softmax_keeps_the_target_distribution,
    a_coin_on_the_threshold_rejects_and_zero_probability_is_never_accepted,
);

/// Temperature 0 on the GPU is the CPU's greedy verification, bad rows and drafts included (statuses too).
#[test]
fn temperature_zero_is_greedy_verification_bad_rows_included() {
    let name = "temperature_zero_is_greedy_verification_bad_rows_included";
    if gpu(name).is_some() {
        sampling::temperature_zero_is_greedy_with_bad_rows(GPU, &mut common::rng(name));
    }
}

/// Requests whose outcome differs between the backends.
fn disagreements(cpu: &[Outcome], gpu: &[Outcome]) -> usize {
    cpu.iter()
        .zip(gpu)
        .filter(|(c, g)| c.emitted != g.emitted || c.path != g.path)
        .count()
}

#[test]
fn tokens_equal_the_cpu_where_no_normalising_sum_is_needed() {
    if gpu("tokens_equal_the_cpu_where_no_normalising_sum_is_needed").is_none() {
        return;
    }
    // Probabilities: chains with and without draft rows, trees of point masses. Logits without draft rows
    // (any dtype, temperature 0 and not). Tolerance: none.
    let mut cases = Vec::new();
    for (shape, with_q) in [
        (Shape::Chain(4), true),
        (Shape::Chain(4), false),
        (Shape::TopTree(&[3, 2, 2]), false),
    ] {
        cases.push((Input::Probs, shape, with_q, PLAIN));
    }
    for input in [Input::F32, Input::F16, Input::BF16] {
        // Top-k's threshold is an order statistic, so it needs no sum either.
        for (temperature, top_k) in [(0.0, -1), (0.7, -1), (1.0, -1), (0.8, 5)] {
            for shape in [Shape::Chain(5), Shape::TopTree(&[2, 2, 2])] {
                cases.push((
                    input,
                    shape,
                    false,
                    sampling::Params {
                        temperature,
                        top_k,
                        ..PLAIN
                    },
                ));
            }
        }
    }
    for (i, &(input, shape, with_q, params)) in cases.iter().enumerate() {
        for vocab in [7, 1029, 32000] {
            let mut s = Scenario::new(
                "identity",
                Model::new(vocab, 12.min(vocab), 70 + i as u64),
                shape,
                with_q,
            );
            s.input = input;
            s.params = params;
            s.trials = if vocab > 2000 { 500 } else { 3000 };
            // No statistics here: every request is compared, so a scaled run (the CPU simulator's) may keep few:
            // 16 rows of 32000 are half a million comparisons, and the simulator's longest test no longer.
            s.min_scaled_trials = if vocab > 2000 { 16 } else { 50 };
            let (cpu, gpu) = (sampling::run(&s, CPU), sampling::run(&s, GPU));
            assert_eq!(
                disagreements(&cpu, &gpu),
                0,
                "{input:?} {shape:?} q={with_q} {params:?} V={vocab}: the GPU must emit the CPU's tokens"
            );
        }
    }
}

#[test]
fn tokens_rarely_differ_where_softmax_sums_round() {
    if gpu("tokens_rarely_differ_where_softmax_sums_round").is_none() {
        return;
    }
    // Logits with draft rows (softmax sums on both sides), and i.i.d. trees on probabilities (residual mass
    // after two or more rejections at a node): a coin or race within rounding of a threshold may differ.
    // Bound: under 1 in 200 requests (each of the ~10 draws per request would need to land within ~1e-6 of a
    // threshold), counted and printed.
    let mut total = (0, 0);
    let top_p = sampling::Params {
        top_p: 0.9,
        top_k: 30,
        ..PLAIN
    };
    let mut cases = vec![
        (Input::Probs, Shape::IidTree(&[3, 2]), true, PLAIN),
        (Input::Probs, Shape::IidTree(&[6, 1]), true, PLAIN),
        // Top-p's cut is a sum of softmax mass, even without draft rows.
        (Input::BF16, Shape::Chain(4), false, top_p),
        (Input::F32, Shape::TopTree(&[2, 2]), false, top_p),
    ];
    for input in [Input::F32, Input::F16, Input::BF16] {
        cases.push((input, Shape::Chain(4), true, PLAIN));
        cases.push((input, Shape::IidTree(&[3, 2]), true, PLAIN));
        cases.push((input, Shape::Chain(4), true, top_p));
    }
    for (i, &(input, shape, with_q, params)) in cases.iter().enumerate() {
        let mut s = Scenario::new(
            "rounding",
            Model::new(301, 40, 90 + i as u64),
            shape,
            with_q,
        );
        s.input = input;
        s.params = params;
        s.trials = 4000;
        let (cpu, gpu) = (sampling::run(&s, CPU), sampling::run(&s, GPU));
        let differ = disagreements(&cpu, &gpu);
        let requests = cpu.len();
        eprintln!(
            "{input:?} {shape:?} q={with_q} {params:?}: {differ} of {requests} requests differ"
        );
        assert!(
            differ * 200 < requests,
            "{input:?} {shape:?} q={with_q} {params:?}: {differ} of {requests} differ"
        );
        total = (total.0 + differ, total.1 + requests);
    }
    eprintln!("in all: {} of {} requests differ", total.0, total.1);
}

#[test]
fn bad_requests_are_flagged_and_the_others_are_untouched() {
    let Some(backend) = gpu("bad_requests_are_flagged_and_the_others_are_untouched") else {
        return;
    };
    let mut rng = common::rng("bad_requests_are_flagged_and_the_others_are_untouched");
    drop(backend);
    let v = 517usize;
    // Fourteen trees of 4 nodes (root, two children, one grandchild); request r gets defect r (0 = none).
    let b = 14;
    let mut offsets = vec![0i32];
    let mut tokens = Vec::new();
    let mut parents = Vec::new();
    for _ in 0..b {
        tokens.extend([
            -1,
            rng.random_range(0..v as i32),
            rng.random_range(0..v as i32),
            rng.random_range(0..v as i32),
        ]);
        parents.extend([-1, 0, 0, 1]);
        offsets.push(tokens.len() as i32);
    }
    let mut target: Vec<f32> = (0..tokens.len() * v)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    let mut draft: Vec<f32> = (0..tokens.len() * v)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    let mut temperature = vec![0.9f32; b];
    let mut top_k = vec![-1i32; b];
    let mut top_p = vec![1.0f32; b];
    let width = 3;
    // Request 7's defect is in its draft rows, so it is good when they are not passed.
    let good = |r: usize, with_q: bool| [0, 6, 11].contains(&r) || (r == 7 && !with_q);
    // The defects, one per request.
    tokens[4 + 1] = v as i32; // 1: a draft id outside the vocabulary
    tokens[8 + 2] = -1; // 2: a padded draft
    parents[12 + 3] = 3; // 3: a node its own parent
    parents[16] = 0; // 4: a root with a parent
    target[(20 + 1) * v + 5] = f32::NAN; // 5: a NaN target logit
    draft[28 * v + 9] = f32::INFINITY; // 7: a +inf draft logit
    temperature[8] = -1.0; // 8: a negative temperature
    temperature[9] = f32::NAN; // 9: a NaN temperature
    target[(40 + 2) * v..(40 + 3) * v].fill(f32::NEG_INFINITY); // 10: a target row without mass
    top_k[12] = 0; // 12: a top-k of 0
    top_p[13] = 1.5; // 13: a top-p above 1
                     // 6 and 11 are good; 0 too.
    let seeds: Vec<u64> = (0..b as u64).map(|i| i * 31 + 5).collect();
    let steps = vec![3u64; b];
    // The status each defect is flagged with (RequestStatus codes), the same on both backends.
    let expected_status = |r: usize, with_q: bool| -> i32 {
        use specdec::RequestStatus as S;
        match r {
            1 | 2 => S::DraftToken,
            3 | 4 => S::Parents,
            5 | 10 => S::RowValues,
            7 if with_q => S::RowValues,
            8 | 9 | 12 | 13 => S::SamplingParams,
            _ => S::Ok,
        }
        .code()
    };
    let run = |verify: Verify, with_q: bool, with_status: bool| {
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Tree {
                node_offsets: (&offsets).into(),
                node_tokens: (&tokens).into(),
                parents: (&parents).into(),
            },
            target: Rows::LogitsF32((&target).into()),
            draft: with_q.then_some(Rows::LogitsF32((&draft).into())),
            params: Some(SamplingParams {
                temperature: (&temperature).into(),
                top_k: Some((&top_k).into()),
                top_p: Some((&top_p).into()),
            }),
            draft_params: None,
            seeds: (&seeds).into(),
            steps: (&steps).into(),
        };
        let (mut a, mut e, mut n) = (vec![0; b], vec![0; b * width], vec![0; b * width]);
        let mut f = vec![0i8; b * width];
        let mut s = vec![POISON; b];
        let out = VerifyOutputs {
            emit_width: width,
            accepted_counts: (&mut a).into(),
            emitted_tokens: (&mut e).into(),
            accepted_nodes: Some((&mut n).into()),
            accept_flags: Some((&mut f).into()),
            request_status: with_status.then_some((&mut s[..]).into()),
        };
        verify(&inputs, out).map(|()| (a, e, n, f, s))
    };
    for with_q in [false, true] {
        assert!(
            run(CPU, with_q, false).is_err(),
            "without request_status the CPU rejects the whole batch"
        );
        let cpu = run(CPU, with_q, true).expect("with request_status the CPU flags per request");
        let gpu_without_status = run(GPU, with_q, false).expect("the GPU flags per request");
        let (a, e, n, f, status) = run(GPU, with_q, true).expect("the GPU flags per request");
        assert_eq!(
            gpu_without_status.0, a,
            "request_status changes no accepted count"
        );
        let expected: Vec<i32> = (0..b).map(|r| expected_status(r, with_q)).collect();
        assert_eq!(status, expected, "GPU request_status, q={with_q}");
        assert_eq!(cpu.4, expected, "CPU request_status, q={with_q}");
        for (r, &accepted) in a.iter().enumerate() {
            let row = r * width..(r + 1) * width;
            if good(r, with_q) {
                assert!(accepted >= 0, "good request {r} flagged");
            } else {
                assert_eq!(
                    accepted, -1,
                    "request {r} (defect {r}) not flagged, q={with_q}"
                );
                assert_eq!(cpu.0[r], -1, "CPU: request {r} not flagged, q={with_q}");
                for (name, gpu_row, cpu_row) in [
                    ("emitted", &e[row.clone()], &cpu.1[row.clone()]),
                    ("nodes", &n[row.clone()], &cpu.2[row.clone()]),
                ] {
                    assert!(gpu_row.iter().all(|&x| x == -1), "GPU {name} of {r}");
                    assert!(cpu_row.iter().all(|&x| x == -1), "CPU {name} of {r}");
                }
                assert!(f[row.clone()].iter().all(|&x| x == -1));
                assert!(cpu.3[row].iter().all(|&x| x == -1));
            }
        }
        // Without draft rows (no softmax sums) the good requests equal the CPU on a batch of only them.
        if with_q {
            continue;
        }
        for r in (0..b).filter(|&r| good(r, false)) {
            let t0 = r * 4;
            let inputs = VerifyInputs {
                vocab_size: v,
                drafts: Drafts::Tree {
                    node_offsets: (&[0, 4]).into(),
                    node_tokens: (&tokens[t0..t0 + 4]).into(),
                    parents: (&parents[t0..t0 + 4]).into(),
                },
                target: Rows::LogitsF32((&target[t0 * v..(t0 + 4) * v]).into()),
                draft: None,
                params: Some(SamplingParams {
                    temperature: (&temperature[r..r + 1]).into(),
                    top_k: None,
                    top_p: None,
                }),
                draft_params: None,
                seeds: (&seeds[r..r + 1]).into(),
                steps: (&steps[r..r + 1]).into(),
            };
            let (mut a1, mut e1) = ([0], vec![0; width]);
            CPU(
                &inputs,
                VerifyOutputs {
                    emit_width: width,
                    accepted_counts: (&mut a1).into(),
                    emitted_tokens: (&mut e1).into(),
                    accepted_nodes: None,
                    accept_flags: None,
                    request_status: None,
                },
            )
            .unwrap();
            assert_eq!(a[r], a1[0], "request {r}");
            assert_eq!(&e[r * width..(r + 1) * width], &e1[..], "request {r}");
            assert_eq!(cpu.0[r], a1[0], "CPU flag mode, request {r}");
            assert_eq!(
                &cpu.1[r * width..(r + 1) * width],
                &e1[..],
                "CPU, request {r}"
            );
        }
    }
}

/// A tree request with no nodes breaks the contract (a tree has its root), so it is flagged like any bad request;
/// the call itself succeeds. Before, a batch of only empty trees launched a kernel with an empty grid, which the
/// driver refuses, and kernels told trees from chains by a non-null `parents`, which an empty batch need not have.
#[test]
fn empty_trees_are_flagged_not_refused() {
    let Some(backend) = gpu("empty_trees_are_flagged_not_refused") else {
        return;
    };
    let mut rng = common::rng("empty_trees_are_flagged_not_refused");
    let v = 300usize;
    let width = 3;
    // Requests 0 and 2 are empty, request 1 a root with two children.
    let tree = [
        -1,
        rng.random_range(0..v as i32),
        rng.random_range(0..v as i32),
    ];
    let target: Vec<f32> = (0..3 * v).map(|_| rng.random_range(-3.0..3.0)).collect();
    let draft: Vec<f32> = (0..3 * v).map(|_| rng.random_range(-3.0..3.0)).collect();
    for (offsets, tokens, parents) in [
        (vec![0, 0], &[][..], &[][..]),
        (vec![0, 0, 0, 0], &[][..], &[][..]),
        (vec![0, 0, 3, 3], &tree[..], &[-1, 0, 0][..]),
    ] {
        let b = offsets.len() - 1;
        let t = tokens.len();
        for with_q in [false, true] {
            let temperature_values = vec![0.8; b];
            let seeds_values = vec![17; b];
            let steps_values = vec![2; b];
            let inputs = VerifyInputs {
                vocab_size: v,
                drafts: Drafts::Tree {
                    node_offsets: (&offsets).into(),
                    node_tokens: tokens.into(),
                    parents: parents.into(),
                },
                target: Rows::LogitsF32((&target[..t * v]).into()),
                draft: with_q.then(|| Rows::LogitsF32((&draft[..t * v]).into())),
                params: Some(SamplingParams {
                    temperature: (&temperature_values).into(),
                    top_k: None,
                    top_p: None,
                }),
                draft_params: None,
                seeds: (&seeds_values).into(),
                steps: (&steps_values).into(),
            };
            let run = |verify: Verify, with_status: bool| {
                let (mut a, mut e, mut s) = (vec![0; b], vec![0; b * width], vec![POISON; b]);
                let out = VerifyOutputs {
                    emit_width: width,
                    accepted_counts: (&mut a).into(),
                    emitted_tokens: (&mut e).into(),
                    accepted_nodes: None,
                    accept_flags: None,
                    request_status: with_status.then_some((&mut s[..]).into()),
                };
                verify(&inputs, out).map(|()| (a, e, s))
            };
            let what = format!("offsets {offsets:?}, with_q {with_q}");
            match run(CPU, false) {
                Err(Error::InvalidArgument { argument, .. }) => {
                    assert_eq!(argument, "node_offsets[1]", "{what}")
                }
                other => panic!("the CPU must refuse the batch ({what}): {other:?}"),
            }
            let (a, e, status) =
                run(GPU, true).unwrap_or_else(|err| panic!("{what}: the GPU call failed: {err}"));
            let (cpu_a, _, cpu_status) = run(CPU, true).expect("the CPU flags per request");
            assert_eq!(
                status, cpu_status,
                "request_status on both backends ({what})"
            );
            let flagged = |a: &[i32]| a.iter().map(|&x| x == -1).collect::<Vec<_>>();
            assert_eq!(
                flagged(&a),
                flagged(&cpu_a),
                "flagged on both backends ({what})"
            );
            for r in 0..b {
                let row = &e[r * width..(r + 1) * width];
                if offsets[r] == offsets[r + 1] {
                    assert_eq!(a[r], -1, "empty request {r} not flagged ({what})");
                    assert_eq!(status[r], specdec::RequestStatus::Offsets.code(), "{what}");
                    assert!(row.iter().all(|&x| x == -1), "{what}");
                } else {
                    assert!(a[r] >= 0, "request {r} flagged ({what})");
                    assert!(row[..a[r] as usize + 1]
                        .iter()
                        .all(|&x| (0..v as i32).contains(&x)));
                }
            }
        }
    }

    // The raw entry point with null node arrays (an empty batch has no parents to point at): the kernels must
    // still read the requests as trees.
    let stream = backend.context().default_stream();
    let b = 2;
    let offsets = upload(&stream, &[0i32, 0, 0]);
    let temperature = upload(&stream, &[1.0f32; 2]);
    let seeds = upload(&stream, &[3u64; 2]);
    let steps = upload(&stream, &[0u64; 2]);
    let accepted = upload(&stream, &[POISON; 2]);
    let emitted = upload(&stream, &[POISON; 2 * 3]);
    // SAFETY: every pointer is a live slice of at least the stated length (null for the empty arrays), on the
    // stream the call uses, synchronised before the slices drop.
    unsafe {
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Tree {
                node_offsets: DeviceIn::from_raw(raw(&offsets, &stream), b + 1).into(),
                node_tokens: DeviceIn::from_raw(0, 0).into(),
                parents: DeviceIn::from_raw(0, 0).into(),
            },
            target: Rows::LogitsF32(DeviceIn::from_raw(0, 0).into()),
            draft: None,
            params: Some(SamplingParams {
                temperature: DeviceIn::from_raw(raw(&temperature, &stream), b).into(),
                top_k: None,
                top_p: None,
            }),
            draft_params: None,
            seeds: DeviceIn::from_raw(raw(&seeds, &stream), b).into(),
            steps: DeviceIn::from_raw(raw(&steps, &stream), b).into(),
        };
        let outputs = VerifyOutputs {
            emit_width: 3,
            accepted_counts: DeviceOut::from_raw(raw(&accepted, &stream), b).into(),
            emitted_tokens: DeviceOut::from_raw(raw(&emitted, &stream), b * 3).into(),
            accepted_nodes: None,
            accept_flags: None,
            request_status: None,
        };
        Backend::Cuda(backend.clone())
            .rejection_verify(Stream::Cuda(&stream), &inputs, outputs)
            .expect("null node arrays for an empty batch");
    }
    stream.synchronize().expect("synchronize");
    assert_eq!(&stream.clone_dtoh(&accepted).unwrap()[..b], &[-1, -1]);
    assert!(stream.clone_dtoh(&emitted).unwrap()[..b * 3]
        .iter()
        .all(|&x| x == -1));
}

/// A request's tokens depend on the request alone: not on the batch around it, its position there, or the GPU's
/// SM count (the documented promise). Each of 64 random chains (bf16 logits with draft rows, so softmax sums
/// decide acceptances) is verified alone, then the 64 in one batch at three rotations, on the CPU and on the GPU.
/// On the simulator the test runs itself again with 7 SMs instead of 132 and requires the same tokens.
#[test]
fn a_request_emits_the_same_tokens_alone_and_anywhere_in_a_batch() {
    const NAME: &str = "a_request_emits_the_same_tokens_alone_and_anywhere_in_a_batch";
    const CHILD: &str = "SPECDEC_TEST_SAME_TOKENS_INPUT_SEED";
    let Some(backend) = gpu(NAME) else {
        return;
    };
    let input_seed = match std::env::var(CHILD) {
        Ok(seed) => seed.parse().expect("input seed"),
        Err(_) => common::rng(NAME).random::<u64>(),
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(input_seed);
    let (b, k, v, width) = (64usize, 4usize, 32000usize, 5usize);
    let drafts: Vec<i32> = (0..b * k).map(|_| rng.random_range(0..v as i32)).collect();
    let logits = |rows: usize, rng: &mut rand::rngs::StdRng| -> Vec<bf16> {
        (0..rows * v)
            .map(|_| bf16::from_f32(rng.random_range(-6.0f32..6.0)))
            .collect()
    };
    let target = logits(b * (k + 1), &mut rng);
    let draft = logits(b * k, &mut rng);
    let temperature: Vec<f32> = (0..b).map(|_| rng.random_range(0.5..1.5)).collect();
    let seeds: Vec<u64> = (0..b).map(|_| rng.random()).collect();
    let steps: Vec<u64> = (0..b).map(|_| rng.random_range(0..1000)).collect();
    // Requests `order[0..]`, in that order: (accepted count, emitted tokens) of each, in `order`'s order.
    let run = |verify: Verify, order: &[usize]| -> Vec<(i32, Vec<i32>)> {
        let n = order.len();
        let pick = |rows: &[bf16], per: usize| -> Vec<bf16> {
            order
                .iter()
                .flat_map(|&r| rows[r * per * v..(r + 1) * per * v].iter().copied())
                .collect()
        };
        let (t, d) = (pick(&target, k + 1), pick(&draft, k));
        let tokens: Vec<i32> = order
            .iter()
            .flat_map(|&r| drafts[r * k..(r + 1) * k].iter().copied())
            .collect();
        let offsets: Vec<i32> = (0..=n).map(|i| (i * k) as i32).collect();
        let field = |x: &[f32]| order.iter().map(|&r| x[r]).collect::<Vec<_>>();
        let temperature = field(&temperature);
        let seeds: Vec<u64> = order.iter().map(|&r| seeds[r]).collect();
        let steps: Vec<u64> = order.iter().map(|&r| steps[r]).collect();
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Chain {
                draft_offsets: (&offsets).into(),
                draft_tokens: (&tokens).into(),
            },
            target: Rows::LogitsBF16((&t).into()),
            draft: Some(Rows::LogitsBF16((&d).into())),
            params: Some(SamplingParams {
                temperature: (&temperature).into(),
                top_k: None,
                top_p: None,
            }),
            draft_params: None,
            seeds: (&seeds).into(),
            steps: (&steps).into(),
        };
        let (mut a, mut e) = (vec![0; n], vec![0; n * width]);
        verify(
            &inputs,
            VerifyOutputs {
                emit_width: width,
                accepted_counts: (&mut a).into(),
                emitted_tokens: (&mut e).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            },
        )
        .expect("verify");
        (0..n)
            .map(|i| (a[i], e[i * width..(i + 1) * width].to_vec()))
            .collect()
    };
    let mut batched = Vec::new();
    for (backend_name, verify) in [("cpu", CPU), ("gpu", GPU)] {
        let alone: Vec<(i32, Vec<i32>)> = (0..b).map(|r| run(verify, &[r]).remove(0)).collect();
        for rotation in [0, 17, 63] {
            let order: Vec<usize> = (0..b).map(|i| (i + rotation) % b).collect();
            let got = run(verify, &order);
            for (i, &r) in order.iter().enumerate() {
                assert_eq!(
                    got[i], alone[r],
                    "{backend_name}: request {r} at position {i} of a batch of {b} (input seed {input_seed})"
                );
            }
            if backend_name == "gpu" && rotation == 0 {
                batched = got;
            }
        }
    }
    // The same tokens under another SM count: on the simulator, a child run of this test with 7 SMs prints them.
    let line = format!("TOKENS {batched:?}");
    if std::env::var(CHILD).is_ok() {
        println!("{line}");
        return;
    }
    if !backend.device_name().unwrap().starts_with("specdec-sim") {
        return;
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD, input_seed.to_string())
        .env("SPECDEC_SIM_SMS", "7")
        .output()
        .expect("run this test again on 7 simulated SMs");
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success(),
        "the 7-SM run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&child.stderr)
    );
    // libtest prints "test NAME ... " before the child's line, on the same line.
    assert!(
        stdout.contains(&format!("{line}\n")),
        "the tokens differ on 7 SMs (input seed {input_seed}):\n132 SMs: {line}\n7 SMs: {stdout}"
    );
}

/// The same promise where it is fragile: acceptance coins placed on their threshold. Each of 8 requests (one draft
/// token, f32 logits, temperature 1) has a random target row and a draft row of zeros except the draft token's
/// logit `c`; `c` is bisected (in a batch of the 8) to the exact f32 value where the request turns from accepting
/// to rejecting, so that one rounding step of either row's softmax sum flips the decision. At `c` and the f32
/// value below it, each request must decide the same alone, in the batch of 8 and at any position of a batch of
/// 64. (When the GPU's softmax partials followed the batch's block count, these decisions followed the batch.)
#[test]
fn coins_on_their_threshold_decide_alike_alone_and_in_any_batch() {
    const NAME: &str = "coins_on_their_threshold_decide_alike_alone_and_in_any_batch";
    if gpu(NAME).is_none() {
        return;
    }
    let mut rng = common::rng(NAME);
    let (n, v, width) = (8usize, 128256usize, 2usize);
    let filler = 56usize;
    let rows: Vec<f32> = (0..(n + filler) * 2 * v)
        .map(|_| rng.random_range(-4.0f32..4.0))
        .collect();
    let drafts: Vec<i32> = (0..n + filler)
        .map(|_| rng.random_range(0..v as i32))
        .collect();
    let seeds: Vec<u64> = (0..n + filler).map(|_| rng.random()).collect();
    // Runs requests `order` (indices into the 8 probed requests and the 56 fillers) with the probed requests'
    // draft logits `c`: (accepted count, emitted tokens) of each.
    let run = |verify: Verify, order: &[usize], c: &[f32]| -> Vec<(i32, Vec<i32>)> {
        let m = order.len();
        let mut target = Vec::with_capacity(m * 2 * v);
        let mut draft = Vec::with_capacity(m * v);
        for &r in order {
            target.extend_from_slice(&rows[r * 2 * v..(r * 2 + 2) * v]);
            let mut q = vec![0.0f32; v];
            if r < n {
                q[drafts[r] as usize] = c[r];
            } else {
                q.copy_from_slice(&rows[(r * 2 + 1) * v..(r * 2 + 2) * v]);
            }
            draft.extend(q);
        }
        let tokens: Vec<i32> = order.iter().map(|&r| drafts[r]).collect();
        let offsets: Vec<i32> = (0..=m as i32).collect();
        let temperature_values = vec![1.0; m];
        let steps_values = vec![0; m];
        let seeds_in_order: Vec<u64> = order.iter().map(|&r| seeds[r]).collect();
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Chain {
                draft_offsets: (&offsets).into(),
                draft_tokens: (&tokens).into(),
            },
            target: Rows::LogitsF32((&target).into()),
            draft: Some(Rows::LogitsF32((&draft).into())),
            params: Some(SamplingParams {
                temperature: (&temperature_values).into(),
                top_k: None,
                top_p: None,
            }),
            draft_params: None,
            seeds: (&seeds_in_order).into(),
            steps: (&steps_values).into(),
        };
        let (mut a, mut e) = (vec![0; m], vec![0; m * width]);
        verify(
            &inputs,
            VerifyOutputs {
                emit_width: width,
                accepted_counts: (&mut a).into(),
                emitted_tokens: (&mut e).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            },
        )
        .expect("verify");
        (0..m)
            .map(|i| (a[i], e[i * width..(i + 1) * width].to_vec()))
            .collect()
    };
    // f32 values in order: the bisection runs over the order keys of [-40, 40].
    let key = |x: f32| {
        let b = x.to_bits() as i64;
        if b >> 31 == 1 {
            -(b & 0x7FFF_FFFF)
        } else {
            b
        }
    };
    let value = |k: i64| {
        if k < 0 {
            f32::from_bits((-k) as u32 | 0x8000_0000)
        } else {
            f32::from_bits(k as u32)
        }
    };
    let probed: Vec<usize> = (0..n).collect();
    for (backend_name, verify) in [("cpu", CPU), ("gpu", GPU)] {
        // Invariant per request: accepts at lo, rejects at hi.
        let (mut lo, mut hi) = (vec![key(-40.0); n], vec![key(40.0); n]);
        let ends = |k: &[i64]| k.iter().map(|&k| value(k)).collect::<Vec<_>>();
        let at_lo = run(verify, &probed, &ends(&lo));
        let at_hi = run(verify, &probed, &ends(&hi));
        // c = -40 (q about 3e-23) accepts every coin; c = 40 (q near 1) rejects unless the coin is below p(x) (at
        // most about 6e-5 here): such a request has no boundary to probe and is left out.
        let bounded: Vec<usize> = (0..n)
            .filter(|&r| at_lo[r].0 == 1 && at_hi[r].0 == 0)
            .collect();
        assert!(
            bounded.len() >= 4,
            "{backend_name}: only {bounded:?} of 8 have a boundary"
        );
        for r in (0..n).filter(|r| !bounded.contains(r)) {
            hi[r] = lo[r] + 1; // nothing to bisect
        }
        while lo.iter().zip(&hi).any(|(l, h)| h - l > 1) {
            let mid: Vec<i64> = lo.iter().zip(&hi).map(|(l, h)| l + (h - l) / 2).collect();
            for (i, r) in run(verify, &probed, &ends(&mid)).iter().enumerate() {
                if hi[i] - lo[i] > 1 {
                    if r.0 == 1 {
                        lo[i] = mid[i];
                    } else {
                        hi[i] = mid[i];
                    }
                }
            }
        }
        for (side, c) in [("accepting", ends(&lo)), ("rejecting", ends(&hi))] {
            let reference = run(verify, &probed, &c);
            for &r in &bounded {
                assert_eq!(
                    run(verify, &[r], &c)[0],
                    reference[r],
                    "{backend_name}: {side} request {r} alone"
                );
            }
            for rotation in [0, 29, 63] {
                let order: Vec<usize> = (0..n + filler)
                    .map(|i| (i + rotation) % (n + filler))
                    .collect();
                for (i, got) in run(verify, &order, &c).into_iter().enumerate() {
                    if bounded.contains(&order[i]) {
                        assert_eq!(
                            got,
                            reference[order[i]],
                            "{backend_name}: {side} request {} at position {i} of {}",
                            order[i],
                            n + filler
                        );
                    }
                }
            }
        }
    }
}

/// Top-p cuts are the same on every run: the threshold kernel sums softmax masses as integers (units of 2^-60), so
/// the order in which its shared-memory atomics land (shuffled on the simulator, unordered on a GPU) cannot move a
/// cut. 48 requests with top-p in (0.05, 1) and some with top-k too, bf16 logits, point-mass drafts and draft rows,
/// verified three times: identical outputs. (Before, f64 atomics made a cut within rounding of `top_p` a matter
/// of the order; that is too rare to provoke, so this test guards the property rather than reproducing the bug.)
#[test]
fn top_p_cuts_are_the_same_on_every_run() {
    const NAME: &str = "top_p_cuts_are_the_same_on_every_run";
    if gpu(NAME).is_none() {
        return;
    }
    let mut rng = common::rng(NAME);
    let (b, k, v, width) = (48usize, 3usize, 32000usize, 4usize);
    let offsets: Vec<i32> = (0..=b).map(|i| (i * k) as i32).collect();
    let logits = |rows: usize, rng: &mut rand::rngs::StdRng| -> Vec<bf16> {
        (0..rows * v)
            .map(|_| bf16::from_f32(rng.random_range(-3.0f32..3.0)))
            .collect()
    };
    let target = logits(b * (k + 1), &mut rng);
    let draft = logits(b * k, &mut rng);
    // Each draft is its draft row's argmax, which every top-k and top-p keeps: a draft must have probability
    // under the filtered row it was drawn from (a draft of q = 0 flags its request).
    let tokens: Vec<i32> = draft
        .chunks(v)
        .map(|row| common::naive_argmax(row) as i32)
        .collect();
    let temperature: Vec<f32> = (0..b).map(|_| rng.random_range(0.3..1.5)).collect();
    let top_p: Vec<f32> = (0..b).map(|_| rng.random_range(0.05..1.0)).collect();
    let top_k: Vec<i32> = (0..b)
        .map(|i| {
            if i % 3 == 0 {
                rng.random_range(1..5000)
            } else {
                -1
            }
        })
        .collect();
    let seeds: Vec<u64> = (0..b).map(|_| rng.random()).collect();
    for with_q in [false, true] {
        let steps_values = vec![9; b];
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Chain {
                draft_offsets: (&offsets).into(),
                draft_tokens: (&tokens).into(),
            },
            target: Rows::LogitsBF16((&target).into()),
            draft: with_q.then_some(Rows::LogitsBF16((&draft).into())),
            params: Some(SamplingParams {
                temperature: (&temperature).into(),
                top_k: Some((&top_k).into()),
                top_p: Some((&top_p).into()),
            }),
            draft_params: None,
            seeds: (&seeds).into(),
            steps: (&steps_values).into(),
        };
        let run = || {
            let (mut a, mut e) = (vec![0; b], vec![0; b * width]);
            GPU(
                &inputs,
                VerifyOutputs {
                    emit_width: width,
                    accepted_counts: (&mut a).into(),
                    emitted_tokens: (&mut e).into(),
                    accepted_nodes: None,
                    accept_flags: None,
                    request_status: None,
                },
            )
            .expect("verify");
            assert!(a.iter().all(|&n| n >= 0), "a request was flagged");
            (a, e)
        };
        let first = run();
        for again in 1..3 {
            assert!(
                run() == first,
                "run {again} differs from run 0 (with_q {with_q})"
            );
        }
    }
}

/// Offsets that do not cover the drafts (the first request starting at 1, the last ending before the last
/// draft): the CPU refuses the batch, the GPU flags the first and the last request and verifies the middle one as
/// it would alone. (Before, both were accepted and rows no longer lined up with the requests.)
#[test]
fn offsets_that_do_not_cover_the_drafts_are_flagged() {
    if gpu("offsets_that_do_not_cover_the_drafts_are_flagged").is_none() {
        return;
    }
    let mut rng = common::rng("offsets_that_do_not_cover_the_drafts_are_flagged");
    let v = 300usize;
    let row = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
        let raw: Vec<f32> = (0..v).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let total: f32 = raw.iter().sum();
        raw.iter().map(|x| x / total).collect()
    };
    // 6 drafts, 3 requests; chain target rows are offsets[b] + b + j: 9 rows.
    let target: Vec<f32> = (0..9).flat_map(|_| row(&mut rng)).collect();
    let tokens: Vec<i32> = (0..6).map(|_| rng.random_range(0..v as i32)).collect();
    let run = |verify: Verify, offsets: &[i32], tokens: &[i32], target: &[f32]| {
        let b = offsets.len() - 1;
        let seeds_values = vec![11; b];
        let steps_values = vec![4; b];
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Chain {
                draft_offsets: offsets.into(),
                draft_tokens: tokens.into(),
            },
            target: Rows::Probs(target.into()),
            draft: None,
            params: None,
            draft_params: None,
            seeds: (&seeds_values).into(),
            steps: (&steps_values).into(),
        };
        let (mut a, mut e) = (vec![0; b], vec![0; b * 3]);
        verify(
            &inputs,
            VerifyOutputs {
                emit_width: 3,
                accepted_counts: (&mut a).into(),
                emitted_tokens: (&mut e).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            },
        )
        .map(|()| (a, e))
    };
    let offsets = [1, 2, 4, 5];
    assert!(
        run(CPU, &offsets, &tokens, &target).is_err(),
        "the CPU refuses the batch"
    );
    let (a, e) = run(GPU, &offsets, &tokens, &target).expect("the GPU flags per request");
    assert_eq!(
        (a[0], a[2]),
        (-1, -1),
        "the first and the last request are flagged"
    );
    assert!(e[..3].iter().chain(&e[6..]).all(|&x| x == -1));
    // Request 1 alone: drafts 2..4, target rows 3..6.
    let (a1, e1) = run(CPU, &[0, 2], &tokens[2..4], &target[3 * v..6 * v]).unwrap();
    assert_eq!(
        (a[1], &e[3..6]),
        (a1[0], &e1[..]),
        "the middle request as alone"
    );
}

/// Probability rows that do not sum to 1 (beyond 1e-3) are refused on the CPU and flag their request on the GPU;
/// a row off by less passes, and so does an unread draft row of any sum.
#[test]
fn probability_rows_that_do_not_sum_to_one_are_flagged() {
    if gpu("probability_rows_that_do_not_sum_to_one_are_flagged").is_none() {
        return;
    }
    let mut rng = common::rng("probability_rows_that_do_not_sum_to_one_are_flagged");
    let v = 20000usize; // three row-kernel chunks, so the sum is merged across blocks
    let row = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
        let raw: Vec<f32> = (0..v).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let total: f32 = raw.iter().sum();
        raw.iter().map(|x| x / total).collect()
    };
    // Three chains of 2 drafts with draft rows: 9 target rows, 6 draft rows.
    let mut target: Vec<f32> = (0..9).flat_map(|_| row(&mut rng)).collect();
    let mut draft: Vec<f32> = (0..6).flat_map(|_| row(&mut rng)).collect();
    let tokens: Vec<i32> = (0..6).map(|_| rng.random_range(0..v as i32)).collect();
    target[4 * v..5 * v].iter_mut().for_each(|p| *p *= 2.0); // request 1's second target row sums to 2
    draft[4 * v] += 0.0004; // request 2's first draft row: off by less than the tolerance
    let run = |verify: Verify, target: &[f32], draft: &[f32]| {
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Chain {
                draft_offsets: (&[0, 2, 4, 6]).into(),
                draft_tokens: (&tokens).into(),
            },
            target: Rows::Probs(target.into()),
            draft: Some(Rows::Probs(draft.into())),
            params: None,
            draft_params: None,
            seeds: (&[5, 6, 7]).into(),
            steps: (&[1, 1, 1]).into(),
        };
        let (mut a, mut e) = (vec![0; 3], vec![0; 9]);
        verify(
            &inputs,
            VerifyOutputs {
                emit_width: 3,
                accepted_counts: (&mut a).into(),
                emitted_tokens: (&mut e).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            },
        )
        .map(|()| (a, e))
    };
    match run(CPU, &target, &draft) {
        Err(Error::InvalidArgument { argument, reason }) => {
            assert_eq!(argument, "target[4]", "{reason}");
            assert!(reason.contains("sums to"), "{reason}");
        }
        other => panic!("the CPU must refuse the row summing to 2: {other:?}"),
    }
    let (a, e) = run(GPU, &target, &draft).expect("the GPU flags per request");
    assert_eq!(a[1], -1, "request 1 flagged");
    assert!(e[3..6].iter().all(|&x| x == -1));
    assert!(a[0] >= 0 && a[2] >= 0, "requests 0 and 2 verified: {a:?}");
    // Without the bad row, the CPU accepts the same batch (the 0.0004 excess is within the tolerance).
    target[4 * v..5 * v].iter_mut().for_each(|p| *p *= 0.5);
    run(CPU, &target, &draft).expect("within the tolerance");
}

/// Top-k and top-p cuts over a vocabulary of several row-kernel chunks (V = 3 x 8192 + 77): the threshold passes
/// run one block per chunk and merge counts and masses across blocks, and the cut equals the CPU's. Each request
/// has 12 heavy tokens spread over the chunks (logits 3..7) above a light background (-6..-2), so the cut falls
/// among the heavy tokens or in the background; temperatures, top-p in (0.3, 0.95) and top-k (every third request)
/// vary by request. Point-mass drafts: a token is an exponential race over the kept logits, with no normalising
/// sum, so only the cut decides, and the GPU's tokens must equal the CPU's. They may differ only where a cut lies
/// within rounding (f32 expf on each side, up to 2 ulp apart) of top_p: about 1e-6 per row, under 1e-4 for
/// the test's 72 rows per dtype. Four requests alone emit what they emit in the batch.
#[test]
fn top_k_and_top_p_cuts_across_vocabulary_chunks_equal_the_cpu() {
    const NAME: &str = "top_k_and_top_p_cuts_across_vocabulary_chunks_equal_the_cpu";
    if gpu(NAME).is_none() {
        return;
    }
    let mut rng = common::rng(NAME);
    let (b, k, v, width) = (24usize, 2usize, 3 * 8192 + 77, 3usize);
    let rows = b * (k + 1);
    let mut logits: Vec<f32> = (0..rows * v)
        .map(|_| rng.random_range(-6.0f32..-2.0))
        .collect();
    let mut heavy = Vec::new();
    for row in 0..rows {
        let ids: Vec<usize> = (0..12).map(|_| rng.random_range(0..v)).collect();
        for &x in &ids {
            logits[row * v + x] = rng.random_range(3.0f32..7.0);
        }
        heavy.push(ids);
    }
    // Drafts: a heavy token of the row that scores them (likely kept) or any token (likely cut).
    let tokens: Vec<i32> = (0..b * k)
        .map(|i| {
            let row = (i / k) * (k + 1) + i % k;
            if rng.random_bool(0.7) {
                heavy[row][rng.random_range(0..12)] as i32
            } else {
                rng.random_range(0..v as i32)
            }
        })
        .collect();
    let temperature: Vec<f32> = (0..b).map(|_| rng.random_range(0.5..1.5)).collect();
    let top_p: Vec<f32> = (0..b).map(|_| rng.random_range(0.3..0.95)).collect();
    let top_k: Vec<i32> = (0..b)
        .map(|i| {
            if i % 3 == 0 {
                rng.random_range(2..40)
            } else {
                -1
            }
        })
        .collect();
    let seeds: Vec<u64> = (0..b).map(|_| rng.random()).collect();
    let bf16_logits: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();

    // Requests `first..first + count` as a batch of their own.
    let verify = |verify: Verify, bf16_rows: bool, steps: &[u64], first: usize, count: usize| {
        let offsets: Vec<i32> = (0..=count).map(|i| (i * k) as i32).collect();
        let target_rows = first * (k + 1) * v..(first + count) * (k + 1) * v;
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Chain {
                draft_offsets: (&offsets).into(),
                draft_tokens: (&tokens[first * k..(first + count) * k]).into(),
            },
            target: if bf16_rows {
                Rows::LogitsBF16((&bf16_logits[target_rows]).into())
            } else {
                Rows::LogitsF32((&logits[target_rows]).into())
            },
            draft: None,
            params: Some(SamplingParams {
                temperature: (&temperature[first..first + count]).into(),
                top_k: Some((&top_k[first..first + count]).into()),
                top_p: Some((&top_p[first..first + count]).into()),
            }),
            draft_params: None,
            seeds: (&seeds[first..first + count]).into(),
            steps: (&steps[first..first + count]).into(),
        };
        let (mut a, mut e) = (vec![POISON; count], vec![POISON; count * width]);
        verify(
            &inputs,
            VerifyOutputs {
                emit_width: width,
                accepted_counts: (&mut a).into(),
                emitted_tokens: (&mut e).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            },
        )
        .expect("verify");
        (a, e)
    };
    // Three steps per request (fresh noise each), so about 70 tokens per dtype are drawn through the cuts.
    for (bf16_rows, round) in [false, true]
        .into_iter()
        .flat_map(|d| (0..3).map(move |r| (d, r)))
    {
        let steps: Vec<u64> = (0..b as u64).map(|i| 1000 * round + i).collect();
        let (cpu_accepted, cpu_emitted) = verify(CPU, bf16_rows, &steps, 0, b);
        let (gpu_accepted, gpu_emitted) = verify(GPU, bf16_rows, &steps, 0, b);
        let context = format!("bf16 {bf16_rows}, round {round}");
        eprintln!("{context}: accepted {gpu_accepted:?}");
        assert_eq!(gpu_accepted, cpu_accepted, "{context}: accepted counts");
        assert_eq!(gpu_emitted, cpu_emitted, "{context}: emitted tokens");
        for first in [0, 7, 16, 23] {
            let (a, e) = verify(GPU, bf16_rows, &steps, first, 1);
            assert_eq!(
                a[0], gpu_accepted[first],
                "{context}: request {first} alone"
            );
            assert_eq!(
                e,
                gpu_emitted[first * width..(first + 1) * width],
                "{context}: request {first} alone"
            );
        }
    }
}

/// A drafted token with q = 0 under its draft row cannot have been drawn from it: the CPU refuses the call naming
/// the token, the GPU flags that request alone (before, both accepted it whenever p > 0). Four chains of two
/// drafts with draft rows, f32 logits: request 1's first draft is masked in its draft row; request 2 has top-k 1,
/// which (without the drafter's own parameters) also filters its draft rows to token 0. With the drafter's
/// parameters (top-k off) request 2 verifies, and its tokens equal the CPU's. Requests 0 and 3 are untouched.
#[test]
fn a_draft_of_zero_draft_probability_is_flagged_alone() {
    const NAME: &str = "a_draft_of_zero_draft_probability_is_flagged_alone";
    if gpu(NAME).is_none() {
        return;
    }
    let mut rng = common::rng(NAME);
    let (b, k, v) = (4usize, 2usize, 300usize);
    let mut target: Vec<f32> = (0..b * (k + 1) * v)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let mut draft: Vec<f32> = (0..b * k * v)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    // Token 0 is the unique maximum of every row, and every draft is another token.
    for row in target.chunks_mut(v).chain(draft.chunks_mut(v)) {
        row[0] = 5.0;
    }
    let tokens: Vec<i32> = (0..b * k).map(|_| rng.random_range(1..v as i32)).collect();
    draft[2 * v + tokens[2] as usize] = f32::NEG_INFINITY; // request 1, draft 0
    let offsets: Vec<i32> = (0..=b).map(|i| (i * k) as i32).collect();
    let temperature = vec![1.0f32; b];
    let top_k = vec![-1, -1, 1, -1];
    let off = vec![-1i32; b];
    let (seeds, steps) = (vec![11u64, 12, 13, 14], vec![0u64; b]);
    let run = |verify: Verify, requests: &[usize], drafter_params: bool| {
        let pick = |rows: &[f32], per: usize| -> Vec<f32> {
            requests
                .iter()
                .flat_map(|&r| rows[r * per * v..(r + 1) * per * v].to_vec())
                .collect()
        };
        let (target, draft) = (pick(&target, k + 1), pick(&draft, k));
        let tokens: Vec<i32> = requests
            .iter()
            .flat_map(|&r| tokens[r * k..(r + 1) * k].to_vec())
            .collect();
        let n = requests.len();
        let select = |x: &[i32]| requests.iter().map(|&r| x[r]).collect::<Vec<i32>>();
        let (top_k, off) = (select(&top_k), select(&off));
        let seeds: Vec<u64> = requests.iter().map(|&r| seeds[r]).collect();
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Chain {
                draft_offsets: (&offsets[..=n]).into(),
                draft_tokens: (&tokens).into(),
            },
            target: Rows::LogitsF32((&target).into()),
            draft: Some(Rows::LogitsF32((&draft).into())),
            params: Some(SamplingParams {
                temperature: (&temperature[..n]).into(),
                top_k: Some((&top_k).into()),
                top_p: None,
            }),
            draft_params: drafter_params.then_some(SamplingParams {
                temperature: (&temperature[..n]).into(),
                top_k: Some((&off).into()),
                top_p: None,
            }),
            seeds: (&seeds).into(),
            steps: (&steps[..n]).into(),
        };
        let (mut a, mut e) = (vec![POISON; n], vec![POISON; n * (k + 1)]);
        verify(
            &inputs,
            VerifyOutputs {
                emit_width: k + 1,
                accepted_counts: (&mut a).into(),
                emitted_tokens: (&mut e).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            },
        )
        .map(|()| (a, e))
    };
    for drafter_params in [false, true] {
        let (a, e) = run(GPU, &[0, 1, 2, 3], drafter_params).expect("the GPU flags per request");
        let flagged: Vec<usize> = (0..b).filter(|&r| a[r] == -1).collect();
        let want = if drafter_params { vec![1] } else { vec![1, 2] };
        assert_eq!(
            flagged, want,
            "drafter parameters {drafter_params}: flagged requests"
        );
        for &r in &flagged {
            assert!(e[r * (k + 1)..(r + 1) * (k + 1)].iter().all(|&x| x == -1));
        }
        match run(CPU, &[0, 1, 2, 3], drafter_params) {
            Err(Error::InvalidArgument { argument, reason }) => {
                assert_eq!(argument, "draft_tokens[2]", "{reason}");
                assert!(reason.contains("probability 0"), "{reason}");
            }
            other => panic!("the CPU must refuse the batch: {other:?}"),
        }
        for r in (0..b).filter(|r| !flagged.contains(r)) {
            let (ca, ce) = run(CPU, &[r], drafter_params).expect("a valid request alone");
            assert_eq!(
                (a[r], &e[r * (k + 1)..(r + 1) * (k + 1)]),
                (ca[0], &ce[..]),
                "request {r}"
            );
        }
    }
}

/// What the sampler does not read, it does not check, on the GPU as on the CPU: three trees (a root with children
/// 1 and 2) with draft rows; request 0 has a NaN in a leaf's draft row, request 1 runs at temperature 0 with NaN
/// draft rows and a drafter temperature of 0, request 2 is clean. None is flagged, and the tokens equal the CPU's
/// (before, requests 0 and 1 were flagged on the GPU and failed the call on the CPU).
#[test]
fn rows_and_parameters_that_are_not_read_are_not_checked() {
    const NAME: &str = "rows_and_parameters_that_are_not_read_are_not_checked";
    if gpu(NAME).is_none() {
        return;
    }
    let mut rng = common::rng(NAME);
    let (b, v) = (3usize, 50usize);
    let target: Vec<f32> = (0..b * 3 * v)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let mut draft: Vec<f32> = (0..b * 3 * v)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    draft[v + 7] = f32::NAN; // request 0, node 1 (a leaf)
    draft[3 * v..6 * v].fill(f32::NAN); // request 1, every draft row
    let tokens: Vec<i32> = (0..b)
        .flat_map(|_| {
            [
                -1,
                rng.random_range(0..v as i32),
                rng.random_range(0..v as i32),
            ]
        })
        .collect();
    let parents: Vec<i32> = (0..b).flat_map(|_| [-1, 0, 0]).collect();
    let offsets = [0, 3, 6, 9];
    let temperature = [1.0f32, 0.0, 0.9];
    let draft_temperature = [1.0f32, 0.0, 1.1];
    let run = |verify: Verify| {
        let inputs = VerifyInputs {
            vocab_size: v,
            drafts: Drafts::Tree {
                node_offsets: (&offsets).into(),
                node_tokens: (&tokens).into(),
                parents: (&parents).into(),
            },
            target: Rows::LogitsF32((&target).into()),
            draft: Some(Rows::LogitsF32((&draft).into())),
            params: Some(SamplingParams {
                temperature: (&temperature).into(),
                top_k: None,
                top_p: None,
            }),
            draft_params: Some(SamplingParams {
                temperature: (&draft_temperature).into(),
                top_k: None,
                top_p: None,
            }),
            seeds: (&[4, 5, 6]).into(),
            steps: (&[1, 1, 1]).into(),
        };
        let (mut a, mut e) = (vec![POISON; b], vec![POISON; b * 2]);
        verify(
            &inputs,
            VerifyOutputs {
                emit_width: 2,
                accepted_counts: (&mut a).into(),
                emitted_tokens: (&mut e).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            },
        )
        .expect("nothing read is bad");
        (a, e)
    };
    let (gpu_accepted, gpu_emitted) = run(GPU);
    assert!(
        gpu_accepted.iter().all(|&n| n >= 0),
        "flagged: {gpu_accepted:?}"
    );
    assert_eq!((gpu_accepted, gpu_emitted), run(CPU));
}
