//! Merging a blend into the model weights: for every targeted matrix,
//! `W' = W + sum_k w_k * (alpha_k / r_k) * B_k A_k`, computed exactly as one GEMM per matrix over the
//! concatenated ranks (B_cat [out, R] with scaled columns, A_cat [R, in]), never by averaging A and B.
//!
//! [`Composition::Factors`] is LoraHub's composition, `W' = W + (Σ_k w_k s_k B_k)(Σ_k w_k A_k)`, kept
//! for the customization benchmark's LoraHub peer (it needs equal ranks and has cross terms
//! `B_i A_j`, which is why the product merges deltas).
//!
//! On a 4-bit model the delta is not merged: re-quantizing `W + delta` rounds away a delta that is ~2%
//! of a quantization step (docs/engine.md). [`low_rank`] hands the same concatenated factors to the
//! graph's unmerged path instead, which adds `(x A_cat^T) B_cat^T` beside the shared 4-bit matrix; with
//! [`PoolFactors`] the factors of the whole pool are built once and a blend is only its per-rank scales.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::model::{LowRank, ModelFiles, Precision, SharedFactors, WeightData, WeightOverride, quant, target_shape};
use crate::weights::WeightFile;

use super::Pool;

/// How the adapters' factors combine into one delta per matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Composition {
    /// `Σ_k w_k s_k B_k A_k`: the exact weighted sum of the adapters' deltas (the product's blend).
    #[default]
    Deltas,
    /// `(Σ_k w_k s_k B_k)(Σ_k w_k A_k)`: LoraHub's composition of the factors (equal ranks only).
    Factors,
}

/// Merged weights for every matrix touched by an adapter with non-zero weight. `threads` workers
/// (at least one) split the matrices between them.
pub fn merge(
    pool: &Pool,
    model: &ModelFiles,
    base: &WeightFile,
    weights: &[f32],
    composition: Composition,
    threads: usize,
) -> Result<Vec<WeightOverride>> {
    check_weights(pool, weights)?;
    let mut jobs = Vec::new();
    for layer in 0..model.arch.num_hidden_layers {
        for target in &model.manifest.adapter_targets {
            let touched = pool.adapters.iter().zip(weights).any(|(a, &w)| w != 0.0 && a.targets.contains(target));
            if touched {
                jobs.push((layer, target.as_str()));
            }
        }
    }
    run_jobs(&jobs, threads, |layer, target| merge_one(pool, model, base, weights, composition, layer, target))
}

fn merge_one(
    pool: &Pool,
    model: &ModelFiles,
    base: &WeightFile,
    weights: &[f32],
    composition: Composition,
    layer: usize,
    target: &str,
) -> Result<WeightOverride> {
    let [out, inp] = target_shape(&model.arch, target)
        .ok_or_else(|| Error::InvalidRequest(format!("unknown adapter target '{target}'")))?;
    let name = crate::model::target_weight_name(layer, target);
    let mut merged = base.dense(&name)?.into_owned();
    if merged.len() != out * inp {
        return Err(Error::model(base.path(), format!("'{name}' has {} values, expected {out} x {inp}", merged.len())));
    }
    let f = concat_factors(pool, weights, composition, layer, target, out, inp)?;
    if f.rank > 0 {
        // SAFETY: the pointers and strides describe row-major buffers of the stated sizes:
        // f.b is [out, rank], f.a is [rank, inp], merged is [out, inp].
        unsafe {
            matrixmultiply::sgemm(
                out,
                f.rank,
                inp,
                1.0,
                f.b.as_ptr(),
                f.rank as isize,
                1,
                f.a.as_ptr(),
                inp as isize,
                1,
                1.0,
                merged.as_mut_ptr(),
                inp as isize,
                1,
            );
        }
    }
    Ok(encoded(model, name, merged, out, inp))
}

