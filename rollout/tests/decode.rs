//! Losslessness on the real model: greedy speculative decoding emits the tokens greedy autoregressive decoding
//! emits. The two compute the same logits with different batch shapes (a tree of nodes against one token per
//! step), which may round differently in the last bits: a divergence is allowed only where the target's two
//! best logits are within `NEAR_TIE` of each other, and each one is reported.

use candle_core::{IndexOp, D};
use specdec::drafter::{Drafter, DrafterConfig};
use specdec::policy::{CostModel, Gpu, Overheads};
use specdec_rollout::engine::{decode, DecodeSettings, DecodeStats, Drafting, Request};
use specdec_rollout::model::{model_path, Config, GgufFile, Weights};
use specdec_rollout::policy::model_shape;
use specdec_rollout::target::{Target, GGUF_LLAMA_ROPE};
use specdec_rollout::tokenizer::{ChatTokenizer, Message};

/// Logit gap under which the argmax may differ between two batch shapes: 6x the largest difference seen
/// between them (tests/model.rs: 0.008 between a token fed alone and the same token in a chain).
const NEAR_TIE: f32 = 0.05;

const QUESTIONS: [&str; 3] = [
    "What is 12 plus 30?",
    "Write a Python function that returns the square of a number.",
    "Name three colors of the rainbow.",
];

fn setup() -> (Target, ChatTokenizer) {
    let mut file = GgufFile::open(&model_path().unwrap()).unwrap();
    let tok = ChatTokenizer::from_gguf(&file).unwrap();
    let weights = Weights::from_gguf(&mut file).unwrap();
    (
        Target::new(weights, 512, 16, 1024, GGUF_LLAMA_ROPE).unwrap(),
        tok,
    )
}

/// The model's configuration, read from the file.
fn model_config() -> &'static Config {
    static CONFIG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| {
        Config::from_gguf(&GgufFile::open(&model_path().unwrap()).unwrap()).unwrap()
    })
}

fn requests(tok: &ChatTokenizer) -> Vec<Request> {
    QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| Request {
            id: i as u64,
            prompt_id: i as u64,
            prompt: tok.encode_chat(&[Message::user(*q)]).unwrap(),
            seed: i as u64,
        })
        .collect()
}

fn settings(tok: &ChatTokenizer, drafting: Drafting) -> DecodeSettings {
    DecodeSettings {
        max_new_tokens: 48,
        stop_token: tok.token_id("<|im_end|>").unwrap(),
        temperature: 0.0,
        top_p: 1.0,
        drafting,
        // A machine on which verification (and an int4 draft step) is cheap, so that the goodput policies and
        // EfficientRollout's toggle draft (the test is about their output, which must not depend on the cost
        // model).
        cost: Some(cheap_verification()),
        int4_cost: Some(cheap_verification()),
        pq_every: 0,
    }
}

fn cheap_verification() -> CostModel {
    CostModel::new(
        Gpu {
            name: "cheap verification",
            bandwidth: 10e9,
            flops: 1e15,
            bandwidth_efficiency: 1.0,
            compute_efficiency: 1.0,
        },
        model_shape(model_config()),
        Overheads::default(),
    )
}

fn summary(name: &str, stats: &DecodeStats) {
    println!(
        "{name}: {} tokens in {} steps ({:.2} tokens/step), {} of {} drafts accepted, {:.2} s (target {:.2} s)",
        stats.generated,
        stats.steps,
        stats.generated as f64 / stats.steps as f64,
        stats.accepted,
        stats.drafted,
        stats.wall.as_secs_f64(),
        stats.target.as_secs_f64()
    );
}

/// The first position where `a` and `b` differ, checked to be a near-tie of the autoregressive logits.
fn check_same_or_near_tie(target: &mut Target, prompt: &[u32], ar: &[u32], spec: &[u32]) -> usize {
    let Some(i) = ar.iter().zip(spec).position(|(x, y)| x != y) else {
        assert_eq!(
            ar.len(),
            spec.len(),
            "one output stopped early without a difference"
        );
        return 0;
    };
    let seq = target.add_sequence();
    let context: Vec<u32> = prompt.iter().chain(&ar[..i]).copied().collect();
    let logits = target.prefill(seq, &context).unwrap();
    target.release(seq).unwrap();
    let row = logits.i(context.len() - 1).unwrap();
    let sorted = row
        .sort_last_dim(false)
        .unwrap()
        .0
        .to_vec1::<f32>()
        .unwrap();
    let gap = sorted[0] - sorted[1];
    println!(
        "divergence at output {i}: {} vs {}, top-2 logit gap {gap:.4}",
        ar[i], spec[i]
    );
    assert!(
        gap < NEAR_TIE,
        "divergence at output {i} with a top-2 gap of {gap} (near tie: < {NEAR_TIE})"
    );
    assert_eq!(
        row.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap(),
        ar[i]
    );
    1
}

