//! The exported decoder graph in an ONNX Runtime session, and its KV cache.
//!
//! The cache is one buffer per layer and kind, [1, kv_heads, capacity, head_dim], bound through an
//! `IoBinding` as both the step's `past_key_values.*` input and its `present.*` output: the graph's
//! `GroupQueryAttention` sees the same pointer on both sides and writes the new positions in place, so a
//! step costs no copy of the cache (the old graph concatenated the whole cache every step).

use std::sync::{Arc, Mutex};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, Tensor};

use super::quant::{self, Q4Matrix};
use super::{Architecture, ModelFiles, Precision, SharedWeights};
use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::runtime::{Provider, Runtime};

/// Replacement for one adapter-targetable weight (Hugging Face name and layout [out, in]).
/// The buffers move into ONNX Runtime without a copy.
#[derive(Clone)]
pub struct WeightOverride {
    pub name: String,
    pub data: WeightData,
}

#[derive(Clone)]
pub enum WeightData {
    /// Row-major f32 values; encoded to 4 bits here when the model is 4-bit.
    F32(Vec<f32>),
    /// Already encoded for a 4-bit model (merges encode on their worker threads).
    Q4(Q4Matrix),
}

impl WeightOverride {
    pub fn dense(name: impl Into<String>, data: Vec<f32>) -> WeightOverride {
        WeightOverride { name: name.into(), data: WeightData::F32(data) }
    }

    /// Bytes the override holds in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Q4(m) => m.packed.len() + 4 * (m.scales.len() + m.offsets.len()),
        }
    }
}

/// Keys and values of every layer for the positions processed so far (batch of one), in buffers of a
/// fixed capacity that grow (with one copy) when a forward pass needs more positions.
pub struct KvCache {
    /// Per layer, key then value: [1, kv_heads, capacity, head_dim], allocated by ONNX Runtime (only such
    /// tensors can be bound as outputs). Positions from `len` on hold stale data that the next step
    /// overwrites.
    values: Vec<DynValue>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position from `len` on: the next forward pass continues after position `len - 1`.
    /// Several continuations of one prompt share its cache this way (choice scoring).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes of the buffers.
    pub fn bytes(&self) -> usize {
        self.values.len() * self.row_floats() * self.capacity * 4
    }

    /// Layer `layer`'s keys, [kv_heads, capacity, head_dim] (entries from `len` on are stale or, right
    /// after a catalyst pass, the catalyst's).
    pub fn layer_keys(&self, layer: usize) -> Result<&[f32]> {
        let v = self
            .values
            .get(2 * layer)
            .ok_or_else(|| Error::InvalidRequest(format!("no layer {layer} in the cache")))?;
        Ok(v.try_extract_tensor::<f32>().map_err(Error::ort("reading the KV cache"))?.1)
    }

    /// Layer `layer`'s values, laid out as [`KvCache::layer_keys`].
    pub fn layer_values(&self, layer: usize) -> Result<&[f32]> {
        let v = self
            .values
            .get(2 * layer + 1)
            .ok_or_else(|| Error::InvalidRequest(format!("no layer {layer} in the cache")))?;
        Ok(v.try_extract_tensor::<f32>().map_err(Error::ort("reading the KV cache"))?.1)
    }