/// One matrix's blended delta as factors, `delta = b @ a`: the adapters' `B` [out, r_k] (blend weight
/// and alpha/r folded in) and `A` [r_k, in] concatenated along the rank.
fn concat_factors(
    pool: &Pool,
    weights: &[f32],
    composition: Composition,
    layer: usize,
    target: &str,
    out: usize,
    inp: usize,
) -> Result<LowRank> {
    let mut a_cat: Vec<f32> = Vec::new(); // [R, in]
    let mut blocks: Vec<(usize, f32, Vec<f32>)> = Vec::new();
    for (adapter, &w) in pool.adapters.iter().zip(weights) {
        if w == 0.0 {
            continue;
        }
        if let Some(pair) = adapter.lora(layer, target)? {
            match composition {
                Composition::Deltas => a_cat.extend_from_slice(&pair.a),
                // LoraHub weights A as well as B (see compose_factors).
                Composition::Factors => a_cat.extend(pair.a.iter().map(|v| v * w)),
            }
            blocks.push((adapter.rank, w * adapter.scale(), pair.b.into_owned()));
        }
    }
    if composition == Composition::Factors {
        (a_cat, blocks) = compose_factors(&blocks, &a_cat, inp, out)?;
    }
    Ok(stack_factors(format!("model.layers.{layer}.{target}"), a_cat, &blocks, out))
}

/// `a_cat` [R, in] with the `blocks` (rank, factor, B [out, rank]) side by side as B_cat [out, R], each
/// block's columns multiplied by its factor.
fn stack_factors(module: String, a_cat: Vec<f32>, blocks: &[(usize, f32, Vec<f32>)], out: usize) -> LowRank {
    let rank: usize = blocks.iter().map(|b| b.0).sum();
    let mut b_cat = vec![0.0f32; out * rank]; // [out, R], filled column block by column block
    let mut col = 0;
    for (r, factor, b) in blocks {
        for row in 0..out {
            for j in 0..*r {
                b_cat[row * rank + col + j] = b[row * r + j] * factor;
            }
        }
        col += r;
    }
    LowRank { module, rank, a: a_cat, b: b_cat }
}

/// The unmerged path's factors of the whole pool (every adapter, B unscaled), built once at load and
/// shared by every blend, and where each adapter's ranks sit in them: a blend is then only
/// [`PoolFactors::scales`].
pub struct PoolFactors {
    pub shared: SharedFactors,
    /// Per module the pool touches: its name and, in column order, (adapter index, rank).
    spans: Vec<(String, Vec<(usize, usize)>)>,
}

impl PoolFactors {
    pub fn new(pool: &Pool, model: &ModelFiles, threads: usize) -> Result<PoolFactors> {
        let jobs: Vec<(usize, &str)> = (0..model.arch.num_hidden_layers)
            .flat_map(|layer| model.manifest.adapter_targets.iter().map(move |t| (layer, t.as_str())))
            .filter(|(_, t)| pool.adapters.iter().any(|a| a.targets.iter().any(|x| x == t)))
            .collect();
        let built = run_jobs(&jobs, threads, |layer, target| {
            let [out, _] = target_shape(&model.arch, target)
                .ok_or_else(|| Error::InvalidRequest(format!("unknown adapter target '{target}'")))?;
            let (mut a_cat, mut blocks, mut span) = (Vec::new(), Vec::new(), Vec::new());
            for (k, adapter) in pool.adapters.iter().enumerate() {
                if let Some(pair) = adapter.lora(layer, target)? {
                    a_cat.extend_from_slice(&pair.a);
                    blocks.push((adapter.rank, 1.0, pair.b.into_owned()));
                    span.push((k, adapter.rank));
                }
            }
            let module = format!("model.layers.{layer}.{target}");
            Ok((stack_factors(module.clone(), a_cat, &blocks, out), (module, span)))
        })?;
        let (factors, spans): (Vec<LowRank>, Vec<_>) = built.into_iter().unzip();
        Ok(PoolFactors { shared: SharedFactors::new(model, factors)?, spans })
    }

    /// A blend's per-rank scales for every module: adapter k's ranks get `w_k * alpha_k / r_k`.
    pub fn scales(&self, pool: &Pool, weights: &[f32]) -> Result<Vec<(String, Vec<f32>)>> {
        check_weights(pool, weights)?;
        Ok(self
            .spans
            .iter()
            .map(|(module, span)| {
                let scale = span
                    .iter()
                    .flat_map(|&(k, r)| std::iter::repeat_n(weights[k] * pool.adapters[k].scale(), r))
                    .collect();
                (module.clone(), scale)
            })
            .collect())
    }
}

