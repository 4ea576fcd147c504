//! Tree-attention test support: random problems over a shuffled paged cache, tree shapes, and an independent
//! naive reference that reads the cache through a contiguous logical view (not through the library's
//! `slot_offset`) and attends over each node's root-to-node path explicitly.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use specdec::attention::{
    rotate_pair, PagedCacheShape, RopeShape, RopeStyle, TreeAttentionInputs, TreeAttentionOutputs,
    TreeAttentionShape, TreeBatch,
};
use specdec::HalfElement;

use super::device::{Array, Element, TestDevice};

/// Tree shapes as parent arrays.
pub fn chain(n: usize) -> Vec<i32> {
    (0..n as i32).map(|i| i - 1).collect()
}

pub fn star(n: usize) -> Vec<i32> {
    (0..n as i32).map(|i| if i == 0 { -1 } else { 0 }).collect()
}

pub fn full_binary(n: usize) -> Vec<i32> {
    (0..n as i32)
        .map(|i| if i == 0 { -1 } else { (i - 1) / 2 })
        .collect()
}

/// A random tree (parents uniform over earlier nodes), with a second root now and then.
pub fn random_tree(rng: &mut StdRng, n: usize) -> Vec<i32> {
    (0..n as i32)
        .map(|i| {
            if i == 0 || rng.random_bool(0.05) {
                -1
            } else {
                rng.random_range(0..i)
            }
        })
        .collect()
}

/// Node `i`'s path from its root, root first.
pub fn path(parents: &[i32], i: usize) -> Vec<usize> {
    let mut nodes = vec![i];
    while parents[*nodes.last().unwrap()] >= 0 {
        nodes.push(parents[*nodes.last().unwrap()] as usize);
    }
    nodes.reverse();
    nodes
}

pub struct Spec {
    pub trees: Vec<Vec<i32>>,
    pub prefix_lens: Vec<usize>,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
    pub rope: Option<RopeStyle>,
}

/// (out, lse, k_cache, v_cache, request_status) of a CPU run.
pub type CpuFlagged<T> = (Vec<T>, Vec<f32>, Vec<T>, Vec<T>, Vec<i32>);

/// A problem with the cache and inputs filled with random values in [-1, 1) (keys scaled so that scores
/// spread over several units), pages shuffled in the table, spare pages and spare table entries of -1.
#[derive(Clone)]
pub struct Problem<T> {
    pub shape: TreeAttentionShape,
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub token_offsets: Vec<i32>,
    pub parents: Vec<i32>,
    pub prefix_lens: Vec<i32>,
    pub page_table: Vec<i32>,
    pub k_cache: Vec<T>,
    pub v_cache: Vec<T>,
    pub cos_sin: Option<Vec<f32>>,
    pub scale: f32,
}

