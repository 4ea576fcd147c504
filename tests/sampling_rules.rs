//! The rules of the rejection samplers other than exactness: a request's result depends only on its own inputs,
//! seed and step; temperature 0 is greedy verification; bad input gets an error naming the argument.

mod common;

use half::bf16;
use rand::Rng;
use specdec::cpu;
use specdec::sampling::{Drafts, Rows, SamplingParams, VerifyInputs, VerifyOutputs};
use specdec::{Error, RequestStatus};

/// A batch of chain requests with bf16 logits and draft rows, ready to be verified whole or in parts.
#[derive(Clone)]
struct ChainBatch {
    vocab: usize,
    drafts: Vec<Vec<i32>>,
    /// Per request: k + 1 target rows, then k draft rows.
    target: Vec<Vec<bf16>>,
    draft: Vec<Vec<bf16>>,
    temperature: Vec<f32>,
    top_k: Vec<i32>,
    top_p: Vec<f32>,
    seeds: Vec<u64>,
    steps: Vec<u64>,
}

/// One request's outputs: (accepted, emitted, nodes, flags).
type Result1 = (i32, Vec<i32>, Vec<i32>, Vec<i8>);

impl ChainBatch {
    fn random(rng: &mut impl Rng, b: usize, vocab: usize) -> ChainBatch {
        let mut batch = ChainBatch {
            vocab,
            drafts: vec![],
            target: vec![],
            draft: vec![],
            temperature: vec![],
            top_k: vec![],
            top_p: vec![],
            seeds: vec![],
            steps: vec![],
        };
        for i in 0..b {
            let k = rng.random_range(0..6);
            let mut row = |n: usize| -> Vec<bf16> {
                (0..n * vocab)
                    .map(|_| bf16::from_f32(rng.random_range(-3.0..3.0)))
                    .collect()
            };
            let target = row(k + 1);
            let draft = row(k);
            // Half the drafts are the target's argmax, so that chains get accepted.
            let drafts = (0..k)
                .map(|j| {
                    if rng.random_bool(0.5) {
                        common::naive_argmax(&target[j * vocab..(j + 1) * vocab]) as i32
                    } else {
                        rng.random_range(0..vocab as i32)
                    }
                })
                .collect();
            batch.drafts.push(drafts);
            batch.target.push(target);
            batch.draft.push(draft);
            batch.temperature.push([0.0, 0.7, 1.0, 1.3][i % 4]);
            batch.top_k.push(if i % 3 == 0 { 5 } else { -1 });
            batch.top_p.push(if i % 5 == 0 { 0.9 } else { 1.0 });
            batch.seeds.push(rng.random());
            batch.steps.push(rng.random_range(0..1000));
        }
        batch
    }

    fn subset(&self, order: &[usize]) -> ChainBatch {
        fn pick<T: Copy>(v: &[T], order: &[usize]) -> Vec<T> {
            order.iter().map(|&i| v[i]).collect()
        }
        ChainBatch {
            vocab: self.vocab,
            drafts: order.iter().map(|&i| self.drafts[i].clone()).collect(),
            target: order.iter().map(|&i| self.target[i].clone()).collect(),
            draft: order.iter().map(|&i| self.draft[i].clone()).collect(),
            temperature: pick(&self.temperature, order),
            top_k: pick(&self.top_k, order),
            top_p: pick(&self.top_p, order),
            seeds: pick(&self.seeds, order),
            steps: pick(&self.steps, order),
        }
    }