    /// Keeps, in every lane (lane = layer * kv_heads + kv head), exactly the entries `keep[lane]` lists
    /// (ascending, the same count in every lane), moved to positions 0..count in that order: keys are
    /// rotated by their position change (context-reset RoPE), so the cache reads as if the kept entries
    /// had been computed at their new positions. Values do not depend on position and only move.
    pub fn compact(&mut self, keep: &[crate::context::Selection], rope: &crate::context::Rope) -> Result<()> {
        let layers = self.values.len() / 2;
        let Some(count) = keep.first().map(Vec::len) else { return Ok(()) };
        if layers == 0 || keep.len() % layers != 0 {
            return Err(Error::InvalidRequest(format!("{} selections for {layers} layers", keep.len())));
        }
        let heads = keep.len() / layers;
        let bad = keep.iter().any(|k| {
            k.len() != count || k.windows(2).any(|w| w[0] >= w[1]) || k.last().is_some_and(|&l| l as usize >= self.len)
        });
        if bad {
            return Err(Error::InvalidRequest("cache selections must be ascending, in range and of equal size".into()));
        }
        let capacity = self.capacity;
        // Every lane's entries move back by at most `len` positions: one turn per distance, made once.
        let mut turns: Vec<Option<Vec<(f32, f32)>>> = vec![None; self.len];
        for (i, value) in self.values.iter_mut().enumerate() {
            let (layer, is_key) = (i / 2, i % 2 == 0);
            let (shape, data) = value.try_extract_tensor_mut::<f32>().map_err(Error::ort("compacting the KV cache"))?;
            let d = shape.get(3).copied().unwrap_or(0) as usize;
            for h in 0..heads {
                let lane = &mut data[h * capacity * d..(h + 1) * capacity * d];
                for (to, &from) in keep[layer * heads + h].iter().enumerate() {
                    let from = from as usize;
                    if from != to {
                        lane.copy_within(from * d..(from + 1) * d, to * d);
                        if is_key {
                            let turn = turns[from - to].get_or_insert_with(|| rope.turn(to as f64 - from as f64));
                            rope.apply(&mut lane[to * d..(to + 1) * d], turn);
                        }
                    }
                }
            }
        }
        self.len = count;
        Ok(())
    }

    /// Floats per position in one buffer (kv_heads * head_dim), from the buffers' shape.
    fn row_floats(&self) -> usize {
        self.values
            .first()
            .and_then(|v| v.shape().get(1).zip(v.shape().get(3)).map(|(h, d)| (h * d) as usize))
            .unwrap_or(0)
    }
}

/// A blend's delta for one adapter-targetable module, applied unmerged: the graph adds
/// `(x @ a^T) @ b^T` to the module's output. `a` [rank, in] and `b` [out, rank] are row-major, PEFT's
/// layouts (the blend weights and alpha/r folded into `b`); rank 0 leaves the module as it is.
#[derive(Clone)]
pub struct LowRank {
    /// e.g. `model.layers.3.self_attn.q_proj`
    pub module: String,
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl LowRank {
    pub fn bytes(&self) -> usize {
        4 * (self.a.len() + self.b.len())
    }
}

/// The unmerged path's factors of a whole pool, built once and shared by every blend of it: per module,
/// `A` [R, in] and `B` [out, R] concatenated over the pool's adapters (B unscaled). A blend is then only
/// its per-rank scales (`<module>.lora_scale`, blend weight times alpha/r), a few KB instead of the
/// factors' MBs, and is ready without copying any factor.
pub struct SharedFactors {
    /// (input name, value) for every `.lora_a` and `.lora_b` input, and each module's rank.
    values: Vec<(String, Arc<DynValue>)>,
    ranks: std::collections::HashMap<String, usize>,
    bytes: usize,
}

impl SharedFactors {
    /// `factors`: one entry per module the pool touches, `b` without any blend weight.
    pub fn new(files: &ModelFiles, factors: Vec<LowRank>) -> Result<SharedFactors> {
        let mut values = Vec::new();
        let mut ranks = std::collections::HashMap::new();
        let mut bytes = 0;
        for lr in factors {
            bytes += lr.bytes();
            ranks.insert(lr.module.clone(), lr.rank);
            let all = factor_values(files, lr)?;
            values.extend(all.into_iter().filter(|(n, _)| !n.ends_with(".lora_scale")).map(|(n, v)| (n, Arc::new(v))));
        }
        Ok(SharedFactors { values, ranks, bytes })
    }

