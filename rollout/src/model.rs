//! The model file: a Llama-architecture GGUF (SmolLM2-135M-Instruct by default), its configuration read from
//! the metadata and its weights dequantized to f32 with candle. The f32 weights are the target (the policy);
//! the quantized file is only where they come from.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

/// The environment variable naming a GGUF file to use instead of the fetched SmolLM2-135M-Instruct.
pub const MODEL_PATH_VAR: &str = "SPECDEC_MODEL";

/// The path of the model file: `$SPECDEC_MODEL` when set, else the file `scripts/fetch-model.sh` prints (it
/// downloads and checks SmolLM2-135M-Instruct on first use, with progress on stderr, and uses its cache after).
///
/// # Errors
/// A `$SPECDEC_MODEL` that is not a file, or a failed fetch (the script's own message is on stderr).
pub fn model_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(MODEL_PATH_VAR) {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "{MODEL_PATH_VAR}={} is not a file",
            path.display()
        );
        return Ok(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-model.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        output.status.success(),
        "{} failed ({}); see its message above",
        script.display(),
        output.status
    );
    let path = String::from_utf8(output.stdout).context("the fetch script's output")?;
    Ok(PathBuf::from(path.trim()))
}

/// A GGUF file's header: metadata and tensor directory, with the open file to read tensors from.
pub struct GgufFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Metadata and tensor directory.
    pub content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    /// Reads the header of the GGUF file at `path`.
    ///
    /// # Errors
    /// The file cannot be opened or is not a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .with_context(|| format!("reading the GGUF header of {}", path.display()))?;
        Ok(GgufFile {
            path: path.to_owned(),
            content,
            reader,
        })
    }

    /// A metadata value.
    ///
    /// # Errors
    /// The key is missing.
    pub fn metadata(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .with_context(|| format!("{} has no metadata key {key}", self.path.display()))
    }

    fn metadata_usize(&self, key: &str) -> Result<usize> {
        let value = self.metadata(key)?;
        let n = value
            .to_u32()
            .map(u64::from)
            .or_else(|_| value.to_u64())
            .with_context(|| format!("{key} is {value:?}, not an unsigned integer"))?;
        Ok(usize::try_from(n)?)
    }

    fn metadata_f32(&self, key: &str) -> Result<f32> {
        let value = self.metadata(key)?;
        value
            .to_f32()
            .with_context(|| format!("{key} is {value:?}, not an f32"))
    }

    /// The tensor `name`, dequantized to f32 on the CPU, in candle's order (`[out_features, in_features]` for
    /// a linear layer, `[vocab, hidden]` for the embedding).
    ///
    /// # Errors
    /// The tensor is missing or cannot be read.
    pub fn dequantized(&mut self, name: &str) -> Result<Tensor> {
        let tensor = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .with_context(|| format!("reading tensor {name} of {}", self.path.display()))?;
        Ok(tensor.dequantize(&Device::Cpu)?)
    }
}

/// The sizes of a Llama-architecture model, from `llama.*` metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Transformer blocks.
    pub num_layers: usize,
    /// The residual stream's width.
    pub hidden: usize,
    /// The SwiGLU inner width.
    pub ffn: usize,
    /// Query heads.
    pub num_q_heads: usize,
    /// Key-value heads (GQA: `num_q_heads / num_kv_heads` query heads share one).
    pub num_kv_heads: usize,
    /// `hidden / num_q_heads`.
    pub head_dim: usize,
    /// RoPE's base `theta`: frequency `j` of a head of `D` elements is `theta^(-2j / D)`.
    pub rope_base: f32,
    /// RMSNorm's epsilon.
    pub rms_eps: f32,
    /// Tokens in the vocabulary (rows of the embedding and of the tied LM head).
    pub vocab: usize,
    /// The longest context the model was trained for.
    pub context_len: usize,
}

impl Config {
    /// Reads the configuration of a `general.architecture = llama` file.
    ///
    /// # Errors
    /// Another architecture, a missing key, or sizes that do not fit together.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.metadata("general.architecture")?.to_string()?;
        ensure!(
            arch == "llama",
            "{} is a {arch} model; the engine runs llama",
            file.path.display()
        );
        let hidden = file.metadata_usize("llama.embedding_length")?;
        let num_q_heads = file.metadata_usize("llama.attention.head_count")?;
        let num_kv_heads = file.metadata_usize("llama.attention.head_count_kv")?;
        ensure!(
            num_q_heads > 0 && hidden % num_q_heads == 0 && num_kv_heads > 0,
            "hidden {hidden} and {num_q_heads} heads do not fit"
        );
        ensure!(
            num_q_heads % num_kv_heads == 0,
            "{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads"
        );
        let head_dim = hidden / num_q_heads;
        let rope_dims = file.metadata_usize("llama.rope.dimension_count")?;
        ensure!(
            rope_dims == head_dim,
            "RoPE rotates {rope_dims} of {head_dim} dimensions; only full rotation is supported"
        );
        let vocab = match file.metadata_usize("llama.vocab_size") {
            Ok(vocab) => vocab,
            Err(_) => file.metadata("tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        Ok(Config {
            num_layers: file.metadata_usize("llama.block_count")?,
            hidden,
            ffn: file.metadata_usize("llama.feed_forward_length")?,
            num_q_heads,
            num_kv_heads,
            head_dim,
            rope_base: file.metadata_f32("llama.rope.freq_base")?,
            rms_eps: file.metadata_f32("llama.attention.layer_norm_rms_epsilon")?,
            vocab,
            context_len: file.metadata_usize("llama.context_length")?,
        })
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_q_heads / self.num_kv_heads
    }
}