impl<T: HalfElement> Problem<T> {
    pub fn random(rng: &mut StdRng, spec: &Spec) -> Self {
        let (hq, hkv, d, ps) = (
            spec.num_q_heads,
            spec.num_kv_heads,
            spec.head_dim,
            spec.page_size,
        );
        let needs: Vec<usize> = spec
            .trees
            .iter()
            .zip(&spec.prefix_lens)
            .map(|(t, l)| (l + t.len()).div_ceil(ps))
            .collect();
        let pages_per_request = needs.iter().copied().max().unwrap_or(0) + 1;
        let num_pages = needs.iter().sum::<usize>() + 3;
        let mut pool: Vec<i32> = (0..num_pages as i32).collect();
        pool.shuffle(rng);
        let mut page_table = vec![-1; spec.trees.len() * pages_per_request];
        let mut next = 0;
        for (b, &need) in needs.iter().enumerate() {
            for p in 0..need {
                page_table[b * pages_per_request + p] = pool[next];
                next += 1;
            }
        }
        let max_tree = spec.trees.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let num_tokens: usize = spec.trees.iter().map(Vec::len).sum();
        let mut token_offsets = vec![0i32];
        for t in &spec.trees {
            token_offsets.push(token_offsets.last().unwrap() + t.len() as i32);
        }
        let max_position = spec
            .prefix_lens
            .iter()
            .zip(&spec.trees)
            .map(|(l, t)| l + t.len())
            .max()
            .unwrap_or(0)
            + 5;
        let cache = PagedCacheShape::new(num_pages, ps, hkv, d, pages_per_request).unwrap();
        let rope = spec.rope.map(|style| RopeShape {
            style,
            max_position,
        });
        let shape =
            TreeAttentionShape::new(spec.trees.len(), num_tokens, hq, max_tree, cache, rope)
                .unwrap();
        let mut values = |n: usize, scale: f32| -> Vec<T> {
            (0..n)
                .map(|_| T::from_f32(rng.random_range(-1.0f32..1.0) * scale))
                .collect()
        };
        let key_scale = 3.0;
        let q = values(shape.q_len(), 1.0);
        let k = values(shape.kv_len(), key_scale);
        let v = values(shape.kv_len(), 1.0);
        let k_cache = values(cache.cache_len(), key_scale);
        let v_cache = values(cache.cache_len(), 1.0);
        let cos_sin = spec.rope.map(|_| {
            // Llama's frequencies, theta 10000.
            let mut table = vec![0.0f32; max_position * d];
            for p in 0..max_position {
                for j in 0..d / 2 {
                    let angle = p as f64 / 10000f64.powf(2.0 * j as f64 / d as f64);
                    table[p * d + j] = angle.cos() as f32;
                    table[p * d + d / 2 + j] = angle.sin() as f32;
                }
            }
            table
        });
        Problem {
            shape,
            q,
            k,
            v,
            token_offsets,
            parents: spec.trees.concat(),
            prefix_lens: spec.prefix_lens.iter().map(|&l| l as i32).collect(),
            page_table,
            k_cache,
            v_cache,
            cos_sin,
            scale: 1.0 / (d as f32).sqrt(),
        }
    }