    fn run(&self, with_q: bool) -> Result<Vec<Result1>, Error> {
        let b = self.drafts.len();
        let width = 7;
        let mut offsets = vec![0i32];
        for d in &self.drafts {
            offsets.push(offsets.last().unwrap() + d.len() as i32);
        }
        let tokens: Vec<i32> = self.drafts.concat();
        let target: Vec<bf16> = self.target.concat();
        let draft: Vec<bf16> = self.draft.concat();
        // The drafter samples its unfiltered softmax (a positive temperature, no top-k or top-p), so that every
        // draft has probability under its draft row.
        let draft_temperature: Vec<f32> = self
            .temperature
            .iter()
            .map(|&t| if t > 0.0 { t } else { 1.0 })
            .collect();
        let inputs = VerifyInputs {
            vocab_size: self.vocab,
            drafts: Drafts::Chain {
                draft_offsets: (&offsets).into(),
                draft_tokens: (&tokens).into(),
            },
            target: Rows::LogitsBF16((&target).into()),
            draft: with_q.then_some(Rows::LogitsBF16((&draft).into())),
            params: Some(SamplingParams {
                temperature: (&self.temperature).into(),
                top_k: Some((&self.top_k).into()),
                top_p: Some((&self.top_p).into()),
            }),
            draft_params: with_q.then_some(SamplingParams {
                temperature: (&draft_temperature).into(),
                top_k: None,
                top_p: None,
            }),
            seeds: (&self.seeds).into(),
            steps: (&self.steps).into(),
        };
        let mut accepted = vec![-7; b];
        let mut emitted = vec![-7; b * width];
        let mut nodes = vec![-7; b * width];
        let mut flags = vec![-7i8; b * width];
        let outputs = VerifyOutputs {
            emit_width: width,
            accepted_counts: (&mut accepted).into(),
            emitted_tokens: (&mut emitted).into(),
            accepted_nodes: Some((&mut nodes).into()),
            accept_flags: Some((&mut flags).into()),
            request_status: None,
        };
        cpu::rejection_verify(&inputs, outputs)?;
        Ok((0..b)
            .map(|i| {
                let r = i * width..(i + 1) * width;
                (
                    accepted[i],
                    emitted[r.clone()].to_vec(),
                    nodes[r.clone()].to_vec(),
                    flags[r].to_vec(),
                )
            })
            .collect())
    }
}

#[test]
fn a_request_depends_only_on_its_inputs_seed_and_step() {
    // vllm#6038: per-request seeds ignored; flashinfer: the stream depends on the batch position.
    let mut rng = common::rng("a_request_depends_only_on_its_inputs_seed_and_step");
    let batch = ChainBatch::random(&mut rng, 24, 301);
    for with_q in [true, false] {
        let whole = batch.run(with_q).unwrap();
        let reversed: Vec<usize> = (0..24).rev().collect();
        let backwards = batch.subset(&reversed).run(with_q).unwrap();
        for i in 0..24 {
            assert_eq!(
                whole[i],
                backwards[23 - i],
                "request {i} changed with its batch position"
            );
            assert_eq!(
                whole[i],
                batch.subset(&[i]).run(with_q).unwrap()[0],
                "request {i} changed alone"
            );
        }
        // A different seed or step changes some sampled results (temperature > 0), never a greedy one.
        for change in ["seed", "step"] {
            let mut other = batch.clone();
            for i in 0..24 {
                if change == "seed" {
                    other.seeds[i] ^= 0x9E37_79B9;
                } else {
                    other.steps[i] += 1;
                }
            }
            let moved = other.run(with_q).unwrap();
            let differ = (0..24).filter(|&i| moved[i] != whole[i]).count();
            assert!(
                differ >= 6,
                "only {differ} of 24 requests changed with the {change}"
            );
            for i in (0..24).filter(|i| i % 4 == 0) {
                assert_eq!(
                    moved[i], whole[i],
                    "greedy request {i} changed with the {change}"
                );
            }
        }
    }
}

#[test]
fn temperature_zero_is_greedy_verification_mixed_in_a_batch() {
    let mut rng = common::rng("temperature_zero_is_greedy_verification_mixed_in_a_batch");
    let batch = ChainBatch::random(&mut rng, 40, 1000);
    for with_q in [true, false] {
        let results = batch.run(with_q).unwrap();
        for i in (0..40).filter(|i| i % 4 == 0) {
            let k = batch.drafts[i].len();
            let (mut accepted, mut emitted) = ([0i32], vec![0i32; k + 1]);
            cpu::greedy_verify(
                &batch.target[i],
                1000,
                &[0, k as i32],
                &batch.drafts[i],
                k + 1,
                &mut accepted,
                &mut emitted,
                None,
            )
            .unwrap();
            assert_eq!(results[i].0, accepted[0], "request {i}");
            assert_eq!(&results[i].1[..k + 1], &emitted[..], "request {i}");
        }
    }
}