    /// Bytes of the factors (held once, whatever the number of blends).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The rank of `module`'s concatenated factors (0 when the pool does not touch it).
    pub fn rank(&self, module: &str) -> usize {
        self.ranks.get(module).copied().unwrap_or(0)
    }
}

pub struct Decoder {
    /// Shared by the decoders of every unmerged blend (they differ only in `factors`); a merged blend
    /// or the base model has its own. Runs are serialized by the engine, so the lock is uncontended.
    session: Arc<Mutex<Session>>,
    /// The unmerged path's inputs (`<module>.lora_a`, `<module>.lora_b`), fed to every run.
    factors: Vec<(String, Arc<DynValue>)>,
    arch: Architecture,
    provider: Provider,
    past_names: Vec<String>,
    present_names: Vec<String>,
    /// Declared after `session` so that it is dropped after it: the session uses these tensors.
    _shared: Option<Arc<SharedWeights>>,
}

impl Decoder {
    /// Creates the session. `overrides` replace named weights of the graph (adapter merging); with
    /// `shared`, every other weight comes from there, and the overrides stay private to this session.
    pub fn load(
        files: &ModelFiles,
        rt: &Runtime,
        cfg: &RuntimeConfig,
        shared: Option<&Arc<SharedWeights>>,
        overrides: Vec<WeightOverride>,
    ) -> Result<Decoder> {
        Decoder::load_graph(files, &files.manifest.onnx, rt, cfg, shared, overrides)
    }

    /// The session of the unmerged path (`lora_onnx` in the manifest of a 4-bit folder), as a decoder
    /// whose factors all have rank 0 (the base model); [`Decoder::with_factors`] makes blends of it.
    pub fn load_unmerged(
        files: &ModelFiles,
        rt: &Runtime,
        cfg: &RuntimeConfig,
        shared: Option<&Arc<SharedWeights>>,
    ) -> Result<Decoder> {
        let graph = files.manifest.lora_onnx.as_deref().ok_or_else(|| {
            Error::model(files.dir.join(super::MANIFEST_FILE), "no lora_onnx graph (re-export with --precision q4)")
        })?;
        let mut d = Decoder::load_graph(files, graph, rt, cfg, shared, Vec::new())?;
        let modules: Vec<String> = {
            let session = d.session.lock().unwrap_or_else(|p| p.into_inner());
            session.inputs().iter().filter_map(|i| i.name().strip_suffix(".lora_a").map(str::to_string)).collect()
        };
        if modules.is_empty() {
            return Err(Error::model(files.path(graph), "graph has no <module>.lora_a inputs"));
        }
        d.factors = Vec::new();
        for module in modules {
            let empty = LowRank { module, rank: 0, a: Vec::new(), b: Vec::new() };
            d.factors.extend(factor_values(files, empty)?.into_iter().map(|(n, v)| (n, Arc::new(v))));
        }
        Ok(d)
    }

    /// A decoder sharing this unmerged-path session with `blend`'s factors; modules the blend leaves
    /// out keep rank 0. Builds no session: the cost is the factors' bytes.
    pub fn with_factors(&self, files: &ModelFiles, blend: Vec<LowRank>) -> Result<Decoder> {
        if self.factors.is_empty() {
            return Err(Error::InvalidRequest("this decoder has no unmerged path".into()));
        }
        let mut factors = self.factors.clone();
        let slots: std::collections::HashMap<String, usize> =
            factors.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        for lr in blend {
            for (name, value) in factor_values(files, lr)? {
                let &i = slots.get(&name).ok_or_else(|| {
                    Error::InvalidRequest(format!("'{name}' is not an input of this graph's unmerged path"))
                })?;
                factors[i].1 = Arc::new(value);
            }
        }
        Ok(Decoder { factors, ..self.sibling() })
    }