    pub fn batch(&self) -> TreeBatch<'_> {
        TreeBatch {
            token_offsets: &self.token_offsets,
            parents: &self.parents,
            prefix_lens: &self.prefix_lens,
            page_table: &self.page_table,
        }
    }

    /// The element index of request `b`'s logical slot `t`, head `h`, computed here from the layout.
    pub fn cache_index(&self, b: usize, t: usize, h: usize) -> usize {
        let c = &self.shape.cache;
        let page = self.page_table[b * c.pages_per_request + t / c.page_size] as usize;
        (((page * c.page_size) + t % c.page_size) * c.num_kv_heads + h) * c.head_dim
    }

    /// Node rows of request `b`.
    pub fn rows(&self, b: usize) -> std::ops::Range<usize> {
        self.token_offsets[b] as usize..self.token_offsets[b + 1] as usize
    }

    /// `x` rotated for position `pos` (the documented rule), or `x` without RoPE.
    pub fn rotated(&self, x: &[T], pos: usize) -> Vec<T> {
        let Some(style) = self.shape.rope.map(|r| r.style) else {
            return x.to_vec();
        };
        let d = x.len();
        let table = &self.cos_sin.as_ref().unwrap()[pos * d..][..d];
        let mut y = x.to_vec();
        for j in 0..d / 2 {
            let (a, b) = match style {
                RopeStyle::Neox => (j, j + d / 2),
                RopeStyle::Gptj => (2 * j, 2 * j + 1),
            };
            let (ra, rb) = rotate_pair(x[a].to_f32(), x[b].to_f32(), table[j], table[d / 2 + j]);
            y[a] = T::from_f32(ra);
            y[b] = T::from_f32(rb);
        }
        y
    }

    /// The expected key rows the call appends: `(request, node, kv head) -> (k, v)`.
    pub fn appended(&self, b: usize, node: usize, h: usize) -> (Vec<T>, Vec<T>) {
        let (hkv, d) = (self.shape.cache.num_kv_heads, self.shape.cache.head_dim);
        let row = self.rows(b).start + node;
        let depth = path(&self.parents[self.rows(b)], node).len() - 1;
        let pos = self.prefix_lens[b] as usize + depth;
        let k = self.rotated(&self.k[(row * hkv + h) * d..][..d], pos);
        (k, self.v[(row * hkv + h) * d..][..d].to_vec())
    }

    /// The CPU backend's results on this problem: (out, lse, k_cache, v_cache).
    pub fn run_cpu(&self) -> (Vec<T>, Vec<f32>, Vec<T>, Vec<T>) {
        let (out, lse, k_cache, v_cache, _) = self.run_cpu_with(false).unwrap();
        (out, lse, k_cache, v_cache)
    }

    /// The CPU backend with `request_status` (bad requests flagged alone): (out, lse, k_cache, v_cache,
    /// request_status); `out` and `lse` start as NaN, the status as -9.
    pub fn run_cpu_flagged(&self) -> specdec::Result<CpuFlagged<T>> {
        self.run_cpu_with(true)
    }

    fn run_cpu_with(&self, with_status: bool) -> specdec::Result<CpuFlagged<T>> {
        let mut k_cache = self.k_cache.clone();
        let mut v_cache = self.v_cache.clone();
        let mut out = vec![T::NAN; self.shape.q_len()];
        let mut lse = vec![f32::NAN; self.shape.lse_len()];
        let mut status = vec![-9; self.shape.num_requests];
        specdec::cpu::tree_attention(
            &self.shape,
            &self.q,
            &self.k,
            &self.v,
            &self.batch(),
            self.cos_sin.as_deref(),
            self.scale,
            &mut k_cache,
            &mut v_cache,
            &mut out,
            Some(&mut lse),
            with_status.then_some(&mut status[..]),
        )?;
        Ok((out, lse, k_cache, v_cache, status))
    }

    /// Naive attention in f64 of every node and q head: keys are the prefix read slot by slot from the
    /// original cache, then the node's path read from the inputs (rotated here). Returns (out, lse).
    pub fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        let (hq, hkv, d) = (
            self.shape.num_q_heads,
            self.shape.cache.num_kv_heads,
            self.shape.cache.head_dim,
        );
        let group = hq / hkv;
        let mut out = vec![0.0; self.shape.q_len()];
        let mut lse = vec![0.0; self.shape.lse_len()];
        for b in 0..self.shape.num_requests {
            let parents = &self.parents[self.rows(b)];
            let l = self.prefix_lens[b] as usize;
            for node in 0..parents.len() {
                let row = self.rows(b).start + node;
                let nodes = path(parents, node);
                let pos = l + nodes.len() - 1;
                for h in 0..hq {
                    let kv = h / group;
                    let query = self.rotated(&self.q[(row * hq + h) * d..][..d], pos);
                    let mut keys: Vec<(Vec<T>, Vec<T>)> = (0..l)
                        .map(|t| {
                            let at = self.cache_index(b, t, kv);
                            (
                                self.k_cache[at..at + d].to_vec(),
                                self.v_cache[at..at + d].to_vec(),
                            )
                        })
                        .collect();
                    keys.extend(nodes.iter().map(|&j| self.appended(b, j, kv)));
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|(k, _)| {
                            k.iter()
                                .zip(&query)
                                .map(|(a, b)| f64::from(a.to_f32()) * f64::from(b.to_f32()))
                                .sum::<f64>()
                                * f64::from(self.scale)
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for (w, (_, v)) in weights.iter().zip(&keys) {
                        for (o, x) in out[(row * hq + h) * d..][..d].iter_mut().zip(v) {
                            *o += w / total * f64::from(x.to_f32());
                        }
                    }
                    lse[row * hq + h] = max + total.ln();
                }
            }
        }
        (out, lse)
    }
}

/// The distance from 1 to the next value of `T` (2^-10 fp16, 2^-7 bf16).
pub fn epsilon<T: HalfElement>() -> f64 {
    match T::DTYPE {
        specdec::DType::BF16 => 2f64.powi(-7),
        _ => 2f64.powi(-10),
    }
}

/// The largest difference between `got` and `want`, each beyond `tolerance(i)`: `None` when all are within.
pub fn worst_violation(
    got: &[f64],
    want: &[f64],
    tolerance: impl Fn(usize) -> f64,
) -> Option<(usize, f64, f64)> {
    got.iter()
        .zip(want)
        .enumerate()
        .filter(|(i, (g, w))| (*g - *w).abs() > tolerance(*i) || g.is_nan() != w.is_nan())
        .map(|(i, (g, w))| (i, *g, *w))
        .max_by(|a, b| (a.1 - a.2).abs().total_cmp(&(b.1 - b.2).abs()))
}

/// NaN patterns with a sign and a payload (quiet and signalling) for fp16 and bf16 keys: what the CPU's `half`
/// conversion would keep, and what the GPU's `cvt` turns into its canonical NaN.
pub const F16_PAYLOAD_NANS: [u16; 3] = [0xFE01, 0x7D55, 0xFC01];
pub const BF16_PAYLOAD_NANS: [u16; 3] = [0xFF81, 0x7F95, 0xFFC3];