#[test]
fn temperature_zero_is_greedy_verification_bad_rows_included() {
    let mut rng = common::rng("temperature_zero_is_greedy_verification_bad_rows_included");
    common::sampling::temperature_zero_is_greedy_with_bad_rows(cpu::rejection_verify, &mut rng);
}

/// A one-request tree call on probabilities; `edit` breaks one input.
fn tree_call(edit: impl FnOnce(&mut TreeCall)) -> Checked {
    let mut c = TreeCall {
        vocab: 8,
        offsets: vec![0, 4],
        tokens: vec![-1, 1, 2, 3],
        parents: vec![-1, 0, 0, 1],
        target: vec![0.125; 32],
        draft: Some(vec![0.125; 32]),
        seeds: vec![1],
        steps: vec![0],
        width: 3,
    };
    edit(&mut c);
    let drafts = Drafts::Tree {
        node_offsets: (&c.offsets).into(),
        node_tokens: (&c.tokens).into(),
        parents: (&c.parents).into(),
    };
    let inputs = VerifyInputs {
        vocab_size: c.vocab,
        drafts,
        target: Rows::Probs((&c.target).into()),
        draft: c.draft.as_deref().map(|d| Rows::Probs(d.into())),
        params: None,
        draft_params: None,
        seeds: (&c.seeds).into(),
        steps: (&c.steps).into(),
    };
    both_modes(&inputs, c.offsets.len().saturating_sub(1), c.width)
}

struct TreeCall {
    vocab: usize,
    offsets: Vec<i32>,
    tokens: Vec<i32>,
    parents: Vec<i32>,
    target: Vec<f32>,
    draft: Option<Vec<f32>>,
    seeds: Vec<u64>,
    steps: Vec<u64>,
    width: usize,
}

/// A call made twice: without `request_status` (`result`: the whole call fails with the first bad request's
/// error) and with it (`flagged`: the status of the first request flagged alone, when the call itself is sound).
struct Checked {
    result: Result<(), Error>,
    flagged: Option<RequestStatus>,
    /// Whether the call was also made with `request_status`.
    both_modes: bool,
}

impl Checked {
    fn unwrap(self) {
        self.result.unwrap()
    }
}

impl From<Result<(), Error>> for Checked {
    fn from(result: Result<(), Error>) -> Checked {
        Checked {
            result,
            flagged: None,
            both_modes: false,
        }
    }
}

/// Verifies `inputs` (B requests, `width` tokens each) on the CPU without and with `request_status` and checks
/// the two modes agree: a call that succeeds succeeds alike with every status 0 and the same outputs; a call
/// refused for its shape (a call-level argument) is refused alike; a call refused for a bad request writes
/// nothing, while with `request_status` it succeeds, flags that request (status, `accepted_counts` -1, a row of
/// -1) and processes the others.
fn both_modes(inputs: &VerifyInputs<'_>, b: usize, width: usize) -> Checked {
    let run = |status: Option<&mut [i32]>| {
        let (mut accepted, mut emitted) = (vec![-9; b], vec![-9; b * width]);
        let result = cpu::rejection_verify(
            inputs,
            VerifyOutputs {
                emit_width: width,
                accepted_counts: (&mut accepted).into(),
                emitted_tokens: (&mut emitted).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: status.map(Into::into),
            },
        );
        (result, accepted, emitted)
    };
    let (result, accepted, emitted) = run(None);
    let mut status = vec![-9; b];
    let (flag_result, flag_accepted, flag_emitted) = run(Some(&mut status));
    let mut flagged = None;
    match (&result, &flag_result) {
        (Ok(()), Ok(())) => {
            assert!(status.iter().all(|&s| s == 0), "statuses {status:?}");
            assert_eq!((&accepted, &emitted), (&flag_accepted, &flag_emitted));
        }
        (Err(error), Err(flag_error)) => {
            assert_eq!(
                error, flag_error,
                "a call-level error differs between modes"
            );
            assert!(
                status.iter().all(|&s| s == -9),
                "status written by a failing call"
            );
        }
        (Err(_), Ok(())) => {
            for r in 0..b {
                let code = status[r];
                let row = &flag_emitted[r * width..(r + 1) * width];
                if code == 0 {
                    assert!(flag_accepted[r] >= 0, "request {r} processed");
                } else {
                    let s = RequestStatus::from_code(code)
                        .unwrap_or_else(|| panic!("status {code} of request {r} is no code"));
                    flagged.get_or_insert(s);
                    assert_eq!(flag_accepted[r], -1, "flagged request {r}");
                    assert!(row.iter().all(|&x| x == -1), "flagged request {r}: {row:?}");
                }
            }
            assert!(
                flagged.is_some(),
                "the call failed but no request is flagged"
            );
        }
        (Ok(()), Err(e)) => panic!("request_status turned a good call into {e:?}"),
    }
    if result.is_err() {
        assert!(
            accepted.iter().chain(&emitted).all(|&x| x == -9),
            "outputs written by a failing call"
        );
    }
    Checked {
        result,
        flagged,
        both_modes: true,
    }
}