    /// A decoder sharing this unmerged-path session and `shared`'s factors, with per-rank `scales`
    /// (module, one value per rank of that module's shared factors). Copies no factor.
    pub fn with_scales(&self, shared: &SharedFactors, scales: Vec<(String, Vec<f32>)>) -> Result<Decoder> {
        if self.factors.is_empty() {
            return Err(Error::InvalidRequest("this decoder has no unmerged path".into()));
        }
        let mut factors = self.factors.clone();
        let slots: std::collections::HashMap<String, usize> =
            factors.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        let slot = |name: &str| {
            slots
                .get(name)
                .copied()
                .ok_or_else(|| Error::InvalidRequest(format!("'{name}' is not an input of this graph's unmerged path")))
        };
        for (name, value) in &shared.values {
            factors[slot(name)?].1 = Arc::clone(value);
        }
        for (module, scale) in scales {
            let rank = shared.rank(&module);
            if scale.len() != rank {
                return Err(Error::InvalidRequest(format!(
                    "{} scales for {module}, whose shared factors have rank {rank}",
                    scale.len()
                )));
            }
            let value = Tensor::from_array((vec![rank], scale)).map_err(Error::ort("creating a factor tensor"))?;
            factors[slot(&format!("{module}.lora_scale"))?].1 = Arc::new(value.into_dyn());
        }
        // A module whose factors are shared but got no scales would keep a rank-0 scale against rank-R
        // factors: give it zeros (no delta) of the right rank.
        for (module, &rank) in &shared.ranks {
            let i = slot(&format!("{module}.lora_scale"))?;
            if factors[i].1.shape().first().copied().unwrap_or(0) as usize != rank {
                let zeros = Tensor::from_array((vec![rank], vec![0.0f32; rank]))
                    .map_err(Error::ort("creating a factor tensor"))?;
                factors[i].1 = Arc::new(zeros.into_dyn());
            }
        }
        Ok(Decoder { factors, ..self.sibling() })
    }

    /// This decoder's session and metadata, with no factors (for the `with_*` constructors).
    fn sibling(&self) -> Decoder {
        Decoder {
            session: Arc::clone(&self.session),
            factors: Vec::new(),
            arch: self.arch.clone(),
            provider: self.provider,
            past_names: self.past_names.clone(),
            present_names: self.present_names.clone(),
            _shared: self._shared.clone(),
        }
    }

