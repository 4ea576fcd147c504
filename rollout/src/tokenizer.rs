//! The model's tokenizer, built with the `tokenizers` crate from the vocabulary and merges the GGUF carries,
//! and its chat template (Jinja, rendered with `minijinja`).
//!
//! `tokenizer.ggml.model = gpt2` is a byte-level BPE. `tokenizer.ggml.pre` names the pre-tokenizer
//! llama.cpp applies before it; the two this engine knows are `gpt2` (the GPT-2 split) and `smollm` (each digit
//! alone, then the GPT-2 split). Tokens of type control (3) are special: matched whole in the text, never split.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::model::GgufFile;

/// GGUF's token type of control tokens (`<|im_start|>`, `<|endoftext|>`, ...).
const CONTROL_TOKEN: i32 = 3;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from the user.
    pub fn user(content: impl Into<String>) -> Self {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// The tokenizer and chat template of a GGUF file.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    chat_template: String,
    bos: u32,
    eos: u32,
    special: Vec<u32>,
}

impl ChatTokenizer {
    /// Builds the tokenizer of `file` from `tokenizer.ggml.*` and takes its `tokenizer.chat_template`.
    ///
    /// # Errors
    /// A missing key, a tokenizer model other than `gpt2` or an unknown pre-tokenizer, or a malformed merge.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file.metadata("tokenizer.ggml.model")?.to_string()?;
        ensure!(
            model == "gpt2",
            "tokenizer.ggml.model is {model}; the engine builds byte-level BPE (gpt2) tokenizers"
        );
        let strings = |key: &str| string_array(file.metadata(key)?);
        let tokens = strings("tokenizer.ggml.tokens")?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), id as u32))
            .collect();
        ensure!(
            vocab.len() == tokens.len(),
            "tokenizer.ggml.tokens repeats a token"
        );
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|merge| match merge.split_once(' ') {
                Some((left, right)) => Ok((left.to_owned(), right.to_owned())),
                None => bail!("tokenizer.ggml.merges holds {merge:?}, not two tokens"),
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow::anyhow!("building the BPE model: {e}"))?;

        let byte_level = ByteLevel::new(false, true, true);
        let pre = match file.metadata("tokenizer.ggml.pre") {
            Ok(pre) => pre.to_string()?.as_str(),
            Err(_) => "gpt2",
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "gpt2" => byte_level.into(),
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            other => bail!("tokenizer.ggml.pre is {other}; known: gpt2, smollm"),
        };
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(ByteLevelDecoder::default()));

        let types = file.metadata("tokenizer.ggml.token_type")?.to_vec()?;
        ensure!(
            types.len() == tokens.len(),
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        );
        let special: Vec<u32> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.to_i32().ok() == Some(CONTROL_TOKEN))
            .map(|(id, _)| id as u32)
            .collect();
        let added: Vec<AddedToken> = special
            .iter()
            .map(|&id| AddedToken::from(tokens[id as usize].clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(added)
            .map_err(|e| anyhow::anyhow!("adding the control tokens: {e}"))?;

        let id = |key: &str| -> Result<u32> { Ok(file.metadata(key)?.to_u32()?) };
        Ok(ChatTokenizer {
            tokenizer,
            chat_template: file
                .metadata("tokenizer.chat_template")?
                .to_string()?
                .clone(),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            special,
        })
    }

    /// The token ids of `text`, special tokens matched whole; no BOS is added.
    ///
    /// # Errors
    /// The tokenizer's own errors.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    ///
    /// # Errors
    /// An id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    }

    /// The id of `token` (its vocabulary string), if it has one.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> u32 {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The control tokens (GGUF token type 3), increasing.
    pub fn special_tokens(&self) -> &[u32] {
        &self.special
    }

    /// The conversation rendered by the file's chat template, with the assistant's turn opened when
    /// `add_generation_prompt`.
    ///
    /// # Errors
    /// The template fails to parse or render.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages: Vec<HashMap<&str, String>> = messages
            .iter()
            .map(|m| HashMap::from([("role", m.role.clone()), ("content", m.content.clone())]))
            .collect();
        let token = |id: u32| self.tokenizer.id_to_token(id).unwrap_or_default();
        let env = minijinja::Environment::new();
        env.render_str(
            &self.chat_template,
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => token(self.bos),
                eos_token => token(self.eos),
            },
        )
        .context("rendering tokenizer.chat_template")
    }

    /// The token ids of a conversation rendered by the chat template, ready to prefill.
    ///
    /// # Errors
    /// As [`ChatTokenizer::apply_chat_template`] and [`ChatTokenizer::encode`].
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(messages, true)?)
    }
}

/// The strings of a GGUF string array.
fn string_array(value: &Value) -> Result<Vec<String>> {
    value
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}