/// The status a request is flagged with for an error naming `argument` for `reason` (the table of
/// `specdec::RequestStatus`); `None` for an argument of the whole call (no element index).
fn status_of(argument: &str, reason: &str) -> Option<RequestStatus> {
    let name = argument.split('[').next().unwrap();
    if name == argument {
        return (name == "emit_width").then_some(RequestStatus::EmitWidth);
    }
    Some(match name {
        "draft_offsets" | "node_offsets" => RequestStatus::Offsets,
        "parents" => RequestStatus::Parents,
        "draft_tokens" | "node_tokens" if reason.contains("probability 0") => {
            RequestStatus::DraftedTokenMass
        }
        "draft_tokens" | "node_tokens" if reason.contains("cannot have been drawn") => {
            RequestStatus::DraftedTokenMass
        }
        "draft_tokens" | "node_tokens" => RequestStatus::DraftToken,
        "target" | "draft" => RequestStatus::RowValues,
        _ if reason.contains("overflows") => RequestStatus::RowValues,
        "temperature" | "top_k" | "top_p" | "draft_temperature" | "draft_top_k" | "draft_top_p" => {
            RequestStatus::SamplingParams
        }
        other => panic!("no status for {other}"),
    })
}

/// `checked` failed with an error naming `argument` whose reason says `words`; made in both modes, the request
/// was flagged with the status of that rule (or, for an argument of the whole call, refused alike).
fn assert_names(checked: impl Into<Checked>, argument: &str, words: &str) {
    let checked = checked.into();
    match checked.result {
        Err(Error::InvalidArgument {
            argument: a,
            reason,
        }) => {
            assert_eq!(a, argument, "reason: {reason}");
            assert!(
                reason.contains(words),
                "{argument}: {reason:?} does not say {words:?}"
            );
            if checked.both_modes {
                assert_eq!(
                    checked.flagged,
                    status_of(argument, &reason),
                    "the status of {argument}: {reason}"
                );
            }
        }
        other => panic!("expected an error naming {argument}, got {other:?}"),
    }
}