    fn load_graph(
        files: &ModelFiles,
        graph: &str,
        rt: &Runtime,
        cfg: &RuntimeConfig,
        shared: Option<&Arc<SharedWeights>>,
        overrides: Vec<WeightOverride>,
    ) -> Result<Decoder> {
        let onnx = files.path(graph);
        let (mut builder, provider) = rt.session_builder(cfg)?;
        if let Some(sh) = shared {
            let skip: Vec<String> = overrides.iter().flat_map(|o| files.initializer_names(&o.name)).collect();
            builder = sh.attach(builder, &skip)?;
        }
        for (name, tensor) in override_values(files, overrides)? {
            let tensor = Arc::new(tensor);
            // With the shared packed container, an override added as an initializer would leave its
            // packed copy in the container for good; as an external initializer it stays the
            // session's own and is freed with it (at a cost: ~0.3 s more per session on SmolLM2-135M).
            builder = match shared.is_some_and(|sh| sh.packs_shared()) {
                true => builder.with_external_initializer(&name, tensor),
                false => builder.with_initializer(&name, tensor),
            }
            .map_err(Error::ort(format!("overriding weight {name}")))?;
        }
        let session = builder
            .commit_from_file(&onnx)
            .map_err(|e| Error::model(&onnx, format!("ONNX Runtime cannot load the graph or its weights: {e}")))?;
        let n = files.arch.num_hidden_layers;
        let past_names: Vec<String> =
            (0..n).flat_map(|i| [format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value")]).collect();
        let present_names: Vec<String> =
            (0..n).flat_map(|i| [format!("present.{i}.key"), format!("present.{i}.value")]).collect();
        check_io(&session, &onnx, &past_names, &present_names)?;
        tracing::info!(model = %files.dir.display(), provider = %provider, "decoder session ready");
        Ok(Decoder {
            session: Arc::new(Mutex::new(session)),
            factors: Vec::new(),
            arch: files.arch.clone(),
            provider,
            past_names,
            present_names,
            _shared: shared.cloned(),
        })
    }

    pub fn arch(&self) -> &Architecture {
        &self.arch
    }

    /// The execution provider running the graph (CPU takes any node it does not support).
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Finishes the profile enabled by `runtime.profile` and returns its file name.
    pub fn end_profiling(&mut self) -> Result<String> {
        self.session.lock().unwrap_or_else(|p| p.into_inner()).end_profiling().map_err(Error::ort("ending profiling"))
    }

    /// An empty cache; its buffers are allocated by the first forward pass, sized to what it needs.
    pub fn new_cache(&self) -> Result<KvCache> {
        self.new_cache_with_capacity(0)
    }

    /// An empty cache with room for `capacity` positions (a generation knows its prompt and budget, so
    /// its buffers never grow), at most the model's context.
    pub fn new_cache_with_capacity(&self, capacity: usize) -> Result<KvCache> {
        let mut cache = KvCache { values: Vec::new(), len: 0, capacity: 0 };
        if capacity > 0 {
            self.reserve(&mut cache, capacity.min(self.arch.max_position_embeddings))?;
        }
        Ok(cache)
    }

    /// Makes room for `needed` positions: new buffers of at least 1.5 times the old capacity (growth by
    /// one token at a time stays amortized), the positions held copied over.
    fn reserve(&self, cache: &mut KvCache, needed: usize) -> Result<()> {
        if needed <= cache.capacity && !cache.values.is_empty() {
            return Ok(());
        }
        let limit = self.arch.max_position_embeddings;
        if needed > limit {
            return Err(Error::InvalidRequest(format!(
                "{needed} positions exceed the model's context of {limit} tokens"
            )));
        }
        let capacity = needed.max(cache.capacity + cache.capacity / 2).max(16).min(limit);
        let (heads, d) = (self.arch.num_key_value_heads, self.arch.head_dim);
        let allocator = Allocator::default();
        let mut values = Vec::with_capacity(self.past_names.len());
        for i in 0..self.past_names.len() {
            let mut t = Tensor::<f32>::new(&allocator, [1usize, heads, capacity, d])
                .map_err(Error::ort("allocating the KV cache"))?;
            if let Some(old) = cache.values.get(i) {
                copy_positions(old, &mut t, cache.len, heads, d)?;
            }
            values.push(t.into_dyn());
        }
        cache.values = values;
        cache.capacity = capacity;
        Ok(())
    }

    /// Runs `ids` after the positions already in `cache` and returns the logits of the last `keep`
    /// positions as `keep` rows of `vocab_size`. The new positions are written into the cache in place;
    /// on error the cache still holds the positions it held (its length is unchanged).
    pub fn forward(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        keep: usize,
        run_options: Option<&RunOptions>,
    ) -> Result<Vec<f32>> {
        Ok(self.run(ids, cache, keep, run_options, false)?.0)
    }

    /// Whether the graph exposes each layer's queries (`attn_query.N`, exported since context
    /// compression; an older export cannot run `infinipot`).
    pub fn has_queries(&self) -> bool {
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        (0..self.arch.num_hidden_layers).all(|i| outputs.contains(&format!("attn_query.{i}").as_str()))
    }

    /// [`Decoder::forward`] that also returns every layer's queries for `ids` (un-rotated, [ids, stride]
    /// rows whose first `num_heads * head_dim` values are the query heads) and the row stride.
    pub fn forward_queries(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        keep: usize,
        run_options: Option<&RunOptions>,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>, usize)> {
        let (logits, queries) = self.run(ids, cache, keep, run_options, true)?;
        let (queries, stride) = queries.unwrap_or_default();
        Ok((logits, queries, stride))
    }

    /// One forward pass; with `queries`, every layer's queries too.
    fn run(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        keep: usize,
        run_options: Option<&RunOptions>,
        queries: bool,
    ) -> Result<(Vec<f32>, Option<LayerQueries>)> {
        if ids.is_empty() || keep == 0 || keep > ids.len() {
            return Err(Error::InvalidRequest(format!("forward: {} ids, keep {keep}", ids.len())));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.arch.vocab_size) {
            return Err(Error::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.arch.vocab_size
            )));
        }
        let total = cache.len + ids.len();
        self.reserve(cache, total)?;
        let total_i32 = i32::try_from(total).map_err(|_| Error::InvalidRequest(format!("{total} positions")))?;
        let layers = self.arch.num_hidden_layers;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let mut binding =
            self.bind(&session, ids, total_i32, keep, cache).map_err(Error::ort("binding the decoder's inputs"))?;
        if queries {
            let cpu = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)
                .map_err(Error::ort("binding the decoder's queries"))?;
            for i in 0..layers {
                binding.bind_output_to_device(format!("attn_query.{i}"), &cpu).map_err(Error::ort(
                    "binding the decoder's queries (re-export the model for context compression)",
                ))?;
            }
        }
        let outputs = match run_options {
            Some(ro) => session.run_binding_with_options(&binding, ro),
            None => session.run_binding(&binding),
        }
        .map_err(Error::ort("running the decoder"))?;
        let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let value = outputs
                .get(name)
                .ok_or_else(|| Error::Ort { context: "reading outputs".into(), msg: format!("no '{name}' output") })?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(Error::ort("reading outputs"))?;
            Ok((shape.iter().map(|&x| x as usize).collect(), data.to_vec()))
        };
        let (_, logits) = read("logits")?;
        if logits.len() != keep * self.arch.vocab_size {
            return Err(Error::Ort {
                context: "reading logits".into(),
                msg: format!("got {} values, expected {keep} x {}", logits.len(), self.arch.vocab_size),
            });
        }
        let mut out_queries = None;
        if queries {
            let (mut all, mut stride) = (Vec::with_capacity(layers), 0);
            for i in 0..layers {
                let (shape, q) = read(&format!("attn_query.{i}"))?;
                stride = shape.last().copied().unwrap_or(0);
                if stride < self.arch.num_attention_heads * self.arch.head_dim || q.len() != ids.len() * stride {
                    return Err(Error::Ort { context: "reading queries".into(), msg: format!("shape {shape:?}") });
                }
                all.push(q);
            }
            out_queries = Some((all, stride));
        }
        cache.len = total;
        Ok((logits, out_queries))
    }
}