/// A small problem (two requests, two kv heads, head dim 64) whose keys and values hold the NaN patterns `nans`
/// at a few places, with the RoPE style `rope`. Returns the problem and the element indices of `k` set to NaN.
pub fn with_payload_nans<T: HalfElement>(
    rng: &mut StdRng,
    rope: Option<RopeStyle>,
    nans: [u16; 3],
    from_bits: fn(u16) -> T,
) -> (Problem<T>, Vec<usize>) {
    let spec = Spec {
        trees: vec![star(3), chain(2)],
        prefix_lens: vec![5, 17],
        num_q_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
        rope,
    };
    let mut p = Problem::<T>::random(rng, &spec);
    let index = |row: usize, head: usize, j: usize| (row * 2 + head) * 64 + j;
    // Single elements of rows 1 and 2 (either member of a rotated pair), and all of row 4's head 0.
    let mut at = vec![index(1, 0, 0), index(2, 1, 40), index(2, 1, 9)];
    at.extend((0..64).map(|j| index(4, 0, j)));
    for (i, &e) in at.iter().enumerate() {
        p.k[e] = from_bits(nans[i % 3]);
        p.v[e] = from_bits(nans[(i + 1) % 3]);
    }
    (p, at)
}

// ---------------------------------------------------------------------------------------------------------
// The bodies run on every backend (`attention_tests!` in tests/attention_cpu.rs and tests/attention_gpu.rs).
//
// The oracle: on the CPU, the naive path reference above (`Problem::reference`, f64), within
// `CPU_F32_SLACK + eps |ref| + 2^-24`, and lse within `CPU_LSE_TOLERANCE (1 + |ref|)`. On CUDA, the CPU backend
// (itself held to the naive reference by the CPU run of the same body), within
// `2 eps max_j |v_j| + eps |ref| + 2^-24` with `max |v| = 1`
// here (`eps` = 2^-10 fp16, 2^-7 bf16): probabilities are rounded to the element type before the PV product
// (each off by at most eps/2 relative, which moves the output by at most eps/2 max|v|), the output is rounded
// once, and fp32 accumulation and exp2f add far less; lse within 2^-12 (1 + |ref|). On both, the appended cache
// rows must be the rotation rule's bits exactly, and every other cache element unchanged.
// ---------------------------------------------------------------------------------------------------------

/// The spacing of fp16's subnormals, which bounds the absolute rounding error of tiny outputs.
pub const SUBNORMAL_STEP: f64 = 1.0 / (1u64 << 24) as f64;

/// The CPU kernel's f32 error, absolute, for values in [-1, 1): the weighted sum over `n` keys is off by
/// about `sqrt(n) 2^-24 max|v|` (worst case `n 2^-24`, 2^-15.9 at the CPU bodies' 270 keys at most), a score
/// by about `sqrt(D) 2^-24 sum_d |q_d k_d| scale` (worst case `D` times), which moves a weight by as much
/// relatively, and the exponential adds 3 ulp. 2^-14, a sixteenth of fp16's ulp at 1, is far above the typical
/// errors (not a worst-case bound at D = 256); a wrong key, mask or scale is off by far more.
pub const CPU_F32_SLACK: f64 = 1.0 / 16384.0;

/// The CPU kernel's lse, relative to `1 + |lse|`: f32 scores (above) and exponentials, the sum of weights in
/// f64, the logarithm in f64, then one f32 rounding.
pub const CPU_LSE_TOLERANCE: f64 = 1.0 / 65536.0;

/// Declares one test per body, each running it on `$device` (an `Option<TestDevice>`; `None` skips).
#[macro_export]
macro_rules! attention_tests {
    ($device:expr) => {
        $crate::device_tests!($device; attention =>
            trees_match_the_reference_fp16,
            trees_match_the_reference_bf16,
            every_tree_shape_at_64_nodes,
            rope_equals_inputs_rotated_beforehand,
            rows_claimed_by_two_requests_go_to_one_and_flag_the_other,
        );
    };
}

