//! The real model, checked: the tokenizer built from the GGUF, the target's forward pass against an
//! independent implementation (candle-transformers' quantized Llama reading the same file, every weight
//! dequantized to f32), and its perplexity on English text written for this repository (so that no model saw
//! it in training).
//!
//! The model comes from `scripts/fetch-model.sh` (or `$SPECDEC_MODEL`).

use candle_core::{Device, IndexOp, Tensor, D};
use specdec::attention::RopeStyle;
use specdec_rollout::model::{model_path, GgufFile, Weights};
use specdec_rollout::target::{chain_parents, Target, TreeInput, GGUF_LLAMA_ROPE};
use specdec_rollout::tokenizer::{ChatTokenizer, Message};

fn open() -> GgufFile {
    GgufFile::open(&model_path().expect("the model file")).expect("a GGUF file")
}

fn target(rope: RopeStyle) -> Target {
    let weights = Weights::from_gguf(&mut open()).expect("the weights");
    Target::new(weights, 256, 16, 1024, rope).expect("a target")
}

fn tokenizer() -> ChatTokenizer {
    ChatTokenizer::from_gguf(&open()).expect("the tokenizer")
}

/// A prompt as the rollouts use them: a question in the chat template.
fn prompt_tokens(tok: &ChatTokenizer) -> Vec<u32> {
    tok.encode_chat(&[Message::user(
        "What is 17 times 23? Explain your steps briefly.",
    )])
    .unwrap()
}

#[test]
fn control_tokens_are_whole_digits_are_split_and_text_round_trips() {
    let tok = tokenizer();
    let im_start = tok
        .token_id("<|im_start|>")
        .expect("<|im_start|> in the vocabulary");
    let im_end = tok
        .token_id("<|im_end|>")
        .expect("<|im_end|> in the vocabulary");
    assert!(tok.special_tokens().contains(&im_start) && tok.special_tokens().contains(&im_end));
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&im_start), "{ids:?}");
    assert_eq!(ids.last(), Some(&im_end), "{ids:?}");

    // tokenizer.ggml.pre = smollm: every digit is its own pre-token, so "2026" is four tokens.
    let digits = tok.encode("2026").unwrap();
    let pieces: Vec<String> = digits.iter().map(|&d| tok.decode(&[d]).unwrap()).collect();
    assert_eq!(pieces, ["2", "0", "2", "6"]);

    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
        "  leading spaces, tabs\tand trailing  ",
        "Ünïcödé — “quotes” 東京 🙂",
        "<|im_start|>assistant\n3 * 7 = 21<|im_end|>\n",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "{ids:?}");
    }
}

#[test]
fn the_chat_template_renders_chatml_with_the_generation_prompt() {
    let tok = tokenizer();
    let text = tok
        .apply_chat_template(&[Message::user("Hello")], true)
        .unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "{text:?}");
    assert!(
        text.contains("<|im_start|>user\nHello<|im_end|>\n"),
        "{text:?}"
    );
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    let without = tok
        .apply_chat_template(&[Message::user("Hello")], false)
        .unwrap();
    assert_eq!(format!("{without}<|im_start|>assistant\n"), text);
}