/// Every layer's queries of a forward pass ([positions, stride] rows) and the row stride.
type LayerQueries = (Vec<Vec<f32>>, usize);

/// The step's inputs and outputs: each cache buffer is bound as its layer's past *and* present, so
/// `GroupQueryAttention` writes the new positions in place; logits go to a fresh CPU tensor.
impl Decoder {
    fn bind(
        &self,
        session: &Session,
        ids: &[u32],
        total: i32,
        keep: usize,
        cache: &mut KvCache,
    ) -> ort::Result<ort::session::IoBinding> {
        let mut binding = session.create_binding()?;
        let ids = Tensor::from_array(([1usize, ids.len()], ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>()))?;
        binding.bind_input("input_ids", &ids)?;
        binding.bind_input("seqlens_k", &Tensor::from_array(([1usize], vec![total - 1]))?)?;
        binding.bind_input("total_sequence_length", &Tensor::from_array((Vec::<usize>::new(), vec![total]))?)?;
        binding.bind_input("num_logits_to_keep", &Tensor::from_array(([1usize], vec![keep as i64]))?)?;
        for (name, value) in &self.factors {
            binding.bind_input(name.as_str(), &**value)?;
        }
        for ((past, present), value) in self.past_names.iter().zip(&self.present_names).zip(cache.values.iter_mut()) {
            binding.bind_input(past.as_str(), &*value)?;
            binding.bind_output(present.as_str(), &mut *value)?;
        }
        let cpu = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?;
        binding.bind_output_to_device("logits", &cpu)?;
        Ok(binding)
    }
}

/// Copies positions `0..len` of every head from `from` into `to` (buffers of different capacities).
fn copy_positions(from: &DynValue, to: &mut Tensor<f32>, len: usize, heads: usize, d: usize) -> Result<()> {
    let (shape, src) = from.try_extract_tensor::<f32>().map_err(Error::ort("reading the KV cache"))?;
    let old_cap = shape.get(2).copied().unwrap_or(0) as usize;
    let (shape, dst) = to.try_extract_tensor_mut::<f32>().map_err(Error::ort("growing the KV cache"))?;
    let new_cap = shape.get(2).copied().unwrap_or(0) as usize;
    for h in 0..heads {
        let n = len * d;
        dst[h * new_cap * d..][..n].copy_from_slice(&src[h * old_cap * d..][..n]);
    }
    Ok(())
}