impl<T: HalfElement + Element> Problem<T> {
    /// The problem on `device`: (out, lse, k_cache, v_cache, request_status), `out` and `lse` poisoned with NaN
    /// first and the status with -9 (left so without `request_status`), every output checked past its end.
    pub fn run(&self, device: &TestDevice, with_status: bool) -> specdec::Result<CpuFlagged<T>> {
        let up = |x: &[i32]| device.upload(x);
        let (q, k, v) = (
            device.upload(&self.q),
            device.upload(&self.k),
            device.upload(&self.v),
        );
        let (offsets, parents, prefix, table) = (
            up(&self.token_offsets),
            up(&self.parents),
            up(&self.prefix_lens),
            up(&self.page_table),
        );
        let cos_sin = self.cos_sin.as_ref().map(|c| device.upload(c));
        let poison = T::from_f32(-12345.0);
        let mut k_cache = device.upload_with_spare(&self.k_cache, poison);
        let mut v_cache = device.upload_with_spare(&self.v_cache, poison);
        let mut out = device.upload_with_spare(&vec![T::NAN; self.shape.q_len()], poison);
        let mut lse = device.upload_with_spare(&vec![f32::NAN; self.shape.lse_len()], -777.0);
        let mut status = device.upload_with_spare(&vec![-9i32; self.shape.num_requests], -9);
        let inputs = TreeAttentionInputs {
            shape: self.shape,
            q: q.input(),
            k: k.input(),
            v: v.input(),
            token_offsets: offsets.input(),
            parents: parents.input(),
            prefix_lens: prefix.input(),
            page_table: table.input(),
            cos_sin_cache: cos_sin.as_ref().map(Array::input),
            softmax_scale: self.scale,
        };
        let outputs = TreeAttentionOutputs {
            k_cache: k_cache.output(),
            v_cache: v_cache.output(),
            out: out.output(),
            lse: Some(lse.output()),
            request_status: with_status.then(|| status.output()),
        };
        device
            .backend
            .tree_attention(device.stream(), &inputs, outputs)?;
        Ok((
            out.download(device),
            lse.download(device),
            k_cache.download(device),
            v_cache.download(device),
            status.download(device),
        ))
    }
}

/// The rows at slots L_b + i hold the rotated keys and the values; every other element is unchanged.
pub fn check_appended<T: HalfElement>(p: &Problem<T>, k_cache: &[T], v_cache: &[T], label: &str) {
    let (hkv, d) = (p.shape.cache.num_kv_heads, p.shape.cache.head_dim);
    let mut want_k = p.k_cache.clone();
    let mut want_v = p.v_cache.clone();
    for b in 0..p.shape.num_requests {
        for node in 0..p.rows(b).len() {
            for h in 0..hkv {
                let at = p.cache_index(b, p.prefix_lens[b] as usize + node, h);
                let (k, v) = p.appended(b, node, h);
                want_k[at..at + d].copy_from_slice(&k);
                want_v[at..at + d].copy_from_slice(&v);
            }
        }
    }
    let bits = |x: &[T]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(k_cache) == bits(&want_k),
        "{label}: k_cache differs from the expected appends"
    );
    assert!(
        bits(v_cache) == bits(&want_v),
        "{label}: v_cache differs from the expected appends"
    );
}

/// `p` on `device` against the oracle of the module comment above.
pub fn check<T: HalfElement + Element>(device: &TestDevice, p: &Problem<T>, label: &str) {
    let label = format!("{} {label}", device.name());
    let (out, lse, k_cache, v_cache, status) = p.run(device, true).unwrap();
    assert!(
        status.iter().all(|&s| s == 0),
        "{label}: request_status {status:?}"
    );
    let eps = epsilon::<T>();
    let f = |x: &[T]| x.iter().map(|e| f64::from(e.to_f32())).collect::<Vec<_>>();
    let g = |x: &[f32]| x.iter().map(|&e| f64::from(e)).collect::<Vec<_>>();
    let (got_out, got_lse) = (f(&out), g(&lse));
    let (want_out, want_lse, out_slack, lse_tolerance): (Vec<f64>, Vec<f64>, f64, f64) =
        if device.is_cpu() {
            let (o, l) = p.reference();
            (o, l, CPU_F32_SLACK, CPU_LSE_TOLERANCE)
        } else {
            let (o, l, _, _, _) = p.run(&TestDevice::cpu(), true).unwrap();
            (f(&o), g(&l), 2.0 * eps, 1.0 / 4096.0)
        };
    if let Some((i, g, w)) = worst_violation(&got_out, &want_out, |i| {
        out_slack + eps * want_out[i].abs() + SUBNORMAL_STEP
    }) {
        panic!("{label}: out[{i}] = {g}, reference {w}");
    }
    if let Some((i, g, w)) = worst_violation(&got_lse, &want_lse, |i| {
        lse_tolerance * (1.0 + want_lse[i].abs())
    }) {
        panic!("{label}: lse[{i}] = {g}, reference {w}");
    }
    check_appended(p, &k_cache, &v_cache, &label);
}