#[test]
fn bad_trees_and_probabilities_are_errors_naming_the_element() {
    tree_call(|_| {}).unwrap();
    assert_names(tree_call(|c| c.parents[3] = 3), "parents[3]", "topological");
    assert_names(
        tree_call(|c| c.parents[2] = -1),
        "parents[2]",
        "topological",
    );
    assert_names(tree_call(|c| c.parents[0] = 0), "parents[0]", "root");
    assert_names(
        tree_call(|c| c.tokens[2] = 8),
        "node_tokens[2]",
        "vocabulary",
    );
    assert_names(tree_call(|c| c.tokens[1] = -1), "node_tokens[1]", "padding");
    assert_names(tree_call(|c| c.width = 2), "emit_width", "path of 2");
    // An empty tree beside a real one (request 0 has no nodes, request 1 all four).
    assert_names(
        tree_call(|c| {
            c.offsets = vec![0, 0, 4];
            c.seeds = vec![1, 2];
            c.steps = vec![0, 0];
        }),
        "node_offsets[1]",
        "1..=64",
    );
    // The offsets cover the node arrays: they start at 0 and end at the number of nodes (before, a batch that
    // started later or ended early was accepted and its other nodes ignored).
    assert_names(
        tree_call(|c| c.offsets = vec![0, 3]),
        "node_offsets[1]",
        "ends at the array's end, 4",
    );
    assert_names(
        tree_call(|c| c.offsets = vec![1, 4]),
        "node_offsets[0]",
        "starts at 0",
    );
    assert_names(
        tree_call(|c| c.offsets = vec![0, 5]),
        "node_offsets[1]",
        "at most 4",
    );
    assert_names(
        tree_call(|c| c.target[9] = -0.5),
        "target[1, 1]",
        "finite and >= 0",
    );
    assert_names(
        tree_call(|c| c.target[9] = f32::NAN),
        "target[1, 1]",
        "finite",
    );
    assert_names(
        tree_call(|c| c.target[8..16].fill(0.0)),
        "target[1]",
        "no probability mass",
    );
    assert_names(
        tree_call(|c| c.draft.as_mut().unwrap()[9] = f32::INFINITY),
        "draft[1, 1]",
        "finite",
    );
    // A leaf's draft row (node 2's, and node 3's) is not read, so it is not checked: not even its values.
    tree_call(|c| c.draft.as_mut().unwrap()[17] = f32::INFINITY).unwrap();
    // A leaf's draft row is not a distribution anything was drawn from: it may be all zero.
    tree_call(|c| c.draft.as_mut().unwrap()[24..].fill(0.0)).unwrap();
    assert_names(
        tree_call(|c| c.draft.as_mut().unwrap()[8..16].fill(0.0)),
        "draft[1]",
        "no probability mass",
    );
    // Rows read as distributions sum to 1 within 1e-3 (before: a target row summing to 2 gave a wrong
    // distribution silently); a leaf's draft row is not read, so it may sum to anything.
    assert_names(
        tree_call(|c| c.target[8..16].iter_mut().for_each(|p| *p *= 2.0)),
        "target[1]",
        "sums to 2",
    );
    assert_names(
        tree_call(|c| c.draft.as_mut().unwrap()[0] += 0.01),
        "draft[0]",
        "sums to 1.01",
    );
    tree_call(|c| c.target[8] += 0.0005).unwrap();
    tree_call(|c| c.draft.as_mut().unwrap()[24..].fill(0.5)).unwrap();
    assert_names(tree_call(|c| c.seeds.clear()), "seeds", "");
    assert_names(
        tree_call(|c| c.target.pop().map(|_| ()).unwrap()),
        "target",
        "",
    );
    assert_names(tree_call(|c| c.vocab = 0), "vocab_size", "");
    // 63 drafts fit (the one maximum of specdec::tree: 64 nodes with the root); 64 do not.
    let chain = |n: usize| {
        move |c: &mut TreeCall| {
            c.offsets = vec![0, n as i32];
            c.tokens = (0..n as i32).map(|i| i % 8).collect();
            c.parents = (-1..n as i32 - 1).collect();
            c.target = vec![0.125; 8 * n];
            c.draft = None;
            c.width = n;
        }
    };
    tree_call(chain(64)).unwrap();
    assert_names(tree_call(chain(65)), "node_offsets[1]", "1..=64");
}

/// A one-request chain call on f32 logits with sampling parameters; `edit` breaks one input.
fn chain_call(
    edit: impl FnOnce(&mut Vec<f32>, &mut Vec<i32>, &mut f32, &mut i32, &mut f32),
) -> Checked {
    let (mut logits, mut drafts) = (vec![0.5f32; 3 * 10], vec![1, 2]);
    let (mut t, mut k, mut p) = (1.0f32, -1i32, 1.0f32);
    edit(&mut logits, &mut drafts, &mut t, &mut k, &mut p);
    let inputs = VerifyInputs {
        vocab_size: 10,
        drafts: Drafts::Chain {
            draft_offsets: (&[0, 2]).into(),
            draft_tokens: (&drafts).into(),
        },
        target: Rows::LogitsF32((&logits).into()),
        draft: None,
        params: Some(SamplingParams {
            temperature: std::slice::from_ref(&t).into(),
            top_k: Some(std::slice::from_ref(&k).into()),
            top_p: Some(std::slice::from_ref(&p).into()),
        }),
        draft_params: None,
        seeds: (&[3]).into(),
        steps: (&[4]).into(),
    };
    both_modes(&inputs, 1, 3)
}