fn check_io(session: &Session, onnx: &std::path::Path, past: &[String], present: &[String]) -> Result<()> {
    let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let need_in = ["input_ids", "seqlens_k", "total_sequence_length", "num_logits_to_keep"]
        .into_iter()
        .chain(past.iter().map(String::as_str));
    for name in need_in {
        if !inputs.contains(&name) {
            return Err(Error::model(
                onnx,
                format!(
                    "graph has no input '{name}' (exported by an older crayon-export? re-run scripts/setup or the exporter)"
                ),
            ));
        }
    }
    for name in std::iter::once("logits").chain(present.iter().map(String::as_str)) {
        if !outputs.contains(&name) {
            return Err(Error::model(
                onnx,
                format!("graph has no output '{name}' (was it exported by crayon-export?)"),
            ));
        }
    }
    Ok(())
}

/// The graph initializers `overrides` set. In a 4-bit folder, members of a fused projection (e.g. q, k
/// and v) are encoded and stacked into the fused tensors, the members no override names taken from the
/// weights file.
fn override_values(files: &ModelFiles, overrides: Vec<WeightOverride>) -> Result<Vec<(String, DynValue)>> {
    let mut out = Vec::new();
    let mut fused: Vec<(super::FusedGroup, std::collections::HashMap<String, Q4Matrix>)> = Vec::new();
    for o in overrides {
        match files.fused_group(&o.name) {
            Some(group) if files.manifest.precision == Precision::Q4 => {
                let name = o.name.clone();
                let m = q4_override(files, o)?;
                match fused.iter_mut().find(|(g, _)| *g == group) {
                    Some((_, ms)) => {
                        ms.insert(name, m);
                    }
                    None => fused.push((group, [(name, m)].into())),
                }
            }
            _ => out.extend(override_tensors(files, o)?),
        }
    }
    if fused.is_empty() {
        return Ok(out);
    }
    let file = crate::weights::WeightFile::open(&files.path(&files.manifest.weights))?;
    for (group, mut given) in fused {
        let mut parts = Vec::with_capacity(group.members.len());
        for member in &group.members {
            let m = match given.remove(member) {
                Some(m) => m,
                None => file.q4(member)?.ok_or_else(|| {
                    Error::model(file.path(), format!("4-bit weight '{member}' of {} is missing", group.name))
                })?,
            };
            parts.push(m);
        }
        let stacked = Q4Matrix::stack(&parts.iter().collect::<Vec<_>>());
        out.extend(q4_tensors(files.initializer_names(&group.name), stacked)?);
    }
    Ok(out)
}

/// The graph initializers an override sets, checked against the weight's shape: the matrix itself in a
/// float32 model; its blocks, scales and offsets in a 4-bit one (f32 data is encoded here).
fn override_tensors(files: &ModelFiles, o: WeightOverride) -> Result<Vec<(String, DynValue)>> {
    match files.manifest.precision {
        Precision::F32 => {
            let [out, inp] = target_shape(&files.arch, &o.name, files)?;
            let WeightData::F32(data) = o.data else {
                return Err(Error::InvalidRequest(format!(
                    "override for {} has 4-bit data for a float32 model",
                    o.name
                )));
            };
            if data.len() != out * inp {
                return Err(Error::InvalidRequest(format!(
                    "override for {} has {} values, expected [{out}, {inp}]",
                    o.name,
                    data.len()
                )));
            }
            let t = Tensor::from_array((vec![out, inp], data)).map_err(Error::ort("creating a weight tensor"))?;
            Ok(vec![(o.name, t.into_dyn())])
        }
        Precision::Q4 => {
            let names = files.initializer_names(&o.name);
            q4_tensors(names, q4_override(files, o)?)
        }
    }
}