#[test]
fn greedy_speculative_decoding_emits_the_autoregressive_tokens() {
    let (mut target, tok) = setup();
    let reqs = requests(&tok);
    let drafter = Drafter::new(DrafterConfig::default()).unwrap();
    drafter.begin_iteration(0).unwrap();
    let (ar, stats) = decode(
        &mut target,
        Some(&drafter),
        &reqs,
        &settings(&tok, Drafting::None),
    )
    .unwrap();
    summary("autoregressive", &stats);
    assert_eq!(stats.drafted, 0);
    for (q, out) in QUESTIONS.iter().zip(&ar) {
        println!("{q} -> {:?}", tok.decode(out).unwrap());
        assert!(!out.is_empty());
    }

    // The next iteration drafts from the first one's rollouts (same prompts: the drafts are mostly right).
    drafter.begin_iteration(1).unwrap();
    let took = target.requantize_drafter().unwrap();
    println!("int4 self-drafter requantized in {took:?}");
    let mut divergences = 0;
    for drafting in [
        Drafting::SuffixChain,
        Drafting::SuffixTree,
        Drafting::GoodputChain,
        Drafting::Int4Chain { k: 4 },
        Drafting::GoodputInt4 { max_k: 6 },
        Drafting::EfficientRolloutInt4,
    ] {
        let (spec, stats) = decode(
            &mut target,
            Some(&drafter),
            &reqs,
            &settings(&tok, drafting),
        )
        .unwrap();
        summary(&format!("{drafting:?}"), &stats);
        assert!(
            stats.accepted > 0,
            "nothing accepted: the drafter was not used"
        );
        assert!(stats.steps < ar.iter().map(Vec::len).max().unwrap());
        for ((r, a), s) in reqs.iter().zip(&ar).zip(&spec) {
            divergences += check_same_or_near_tie(&mut target, &r.prompt, a, s);
        }
    }
    println!("{divergences} divergences, each at a near tie");
}

/// Bad settings are refused before anything is allocated, naming the setting; a one-token prompt decodes; and
/// the target and the drafter stay usable after an error.
#[test]
fn bad_settings_are_named_and_leave_the_target_usable() {
    let (mut target, tok) = setup();
    let drafter = Drafter::new(DrafterConfig::default()).unwrap();
    let one = Request {
        id: 7,
        prompt_id: 7,
        prompt: vec![tok.token_id("<|im_start|>").unwrap()],
        seed: 7,
    };
    let good = DecodeSettings {
        max_new_tokens: 2,
        ..settings(&tok, Drafting::SuffixChain)
    };
    let cases: [(DecodeSettings, &str); 8] = [
        (
            DecodeSettings {
                max_new_tokens: 0,
                ..good
            },
            "max_new_tokens",
        ),
        (DecodeSettings { top_p: 0.0, ..good }, "top_p"),
        (
            DecodeSettings {
                temperature: f32::NAN,
                ..good
            },
            "temperature",
        ),
        (
            DecodeSettings {
                max_new_tokens: 5000,
                ..good
            },
            "sequence length",
        ),
        (
            DecodeSettings {
                drafting: Drafting::GoodputChain,
                cost: None,
                ..good
            },
            "cost model",
        ),
        (
            DecodeSettings {
                drafting: Drafting::Int4Chain { k: 4 },
                ..good
            },
            "int4 drafter",
        ),
        (
            DecodeSettings {
                drafting: Drafting::Int4Chain { k: 0 },
                ..good
            },
            "k: 0",
        ),
        (
            DecodeSettings {
                drafting: Drafting::EfficientRolloutInt4,
                int4_cost: None,
                ..good
            },
            "int4 drafter",
        ),
    ];
    for (bad, named) in cases {
        let err = decode(
            &mut target,
            Some(&drafter),
            std::slice::from_ref(&one),
            &bad,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(named), "{err:?} should name {named}");
    }
    let twice = decode(
        &mut target,
        Some(&drafter),
        &[one.clone(), one.clone()],
        &good,
    )
    .unwrap_err();
    assert!(twice.to_string().contains("repeats"), "{twice}");
    let (out, _) = decode(&mut target, Some(&drafter), &[one], &good).unwrap();
    assert!(!out[0].is_empty() && out[0].len() <= 2, "{out:?}");
}