#[test]
fn bad_logits_and_sampling_parameters_are_errors_naming_the_element() {
    chain_call(|_, _, _, _, _| {}).unwrap();
    assert_names(
        chain_call(|_, d, _, _, _| d[1] = 10),
        "draft_tokens[1]",
        "vocabulary",
    );
    assert_names(
        chain_call(|l, _, _, _, _| l[13] = f32::NAN),
        "target[1, 3]",
        "NaN",
    );
    assert_names(
        chain_call(|l, _, _, _, _| l[13] = f32::INFINITY),
        "target[1, 3]",
        "+inf",
    );
    assert_names(
        chain_call(|l, _, _, _, _| l[10..20].fill(f32::NEG_INFINITY)),
        "target[1]",
        "no finite logit",
    );
    // -inf is a masked token, not an error.
    chain_call(|l, _, _, _, _| l[13] = f32::NEG_INFINITY).unwrap();
    assert_names(
        chain_call(|_, _, t, _, _| *t = -0.5),
        "temperature[0]",
        ">= 0",
    );
    assert_names(
        chain_call(|_, _, t, _, _| *t = f32::NAN),
        "temperature[0]",
        "finite",
    );
    assert_names(
        chain_call(|_, _, t, _, _| *t = f32::INFINITY),
        "temperature[0]",
        "finite",
    );
    assert_names(chain_call(|_, _, _, k, _| *k = 0), "top_k[0]", "-1 (off)");
    assert_names(chain_call(|_, _, _, k, _| *k = 11), "top_k[0]", "1..=10");
    assert_names(chain_call(|_, _, _, k, _| *k = -2), "top_k[0]", "-1 (off)");
    chain_call(|_, _, _, k, _| *k = 10).unwrap();
    for bad in [0.0, -0.1, 1.5, f32::NAN] {
        assert_names(chain_call(|_, _, _, _, p| *p = bad), "top_p[0]", "(0, 1]");
    }
    // A temperature so small that logit / temperature overflows is an error, not a row of infinities.
    assert_names(
        chain_call(|l, _, t, _, _| {
            l[0] = 3e38;
            *t = 0.1;
        }),
        "temperature[0]",
        "overflows",
    );
}

#[test]
fn inputs_of_the_wrong_kind_are_errors() {
    let logits = vec![0.0f32; 20];
    let probs = vec![0.1f32; 10];
    let base = || VerifyInputs {
        vocab_size: 10,
        drafts: Drafts::Chain {
            draft_offsets: (&[0, 1]).into(),
            draft_tokens: (&[1]).into(),
        },
        target: Rows::LogitsF32((&logits).into()),
        draft: None,
        params: None,
        draft_params: None,
        seeds: (&[1]).into(),
        steps: (&[1]).into(),
    };
    let run = |inputs: VerifyInputs<'_>| {
        let (mut a, mut e) = ([0], [0; 2]);
        cpu::rejection_verify(
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
    };
    assert_names(run(base()), "params", "temperature");
    let params = || SamplingParams {
        temperature: (&[1.0]).into(),
        top_k: None,
        top_p: None,
    };
    assert_names(
        run(VerifyInputs {
            params: Some(params()),
            draft: Some(Rows::Probs((&probs).into())),
            ..base()
        }),
        "draft",
        "same kind",
    );
    let probs2 = vec![0.1f32; 20];
    assert_names(
        run(VerifyInputs {
            target: Rows::Probs((&probs2).into()),
            params: Some(params()),
            ..base()
        }),
        "params",
        "probabilities take no",
    );
    assert_names(
        run(VerifyInputs {
            params: Some(SamplingParams {
                temperature: (&[1.0, 1.0]).into(),
                ..params()
            }),
            ..base()
        }),
        "temperature",
        "",
    );
}

/// One request with draft rows (f32 logits, V = 6; target logits 0, draft logits 2 for token 0 and 0 for the
/// rest): a chain of drafts [1, 2], or the tree of a
/// root with children 1 and 2; `edit` changes the drafter's rows, the parameters or the drafter's parameters.
struct DraftedCall {
    tree: bool,
    draft: Vec<f32>,
    temperature: f32,
    top_k: i32,
    draft_params: Option<(f32, i32, f32)>,
}