pub fn tree_of(rng: &mut StdRng, kind: usize, n: usize) -> Vec<i32> {
    match kind % 4 {
        0 => chain(n),
        1 => star(n),
        2 => full_binary(n),
        _ => random_tree(rng, n),
    }
}

/// Chain, star, full binary and random trees over every head dim, GQA ratio and RoPE style. The CPU runs small
/// trees (1 to 12 nodes) over short prefixes; CUDA runs tree sizes that land on every row-warp configuration
/// (1 to 64 nodes) over prefixes up to 2600, ragged across requests.
fn sweep<T: HalfElement + Element>(device: &TestDevice, rng: &mut StdRng) {
    let styles = [None, Some(RopeStyle::Neox), Some(RopeStyle::Gptj)];
    let (heads, tree_sizes): (&[(usize, usize)], &[usize]) = if device.is_cpu() {
        (&[(4, 4), (8, 2), (16, 2)], &[12])
    } else {
        (&[(4, 4), (16, 4), (32, 4)], &[1, 3, 8, 17, 64])
    };
    let mut case = 0;
    for head_dim in [64, 128, 256] {
        for &(hq, hkv) in heads {
            for rope in styles {
                for &tree_size in tree_sizes {
                    let page_size = [16, 32, 64][case % 3];
                    let requests = 1 + case % 3;
                    let trees: Vec<Vec<i32>> = (0..requests)
                        .map(|r| {
                            let n = if r == 0 && !device.is_cpu() {
                                tree_size
                            } else {
                                rng.random_range(1..=tree_size)
                            };
                            tree_of(rng, case + r, n)
                        })
                        .collect();
                    // L = 0, L below a page, L not a multiple of the page size, and (CUDA) long.
                    let prefix_lens = (0..requests)
                        .map(|r| match (case + r) % if device.is_cpu() { 3 } else { 4 } {
                            0 => 0,
                            1 => rng.random_range(1..page_size),
                            2 => rng.random_range(page_size..4 * page_size) | 1,
                            _ => rng.random_range(1000..2600),
                        })
                        .collect();
                    let spec = Spec {
                        trees,
                        prefix_lens,
                        num_q_heads: hq,
                        num_kv_heads: hkv,
                        head_dim,
                        page_size,
                        rope,
                    };
                    let p = Problem::<T>::random(rng, &spec);
                    let label = format!(
                        "{} d{head_dim} hq{hq} hkv{hkv} T<={tree_size} rope {rope:?}",
                        T::DTYPE.name()
                    );
                    check(device, &p, &label);
                    case += 1;
                }
            }
        }
    }
}

pub fn trees_match_the_reference_fp16(device: &TestDevice) {
    sweep::<half::f16>(
        device,
        &mut super::rng(&format!("{} fp16 trees", device.name())),
    );
}

pub fn trees_match_the_reference_bf16(device: &TestDevice) {
    sweep::<half::bf16>(
        device,
        &mut super::rng(&format!("{} bf16 trees", device.name())),
    );
}

pub fn every_tree_shape_at_64_nodes(device: &TestDevice) {
    let mut rng = super::rng(&format!("{} 64-node trees", device.name()));
    for kind in 0..4 {
        let spec = Spec {
            trees: vec![tree_of(&mut rng, kind, 64), tree_of(&mut rng, kind, 5)],
            prefix_lens: vec![37, 0],
            num_q_heads: 8,
            num_kv_heads: 2,
            head_dim: 64,
            page_size: 16,
            rope: Some(RopeStyle::Neox),
        };
        let p = Problem::<half::bf16>::random(&mut rng, &spec);
        check(device, &p, &format!("tree kind {kind}"));
    }
}