/// One transformer block's weights, f32. Linear layers are stored transposed, `[in_features, out_features]`
/// and contiguous, so that `x @ w` multiplies activations `[rows, in_features]` without a strided operand
/// (candle's matmul runs about twice as fast that way at a few rows).
pub struct Block {
    /// `[hidden]`.
    pub attn_norm: Tensor,
    /// `[hidden, Hq * D]`, output columns in the GGUF's order (llama.cpp permutes them so that RoPE rotates
    /// adjacent pairs).
    pub wq: Tensor,
    /// `[hidden, Hkv * D]`, ordered as `wq`.
    pub wk: Tensor,
    /// `[hidden, Hkv * D]`.
    pub wv: Tensor,
    /// `[Hq * D, hidden]`.
    pub wo: Tensor,
    /// `[hidden]`.
    pub ffn_norm: Tensor,
    /// `[hidden, ffn]`.
    pub w_gate: Tensor,
    /// `[hidden, ffn]`.
    pub w_up: Tensor,
    /// `[ffn, hidden]`.
    pub w_down: Tensor,
}

/// A Llama model's weights, dequantized to f32.
pub struct Weights {
    /// The sizes.
    pub config: Config,
    /// `[vocab, hidden]`: the token embedding (rows looked up).
    pub embedding: Tensor,
    /// The blocks, first to last.
    pub blocks: Vec<Block>,
    /// `[hidden]`: the final RMSNorm.
    pub output_norm: Tensor,
    /// `[hidden, vocab]`: the LM head, transposed: the file's `output.weight`, or the embedding when the file
    /// ties them.
    pub lm_head: Tensor,
}

impl Weights {
    /// Reads and dequantizes every tensor of a Llama GGUF file.
    ///
    /// # Errors
    /// A missing tensor, or one whose shape is not the configuration's.
    pub fn from_gguf(file: &mut GgufFile) -> Result<Self> {
        let config = Config::from_gguf(file)?;
        let c = config;
        let (q_rows, kv_rows) = (c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let embedding = read(file, "token_embd.weight", &[c.vocab, c.hidden])?;
        let blocks = (0..c.num_layers)
            .map(|i| {
                let name = |t: &str| format!("blk.{i}.{t}.weight");
                Ok(Block {
                    attn_norm: read(file, &name("attn_norm"), &[c.hidden])?,
                    wq: linear(file, &name("attn_q"), q_rows, c.hidden)?,
                    wk: linear(file, &name("attn_k"), kv_rows, c.hidden)?,
                    wv: linear(file, &name("attn_v"), kv_rows, c.hidden)?,
                    wo: linear(file, &name("attn_output"), c.hidden, q_rows)?,
                    ffn_norm: read(file, &name("ffn_norm"), &[c.hidden])?,
                    w_gate: linear(file, &name("ffn_gate"), c.ffn, c.hidden)?,
                    w_up: linear(file, &name("ffn_up"), c.ffn, c.hidden)?,
                    w_down: linear(file, &name("ffn_down"), c.hidden, c.ffn)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output_norm = read(file, "output_norm.weight", &[c.hidden])?;
        let lm_head = if file.content.tensor_infos.contains_key("output.weight") {
            linear(file, "output.weight", c.vocab, c.hidden)?
        } else {
            embedding.t()?.contiguous()?
        };
        Ok(Weights {
            config,
            embedding,
            blocks,
            output_norm,
            lm_head,
        })
    }
}

/// The tensor `name`, dequantized, checked to have `shape`.
fn read(file: &mut GgufFile, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = file.dequantized(name)?;
    if t.dims() != shape {
        bail!("{name} has shape {:?}, expected {shape:?}", t.dims());
    }
    Ok(t)
}

/// A linear layer's weight `[out_features, in_features]` in the file, returned transposed and contiguous.
fn linear(
    file: &mut GgufFile,
    name: &str,
    out_features: usize,
    in_features: usize,
) -> Result<Tensor> {
    Ok(read(file, name, &[out_features, in_features])?
        .t()?
        .contiguous()?)
}