/// A 4-bit override as a 4-bit matrix of the weight's shape (f32 data is encoded here).
fn q4_override(files: &ModelFiles, o: WeightOverride) -> Result<Q4Matrix> {
    let [out, inp] = target_shape(&files.arch, &o.name, files)?;
    let block = files.block_size()?;
    let wrong =
        |what: String| Error::InvalidRequest(format!("override for {} has {what}, expected [{out}, {inp}]", o.name));
    match o.data {
        WeightData::F32(v) if v.len() == out * inp && inp % block == 0 => Ok(quant::encode_q4(&v, out, inp, block)),
        WeightData::F32(v) => Err(wrong(format!("{} values", v.len()))),
        WeightData::Q4(m) if (m.rows, m.cols, m.block) == (out, inp, block) => Ok(m),
        WeightData::Q4(m) => Err(wrong(format!("4-bit [{}, {}] in blocks of {}", m.rows, m.cols, m.block))),
    }
}

/// The `.q4`, `.scales` and `.offsets` tensors of `m` under `names` (in that order).
fn q4_tensors(names: Vec<String>, m: Q4Matrix) -> Result<Vec<(String, DynValue)>> {
    let [qs, ss, os] = Q4Matrix::shapes(m.rows, m.cols, m.block);
    let values = (|| -> ort::Result<[DynValue; 3]> {
        Ok([
            Tensor::from_array((qs, m.packed))?.into_dyn(),
            Tensor::from_array((ss, m.scales))?.into_dyn(),
            Tensor::from_array((os, m.offsets))?.into_dyn(),
        ])
    })()
    .map_err(Error::ort("creating a weight tensor"))?;
    if names.len() != values.len() {
        return Err(Error::InvalidRequest("a 4-bit weight has three tensors".into()));
    }
    Ok(names.into_iter().zip(values).collect())
}

/// The `<module>.lora_a` [rank, in], `<module>.lora_b` [out, rank] and `<module>.lora_scale` [rank]
/// (ones: `lr` has its weights folded into `b`) inputs for `lr`, sizes checked.
fn factor_values(files: &ModelFiles, lr: LowRank) -> Result<Vec<(String, DynValue)>> {
    let [out, inp] = target_shape(&files.arch, &format!("{}.weight", lr.module), files)?;
    if lr.a.len() != inp * lr.rank || lr.b.len() != lr.rank * out {
        return Err(Error::InvalidRequest(format!(
            "factors for {}: {} and {} values, expected [{r}, {inp}] and [{out}, {r}]",
            lr.module,
            lr.a.len(),
            lr.b.len(),
            r = lr.rank
        )));
    }
    let value = |shape: Vec<usize>, data: Vec<f32>| {
        Tensor::from_array((shape, data)).map(|t| t.into_dyn()).map_err(Error::ort("creating a factor tensor"))
    };
    Ok(vec![
        (format!("{}.lora_a", lr.module), value(vec![lr.rank, inp], lr.a)?),
        (format!("{}.lora_b", lr.module), value(vec![out, lr.rank], lr.b)?),
        (format!("{}.lora_scale", lr.module), value(vec![lr.rank], vec![1.0; lr.rank])?),
    ])
}

/// Shape [out, in] of an adapter-targetable weight, or an error naming the valid targets.
fn target_shape(a: &Architecture, name: &str, files: &ModelFiles) -> Result<[usize; 2]> {
    let unknown = || {
        Error::InvalidRequest(format!(
            "'{name}' is not an adapter target of this model (targets look like model.layers.N.{{{}}}.weight, N < {})",
            files.manifest.adapter_targets.join(","),
            a.num_hidden_layers
        ))
    };
    let rest = name.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let target = rest.strip_suffix(".weight").ok_or_else(unknown)?;
    if layer >= a.num_hidden_layers || !files.manifest.adapter_targets.iter().any(|t| t == target) {
        return Err(unknown());
    }
    super::target_shape(a, target).ok_or_else(unknown)
}