/// candle-transformers' quantized Llama on the same file with every weight dequantized to f32
/// (`CANDLE_DEQUANTIZE_ALL`), fed one token at a time: the logits after each token, `[tokens.len(), vocab]`.
fn reference_logits(tokens: &[u32]) -> Tensor {
    // Read by candle when it builds its first matmul on this thread; no other test builds one.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = model_path().unwrap();
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
    let mut model = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut reader,
        &Device::Cpu,
    )
    .unwrap();
    let rows: Vec<Tensor> = tokens
        .iter()
        .enumerate()
        .map(|(pos, &t)| {
            let x = Tensor::new(&[[t]], &Device::Cpu).unwrap();
            model.forward(&x, pos).unwrap().i(0).unwrap()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

/// The target's logits for `tokens`, fed in two calls (a chain of `split` tokens, then the rest), each
/// accepted whole.
fn target_logits(target: &mut Target, tokens: &[u32], split: usize) -> Tensor {
    let seq = target.add_sequence();
    let first = target.prefill(seq, &tokens[..split]).unwrap();
    let rest = target.prefill(seq, &tokens[split..]).unwrap();
    target.release(seq).unwrap();
    Tensor::cat(&[first, rest], 0).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Tolerance of the agreement: the target rounds q, k, v and the attention output to fp16 (the KV cache's
/// type, 11 significant bits); candle keeps f32 throughout. Over 30 layers that moves logits (magnitudes up to
/// about 30) by a few hundredths; a wrong RoPE pairing, mask or norm moves them by whole units.
const LOGIT_TOLERANCE: f32 = 0.25;

#[test]
fn the_forward_pass_matches_candle_transformers_on_the_same_file() {
    let tok = tokenizer();
    let tokens = prompt_tokens(&tok);
    let reference = reference_logits(&tokens);
    let mut target = target(GGUF_LLAMA_ROPE);
    let ours = target_logits(&mut target, &tokens, 7);
    assert_eq!(ours.dims(), reference.dims());
    let diff = max_abs_diff(&ours, &reference);
    let scale = max_abs_diff(&reference, &reference.zeros_like().unwrap());
    println!(
        "{} positions x {} logits: max |ours - candle| = {diff:.4} (largest |logit| {scale:.1})",
        tokens.len(),
        reference.dim(1).unwrap()
    );
    assert!(
        diff <= LOGIT_TOLERANCE,
        "max |diff| {diff} > {LOGIT_TOLERANCE}"
    );
    let argmax = |t: &Tensor| t.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(argmax(&ours), argmax(&reference));

    // The other RoPE pairing on the same weights is far off: the agreement above decides the pairing.
    let mut wrong = target_from(target, RopeStyle::Neox);
    let wrong_diff = max_abs_diff(&target_logits(&mut wrong, &tokens, 7), &reference);
    println!("with the NeoX pairing instead: max |diff| = {wrong_diff:.2}");
    assert!(wrong_diff > 20.0 * LOGIT_TOLERANCE, "{wrong_diff}");
}

fn target_from(target: Target, rope: RopeStyle) -> Target {
    let weights = target.into_weights();
    Target::new(weights, 256, 16, 1024, rope).unwrap()
}

/// Two computations of the same logits through the same code, with the same rows per matmul: equal up to
/// accumulation order (the matmul may split its work differently).
const SAME_MATH: f32 = 1e-3;

#[test]
fn a_tree_verifies_each_branch_as_its_own_chain() {
    let tok = tokenizer();
    let prompt = prompt_tokens(&tok);
    let branch_a = tok.encode(" 17 times 23 is 391.").unwrap();
    let branch_b = tok.encode(" Let's multiply").unwrap();
    let mut target = target(GGUF_LLAMA_ROPE);

    let chain = |target: &mut Target, branch: &[u32]| {
        let all: Vec<u32> = prompt.iter().chain(branch).copied().collect();
        target_logits(target, &all, prompt.len())
            .i(prompt.len()..)
            .unwrap()
    };
    let chain_a = chain(&mut target, &branch_a);
    let chain_b = chain(&mut target, &branch_b);

    // One tree: branch A's nodes first, then branch B's, both under the prompt.
    let seq = target.add_sequence();
    target.prefill(seq, &prompt).unwrap();
    let mut parents = chain_parents(branch_a.len());
    parents.extend(chain_parents(branch_b.len()).iter().map(|&p| {
        if p < 0 {
            -1
        } else {
            p + branch_a.len() as i32
        }
    }));
    let nodes: Vec<u32> = branch_a.iter().chain(&branch_b).copied().collect();
    let logits = target
        .forward(&[TreeInput {
            sequence: seq,
            tokens: &nodes,
            parents: &parents,
        }])
        .unwrap();
    let tree_a = logits.i(..branch_a.len()).unwrap();
    let tree_b = logits.i(branch_a.len()..).unwrap();
    let (da, db) = (
        max_abs_diff(&tree_a, &chain_a),
        max_abs_diff(&tree_b, &chain_b),
    );
    println!("tree vs chains: max |diff| {da:.5} (branch A), {db:.5} (branch B)");
    assert!(da <= SAME_MATH && db <= SAME_MATH, "{da} {db}");

    // Accepting branch B moves its KV into place: the next token's logits equal the chain's.
    let path_b: Vec<i32> = (branch_a.len()..nodes.len()).map(|i| i as i32).collect();
    target.accept(&[(seq, &path_b)]).unwrap();
    assert_eq!(target.len(seq).unwrap(), prompt.len() + branch_b.len());
    let next = tok.encode(" them").unwrap()[0];
    let after_tree = target.prefill(seq, &[next]).unwrap();
    let chain_seq = target.add_sequence();
    target.prefill(chain_seq, &prompt).unwrap();
    target.prefill(chain_seq, &branch_b).unwrap();
    let after_chain = target.prefill(chain_seq, &[next]).unwrap();
    let d = max_abs_diff(&after_tree, &after_chain);
    println!("after accepting branch B: max |diff| {d:.5}");
    assert!(d <= SAME_MATH, "{d}");

    // A released handle is refused, also once its slot holds another sequence.
    target.release(seq).unwrap();
    let reused = target.add_sequence();
    assert!(target.len(seq).is_err() && target.release(seq).is_err());
    assert_eq!(target.len(reused).unwrap(), 0);
}

/// Perplexity on English prose written for this repository (rollout/data/held-out.txt, 303 words).
/// SmolLM2-135M's perplexity on ordinary English web text is in the tens; a forward pass with a wrong
/// pairing, mask or norm is in the hundreds or more.
const PERPLEXITY_BOUND: f64 = 30.0;

#[test]
fn perplexity_on_held_out_english_text_is_that_of_a_language_model() {
    let tok = tokenizer();
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/held-out.txt")).unwrap();
    let tokens = tok.encode(&text).unwrap();
    let mut target = target(GGUF_LLAMA_ROPE);
    let seq = target.add_sequence();
    let logits = target.prefill(seq, &tokens).unwrap();
    let log_probs = log_softmax_rows(&logits);
    let nll: f64 = tokens[1..]
        .iter()
        .enumerate()
        .map(|(i, &next)| -f64::from(log_probs[i][next as usize]))
        .sum();
    let perplexity = (nll / (tokens.len() - 1) as f64).exp();
    println!(
        "{} tokens: perplexity {perplexity:.2} (bound {PERPLEXITY_BOUND})",
        tokens.len()
    );
    assert!(perplexity < PERPLEXITY_BOUND, "{perplexity}");
}

/// Row-wise log-softmax in f64.
fn log_softmax_rows(logits: &Tensor) -> Vec<Vec<f32>> {
    logits
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            let log_z = max + sum.ln();
            row.iter().map(|&l| (l as f64 - log_z) as f32).collect()
        })
        .collect()
}

/// The int4 self-drafter is the model, quantized: on the held-out text (teacher forcing, through the same
/// KV cache machinery as drafting: draft forward passes, each accepted), its perplexity stays near the target's
/// and its argmax agrees with the target's at most positions. Round-to-nearest int4 at group size 64 costs a
/// small model a few points of perplexity (measured: 28.4 against 21.3, argmax agreement 0.66; bounds 1.6x
/// and 0.5); a wrong layout, transposition or scale would give perplexity in the
/// thousands and agreement near 0.
#[test]
fn the_int4_self_drafter_tracks_the_target() {
    let tok = tokenizer();
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/held-out.txt")).unwrap();
    let tokens = tok.encode(&text).unwrap();
    let mut target = target(GGUF_LLAMA_ROPE);
    let took = target.requantize_drafter().unwrap();
    let exact = target.add_sequence();
    let want = log_softmax_rows(&target.prefill(exact, &tokens).unwrap());
    let drafted = target.add_sequence();
    let mut got = Vec::new();
    for chunk in tokens.chunks(64) {
        let parents = chain_parents(chunk.len());
        let input = TreeInput {
            sequence: drafted,
            tokens: chunk,
            parents: &parents,
        };
        got.extend(log_softmax_rows(&target.draft_forward(&[input]).unwrap()));
        let path: Vec<i32> = (0..chunk.len() as i32).collect();
        target.accept(&[(drafted, &path)]).unwrap();
    }
    let perplexity = |rows: &[Vec<f32>]| {
        let nll: f64 = tokens[1..]
            .iter()
            .enumerate()
            .map(|(i, &next)| -f64::from(rows[i][next as usize]))
            .sum();
        (nll / (tokens.len() - 1) as f64).exp()
    };
    let argmax = |row: &Vec<f32>| specdec::cpu::argmax(row);
    let agree = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| argmax(w) == argmax(g))
        .count() as f64
        / tokens.len() as f64;
    let (p_target, p_int4) = (perplexity(&want), perplexity(&got));
    println!(
        "int4 self-drafter (requantized in {took:?}): perplexity {p_int4:.2} (target {p_target:.2}), argmax \
         agreement {agree:.3} over {} tokens",
        tokens.len()
    );
    assert!(p_int4 < 1.6 * p_target, "{p_int4} against {p_target}");
    assert!(agree > 0.5, "{agree}");
}