fn drafted_call(edit: impl FnOnce(&mut DraftedCall)) -> Checked {
    let mut c = DraftedCall {
        tree: false,
        draft: [2.0, 0.0, 0.0, 0.0, 0.0, 0.0].repeat(3),
        temperature: 1.0,
        top_k: -1,
        draft_params: None,
    };
    edit(&mut c);
    let (offsets, tokens, parents, target_rows, draft_rows) = if c.tree {
        (vec![0, 3], vec![-1, 1, 2], vec![-1, 0, 0], 3, 3)
    } else {
        (vec![0, 2], vec![1, 2], vec![], 3, 2)
    };
    let target = vec![0.0f32; target_rows * 6];
    let drafts = if c.tree {
        Drafts::Tree {
            node_offsets: (&offsets).into(),
            node_tokens: (&tokens).into(),
            parents: (&parents).into(),
        }
    } else {
        Drafts::Chain {
            draft_offsets: (&offsets).into(),
            draft_tokens: (&tokens).into(),
        }
    };
    let (dt, dk, dp) = c.draft_params.unwrap_or((1.0, -1, 1.0));
    let (dt, dk, dp) = ([dt], [dk], [dp]);
    let inputs = VerifyInputs {
        vocab_size: 6,
        drafts,
        target: Rows::LogitsF32((&target).into()),
        draft: Some(Rows::LogitsF32((&c.draft[..draft_rows * 6]).into())),
        params: Some(SamplingParams {
            temperature: std::slice::from_ref(&c.temperature).into(),
            top_k: Some(std::slice::from_ref(&c.top_k).into()),
            top_p: None,
        }),
        draft_params: c.draft_params.map(|_| SamplingParams {
            temperature: (&dt).into(),
            top_k: Some((&dk).into()),
            top_p: Some((&dp).into()),
        }),
        seeds: (&[3]).into(),
        steps: (&[4]).into(),
    };
    both_modes(&inputs, 1, 3)
}

/// A drafted token with q = 0 under its draft row (masked, or removed by the draft's top-k) cannot have been
/// drawn from it: an error naming the token, never an acceptance (before, `u q(x) < p(x)` accepted it whenever
/// p(x) > 0). The drafter's own parameters are checked by their own names.
#[test]
fn zero_draft_probability_drafts_and_bad_draft_parameters_are_errors_naming_the_element() {
    drafted_call(|_| {}).unwrap();
    drafted_call(|c| c.tree = true).unwrap();
    // Chain: draft 0 (token 1) is scored by draft row 0; tree: node 2 (token 2) by the root's draft row 0.
    assert_names(
        drafted_call(|c| c.draft[1] = f32::NEG_INFINITY),
        "draft_tokens[0]",
        "cannot have been drawn",
    );
    assert_names(
        drafted_call(|c| {
            c.tree = true;
            c.draft[2] = f32::NEG_INFINITY;
        }),
        "node_tokens[2]",
        "probability 0",
    );
    // The target's top-k 1 applied to the draft rows (no draft parameters) keeps only token 0 there (the target's
    // rows tie, so it keeps all of them)...
    assert_names(
        drafted_call(|c| c.top_k = 1),
        "draft_tokens[0]",
        "probability 0",
    );
    // ...while the drafter's own parameters (no top-k) keep every token.
    drafted_call(|c| {
        c.top_k = 1;
        c.draft_params = Some((1.0, -1, 1.0));
    })
    .unwrap();
    // At temperature 0 the draft rows are ignored, so a zero-probability draft is no error.
    drafted_call(|c| {
        c.temperature = 0.0;
        c.draft[1] = f32::NEG_INFINITY;
    })
    .unwrap();
    assert_names(
        drafted_call(|c| c.draft_params = Some((0.0, -1, 1.0))),
        "draft_temperature[0]",
        "point masses",
    );
    assert_names(
        drafted_call(|c| c.draft_params = Some((f32::NAN, -1, 1.0))),
        "draft_temperature[0]",
        "finite",
    );
    assert_names(
        drafted_call(|c| c.draft_params = Some((1.0, 7, 1.0))),
        "draft_top_k[0]",
        "1..=6",
    );
    assert_names(
        drafted_call(|c| c.draft_params = Some((1.0, -1, 0.0))),
        "draft_top_p[0]",
        "(0, 1]",
    );
    // A draft logit that overflows when divided by the draft temperature names that temperature.
    assert_names(
        drafted_call(|c| {
            c.draft[4] = 3e38;
            c.draft_params = Some((0.5, -1, 1.0));
        }),
        "draft_temperature[0]",
        "overflows",
    );
}