/// A blend's delta for every adapter-targetable matrix, as the factors the graph's unmerged path
/// takes (see [`LowRank`]): exact, nothing merged or re-quantized. Matrices no adapter with non-zero
/// weight touches get rank 0. `threads` workers split the matrices.
pub fn low_rank(
    pool: &Pool,
    model: &ModelFiles,
    weights: &[f32],
    composition: Composition,
    threads: usize,
) -> Result<Vec<LowRank>> {
    check_weights(pool, weights)?;
    let jobs: Vec<(usize, &str)> = (0..model.arch.num_hidden_layers)
        .flat_map(|layer| model.manifest.adapter_targets.iter().map(move |t| (layer, t.as_str())))
        .collect();
    run_jobs(&jobs, threads, |layer, target| {
        let [rows, cols] = target_shape(&model.arch, target)
            .ok_or_else(|| Error::InvalidRequest(format!("unknown adapter target '{target}'")))?;
        concat_factors(pool, weights, composition, layer, target, rows, cols)
    })
}

/// `f(layer, target)` for every job on `threads` workers (at least one), results in job order.
fn run_jobs<T: Send>(
    jobs: &[(usize, &str)],
    threads: usize,
    f: impl Fn(usize, &str) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<T>>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(jobs.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(layer, target)) = jobs.get(i) else { break };
                    let r = f(layer, target);
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::InvalidRequest("merge worker did not finish".into()))))
        .collect()
}

/// The merged matrix in the model's precision: re-quantized here, on the merge's worker threads, for a
/// 4-bit model (`quantize(dequantize(W) + delta)`, fresh per-block range).
fn encoded(model: &ModelFiles, name: String, merged: Vec<f32>, out: usize, inp: usize) -> WeightOverride {
    match (model.manifest.precision, model.block_size()) {
        (Precision::Q4, Ok(block)) if inp % block == 0 => {
            WeightOverride { name, data: WeightData::Q4(quant::encode_q4(&merged, out, inp, block)) }
        }
        // Anything else is checked (and refused with a clear error) where the session is built.
        _ => WeightOverride::dense(name, merged),
    }
}

fn check_weights(pool: &Pool, weights: &[f32]) -> Result<()> {
    if weights.len() != pool.adapters.len() {
        return Err(Error::InvalidRequest(format!(
            "{} blend weights for a pool of {} adapters",
            weights.len(),
            pool.adapters.len()
        )));
    }
    if weights.iter().any(|w| !w.is_finite()) {
        return Err(Error::InvalidRequest("blend weights must be finite".into()));
    }
    Ok(())
}

/// LoraHub's factors from the concatenated ones: one rank-r block with B = Σ w_k s_k B_k and
/// A = Σ w_k A_k (`blocks` carry w_k s_k; `a_cat`'s blocks are already weighted by w_k).
#[allow(clippy::type_complexity)]
fn compose_factors(
    blocks: &[(usize, f32, Vec<f32>)],
    a_cat: &[f32],
    inp: usize,
    out: usize,
) -> Result<(Vec<f32>, Vec<(usize, f32, Vec<f32>)>)> {
    let Some(&(r, _, _)) = blocks.first() else { return Ok((Vec::new(), Vec::new())) };
    if blocks.iter().any(|b| b.0 != r) {
        return Err(Error::InvalidRequest("composing factors needs adapters of equal rank".into()));
    }
    let mut a = vec![0.0f32; r * inp];
    let mut b = vec![0.0f32; out * r];
    for (k, (_, factor, bk)) in blocks.iter().enumerate() {
        for (dst, src) in a.iter_mut().zip(&a_cat[k * r * inp..(k + 1) * r * inp]) {
            *dst += src;
        }
        for (dst, src) in b.iter_mut().zip(bk) {
            *dst += src * factor;
        }
    }
    Ok((a, vec![(r, 1.0, b)]))
}