/// RoPE in the call equals RoPE applied beforehand by the documented rule, bit for bit (out and cache).
pub fn rope_equals_inputs_rotated_beforehand(device: &TestDevice) {
    let mut rng = super::rng(&format!("{} RoPE", device.name()));
    for style in [RopeStyle::Neox, RopeStyle::Gptj] {
        let spec = Spec {
            trees: vec![full_binary(9), chain(4)],
            prefix_lens: vec![21, 3],
            num_q_heads: 8,
            num_kv_heads: 2,
            head_dim: 64,
            page_size: 16,
            rope: Some(style),
        };
        let with_rope = Problem::<half::bf16>::random(&mut rng, &spec);
        let mut without = Problem::<half::bf16>::random(&mut rng, &Spec { rope: None, ..spec });
        without.q = with_rope.q.clone();
        without.k = with_rope.k.clone();
        without.v = with_rope.v.clone();
        without.k_cache = with_rope.k_cache.clone();
        without.v_cache = with_rope.v_cache.clone();
        without.page_table = with_rope.page_table.clone();
        let (hq, hkv, d) = (8, 2, 64);
        for b in 0..2 {
            for row in with_rope.rows(b) {
                let node = row - with_rope.rows(b).start;
                let depth = path(&with_rope.parents[with_rope.rows(b)], node).len() - 1;
                let pos = with_rope.prefix_lens[b] as usize + depth;
                for h in 0..hq {
                    let r = with_rope.rotated(&with_rope.q[(row * hq + h) * d..][..d], pos);
                    without.q[(row * hq + h) * d..][..d].copy_from_slice(&r);
                }
                for h in 0..hkv {
                    let r = with_rope.rotated(&with_rope.k[(row * hkv + h) * d..][..d], pos);
                    without.k[(row * hkv + h) * d..][..d].copy_from_slice(&r);
                }
            }
        }
        let a = with_rope.run(device, false).unwrap();
        let b = without.run(device, false).unwrap();
        let bits = |x: &[half::bf16]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.0), bits(&b.0), "{style:?}: out");
        assert_eq!(bits(&a.2), bits(&b.2), "{style:?}: k_cache");
        assert_eq!(a.1, b.1, "{style:?}: lse");
    }
}

/// Broken offsets of one request can make two others, each with valid offsets of its own, claim the same rows:
/// with `token_offsets = [0, 3, 1, 4]` request 1 is broken (3 > 1) and request 2's rows 1..4 overlap request 0's.
/// The row goes to one request (the search of `token_owner`) and the other is flagged OFFSETS, so request 0 is
/// computed exactly as without its neighbours (before, the flagged request 2's NaN rows overwrote request 0's).
pub fn rows_claimed_by_two_requests_go_to_one_and_flag_the_other(device: &TestDevice) {
    let mut rng = super::rng(&format!("{} rows claimed twice", device.name()));
    let spec = Spec {
        trees: vec![chain(3), chain(1), chain(1)],
        prefix_lens: vec![5, 17, 9],
        num_q_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
        rope: Some(RopeStyle::Neox),
    };
    let good = Problem::<half::f16>::random(&mut rng, &spec);
    let mut p = good.clone();
    p.token_offsets = vec![0, 3, 1, 4];
    let (out, lse, k_cache, _, status) = p.run(device, true).unwrap();
    let offsets = specdec::RequestStatus::Offsets.code();
    assert_eq!(status, [0, offsets, offsets]);
    let (good_out, good_lse, good_k, _, _) = good.run(device, true).unwrap();
    let (hq, d) = (4, 64);
    let bits = |x: &[half::f16]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&out[..3 * hq * d]),
        bits(&good_out[..3 * hq * d]),
        "request 0's rows, as without its neighbours"
    );
    assert_eq!(&lse[..3 * hq], &good_lse[..3 * hq], "request 0's lse");
    // Nothing else was computed: rows 3.. are as they were (NaN), and only request 0 appended to the cache.
    assert!(out[3 * hq * d..].iter().all(|x| x.to_f32().is_nan()));
    let mut appended = k_cache.clone();
    for node in 0..3 {
        for h in 0..2 {
            let at = p.cache_index(0, 5 + node, h);
            assert_eq!(bits(&k_cache[at..at + d]), bits(&good_k[at..at + d]));
            appended[at..at + d].copy_from_slice(&p.k_cache[at..at + d]);
        }
    }
    assert_eq!(
        bits(&appended),
        bits(&p.k_cache),
        "a flagged request appended to the cache"
    );
}