#[test]
fn draft_parameters_need_draft_logits() {
    let probs = vec![0.25f32; 3 * 4];
    let one = [1.0f32];
    let inputs = VerifyInputs {
        vocab_size: 4,
        drafts: Drafts::Chain {
            draft_offsets: (&[0, 2]).into(),
            draft_tokens: (&[1, 2]).into(),
        },
        target: Rows::Probs((&probs).into()),
        draft: Some(Rows::Probs((&probs[..8]).into())),
        params: None,
        draft_params: Some(SamplingParams {
            temperature: (&one).into(),
            top_k: None,
            top_p: None,
        }),
        seeds: (&[1]).into(),
        steps: (&[1]).into(),
    };
    let (mut accepted, mut emitted) = ([0], [0; 3]);
    macro_rules! outputs {
        () => {
            VerifyOutputs {
                emit_width: 3,
                accepted_counts: (&mut accepted).into(),
                emitted_tokens: (&mut emitted).into(),
                accepted_nodes: None,
                accept_flags: None,
                request_status: None,
            }
        };
    }
    assert_names(
        cpu::rejection_verify(&inputs, outputs!()),
        "draft_params",
        "draft logits only",
    );
    let logits = vec![0.0f32; 3 * 4];
    let no_draft_rows = VerifyInputs {
        target: Rows::LogitsF32((&logits).into()),
        draft: None,
        params: Some(SamplingParams {
            temperature: (&one).into(),
            top_k: None,
            top_p: None,
        }),
        ..inputs
    };
    assert_names(
        cpu::rejection_verify(&no_draft_rows, outputs!()),
        "draft_params",
        "draft logits only",
    );
}

/// What the sampler does not read, it does not check (issue 17 item 4): a leaf's draft row, and at temperature 0
/// every draft row and the drafter's parameters. Before, a NaN there failed the call.
#[test]
fn rows_and_parameters_that_are_not_read_are_not_checked() {
    // The tree: the root with children 1 and 2; node 1's draft row (a leaf's) holds a NaN.
    let leaf_nan = |c: &mut DraftedCall| {
        c.tree = true;
        c.draft[6 + 3] = f32::NAN;
    };
    drafted_call(leaf_nan).unwrap();
    // The root's draft row is read: the same NaN there is an error.
    assert_names(
        drafted_call(|c| {
            c.tree = true;
            c.draft[3] = f32::NAN;
        }),
        "draft[0, 3]",
        "NaN",
    );
    // Temperature 0: NaN draft rows and a drafter temperature of 0 are ignored.
    drafted_call(|c| {
        c.temperature = 0.0;
        c.draft[3] = f32::NAN;
        c.draft_params = Some((0.0, 99, -1.0));
    })
    .unwrap();
}

/// Samples of one prompt need their own seeds (the same seed and step give the same noise in any slot:
/// `a_request_depends_only_on_its_inputs_seed_and_step`): `sample_seed` gives distinct ones, whose draws differ.
#[test]
fn sample_seeds_are_distinct_and_a_seed_repeats_its_noise() {
    use specdec::sampling::noise::{sample_seed, RequestNoise};
    let seeds: std::collections::HashSet<u64> = (0..100_000).map(|i| sample_seed(42, i)).collect();
    assert_eq!(seeds.len(), 100_000);
    assert_ne!(sample_seed(42, 0), sample_seed(43, 0));
    let noise = |seed| RequestNoise { seed, step: 3 }.coin(0, 0);
    assert_ne!(noise(sample_seed(42, 7)), noise(sample_seed(42, 8)));
    assert_eq!(
        specdec::capi::specdec_sample_seed(42, 7),
        sample_seed(42, 7)
    );
}
