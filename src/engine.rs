//! The engine: one model in memory, its tokenizer and chat template, the adapter pool, the
//! customized adapters, and a bounded cache of ready (merged) models to switch between per request.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::adapters::{self, AdapterStore, Customization, Example};
use crate::chat::{ChatTemplate, Message};
use crate::choices::{self, Calibration, ChoiceJob};
use crate::config::Config;
use crate::context::{self, ContextPolicy};
use crate::error::{Error, Result};
use crate::generate::{self, CancelToken, Generation, GenerationParams, Prompt};
use crate::model::{Decoder, LowRank, ModelFiles, Precision, SharedWeights, WeightOverride};
use crate::pool::Pool;
use crate::pool::blend;
use crate::pool::embed::TaskEmbedder;
use crate::pool::exemplars::{self, ExemplarBank};
use crate::pool::merge;
use crate::runtime::{Provider, Runtime};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightFile;

/// The token embedding table's name in exported models (a lookup table, never packed).
const EMBEDDING_WEIGHT: &str = "model.embed_tokens.weight";

/// Upper bound on examples per customization: embedding is cheap, but requests must stay bounded.
pub const MAX_EXAMPLES: usize = 256;
/// `example_loss` blending measures the loss on at most this many examples (each adapter costs a model
/// pass over them)...
pub const LOSS_EXAMPLES: usize = 16;
/// ...with inputs cut to their last this many tokens...
pub const LOSS_PROMPT_TOKENS: usize = 256;
/// ...and outputs to their first this many (the pool's adapters were trained on 96 and 32).
pub const LOSS_ANSWER_TOKENS: usize = 64;
pub use crate::choices::MAX_CHOICES;

/// The pool and what blending needs next to it.
struct Customizer {
    pool: Pool,
    embedder: TaskEmbedder,
    base_weights: Arc<WeightFile>,
}

/// A merged model kept ready.
struct Ready {
    name: String,
    decoder: Decoder,
    bytes: usize,
    last_used: u64,
}

/// Timings of one customization, for callers and the benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct CustomizeReport {
    pub customization: Customization,
    pub embed_ms: f64,
    pub merge_ms: f64,
    pub session_ms: f64,
    pub total_ms: f64,
}

pub struct Engine {
    files: ModelFiles,
    runtime: Arc<Runtime>,
    base: Decoder,
    /// A 4-bit model's unmerged-path session (rank-0 factors), from which every blend's decoder is made.
    unmerged: Option<Decoder>,
    /// The pool's factors for the unmerged path, built once: a blend of them is only per-rank scales.
    pool_factors: Option<merge::PoolFactors>,
    /// The model's weights shared by the base session and every blend's (`runtime.share_weights`).
    shared: Option<Arc<SharedWeights>>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    stop_ids: Vec<u32>,
    config: Config,
    customizer: Option<Customizer>,
    /// Exemplars standing in for a device pool this server cannot merge (`[pool] exemplars`).
    exemplars: Option<ExemplarBank>,
    store: Option<AdapterStore>,
    ready: Vec<Ready>,
    clock: u64,
    /// Where customization builds and evictions are counted (the service's `/metrics`).
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl Engine {
    pub fn load(config: &Config) -> Result<Engine> {
        Engine::load_with_overrides(config, Vec::new())
    }

    /// Loads the model with some adapter-targetable weights of the *base* replaced.
    pub fn load_with_overrides(config: &Config, overrides: Vec<WeightOverride>) -> Result<Engine> {
        config.validate().map_err(|msg| Error::Config { path: "(in memory)".into(), msg })?;
        let files = ModelFiles::open(&config.model.dir)?;
        let tokenizer = Tokenizer::load(&files.path(&files.manifest.tokenizer))?;
        if tokenizer.vocab_size() > files.arch.vocab_size {
            return Err(Error::model(
                files.path(&files.manifest.tokenizer),
                format!("tokenizer has {} tokens but the model only {}", tokenizer.vocab_size(), files.arch.vocab_size),
            ));
        }
        let template = ChatTemplate::load(&files.path(&files.manifest.tokenizer_config))?;
        let weights = Arc::new(WeightFile::open(&files.path(&files.manifest.weights))?);
        let customizer = if config.pool.dir.as_os_str().is_empty() {
            None
        } else {
            Some(Customizer {
                pool: Pool::open(&config.pool.dir, &files)?,
                embedder: TaskEmbedder::new(&files, Arc::clone(&weights))?,
                base_weights: Arc::clone(&weights),
            })
        };
        let exemplars = match config.pool.exemplars.as_os_str().is_empty() {
            true => None,
            false => Some(ExemplarBank::load(&config.pool.exemplars)?),
        };
        let store = match &customizer {
            Some(_) => Some(AdapterStore::open(&config.adapters.state_dir)?),
            None => None,
        };
        let runtime = Runtime::get(&config.runtime)?;
        let shared = match config.runtime.share_weights {
            true => {
                let blended = customizer
                    .as_ref()
                    .map(|c| c.pool.blended_weights(&files).iter().flat_map(|w| files.initializer_names(w)).collect())
                    .unwrap_or_default();
                let fused = files.fused_groups();
                let suffixes: &[&str] = match files.manifest.precision {
                    Precision::Q4 => &crate::model::quant::Q4_SUFFIXES,
                    Precision::F32 => &[""],
                };
                Some(Arc::new(SharedWeights::new(Arc::clone(&weights), &blended, EMBEDDING_WEIGHT, &fused, suffixes)?))
            }
            false => None,
        };
        let base = Decoder::load(&files, &runtime, &config.runtime, shared.as_ref(), overrides)?;
        // Blends on 4-bit weights stay unmerged: re-quantizing a merged delta rounds it away (docs/engine.md).
        let unmerged = match (&customizer, files.manifest.precision, &files.manifest.lora_onnx) {
            (Some(_), Precision::Q4, Some(_)) => {
                Some(Decoder::load_unmerged(&files, &runtime, &config.runtime, shared.as_ref())?)
            }
            (Some(_), Precision::Q4, None) => {
                tracing::warn!(model = %files.dir.display(), "4-bit folder without lora_onnx: blends are merged and re-quantized, which loses most of their effect; re-export it");
                None
            }
            _ => None,
        };
        let pool_factors = match (&customizer, &unmerged) {
            (Some(c), Some(_)) => {
                let f = merge::PoolFactors::new(&c.pool, &files, merge_threads(&config.adapters))?;
                tracing::info!(factors_mb = f.shared.bytes() >> 20, "pool factors shared by every blend");
                c.pool.release_resident_pages();
                Some(f)
            }
            _ => None,
        };
        weights.release_resident_pages();
        // Building the factors and sessions freed more than it kept (per-adapter copies, graph
        // optimisation): give it back rather than carry it as resident heap.
        crate::runtime::release_freed_memory();
        if let (Some(c), Some(s)) = (&customizer, &store) {
            tracing::info!(pool = %c.pool.id, adapters = c.pool.adapters.len(), saved = s.list().count(), "adapter pool ready");
        }
        Ok(Engine {
            stop_ids: files.manifest.stop_token_ids.clone(),
            files,
            runtime,
            base,
            unmerged,
            pool_factors,
            shared,
            tokenizer,
            template,
            config: config.clone(),
            customizer,
            exemplars,
            store,
            ready: Vec::new(),
            clock: 0,
            metrics: None,
        })
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The base model's decoder (for tests and benchmarks).
    pub fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.base
    }

    /// The decoder serving `adapter` (made ready if needed), or the base for `None`.
    pub fn decoder_for(&mut self, adapter: Option<&str>) -> Result<&mut Decoder> {
        self.ensure_ready(adapter)?;
        select(&mut self.base, &mut self.ready, adapter)
    }

    pub fn provider(&self) -> Provider {
        self.base.provider()
    }

    pub fn pool(&self) -> Option<&Pool> {
        self.customizer.as_ref().map(|c| &c.pool)
    }

    /// Request parameters from the config's `[generation]` defaults.
    pub fn default_params(&self) -> GenerationParams {
        GenerationParams::from_config(&self.config.generation)
    }

    /// Token ids of the prompt, with the chat template applied for chat prompts.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = match prompt {
            Prompt::Tokens(ids) => return Ok(ids.clone()),
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(messages) => {
                let system = &self.config.generation.system_prompt;
                if !system.is_empty() && messages.first().is_some_and(|m| m.role != "system") {
                    let mut with_system = vec![Message::new("system", system.clone())];
                    with_system.extend(messages.iter().cloned());
                    self.template.render(&with_system)?
                } else {
                    self.template.render(messages)?
                }
            }
        };
        self.tokenizer.encode(&text)
    }

    /// Generates a continuation, with the base model or `params.adapter`. `on_text` receives the
    /// answer as it forms (already cut at stop strings); `ControlFlow::Break` stops generation.
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        params: &GenerationParams,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        params.validate()?;
        let ids = self.prompt_ids(prompt)?;
        if ids.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        let choice_ids = self.choice_ids(prompt, &params.choices)?;
        let longest = choice_ids.iter().map(Vec::len).max().unwrap_or(0);
        let Fitted { ids, pot, catalyst, truncated, limit } = self.fit_context(ids, params, longest)?;
        let max_new = params.max_new_tokens.min(limit - ids.len());
        let adapter = params.adapter.as_deref();
        let rope = context::Rope::new(self.files.arch.rope_theta, self.files.arch.head_dim);
        let context = generate::ContextJob { pot, catalyst: &catalyst, rope, truncated };
        let scoring = &self.config.choices;
        let overrides = &params.choice_scoring;
        let calibrated = overrides.calibration.unwrap_or(scoring.calibration) == Calibration::ContentFree;
        let content_free = match !choice_ids.is_empty() && scoring.needs_content_free(Some(overrides)) {
            true => Some(self.content_free_ids(prompt)?),
            false => None,
        };
        self.ensure_ready(adapter)?;
        let Engine { base, ready, tokenizer, stop_ids, config, .. } = self;
        let choices = (!choice_ids.is_empty()).then(|| ChoiceJob {
            texts: &params.choices,
            options: &choice_ids,
            content_free: content_free.as_deref(),
            normalization: params.choice_scoring.normalization.unwrap_or(config.choices.normalization),
            calibrated,
            confidence: params.choice_scoring.confidence.unwrap_or(config.choices.confidence),
        });
        let decoder = select(base, ready, adapter)?;
        let job = generate::Job { tokenizer, stop_ids, ids: &ids, max_new, params, choices, context };
        generate::run(decoder, &job, cancel, on_text)
    }

    /// The request's `[context]` settings applied to its prompt (`longest`: its longest choice option):
    /// the prompt as it will be read (its middle cut under `truncate`), checked against the context or
    /// the pot.
    fn fit_context(&self, mut ids: Vec<u32>, params: &GenerationParams, longest: usize) -> Result<Fitted> {
        let cfg = &self.config.context;
        // The catalyst's length only matters (and is only tokenized) under infinipot.
        let catalyst = match params.context.policy.unwrap_or(cfg.policy) {
            ContextPolicy::Infinipot => self.tokenizer.encode(&cfg.catalyst)?,
            _ => Vec::new(),
        };
        let pot = cfg.resolve(&params.context, self.context_limit(), catalyst.len()).map_err(Error::InvalidRequest)?;
        let mut truncated = 0;
        if pot.policy == ContextPolicy::Truncate {
            // Room for the answer (at most a quarter of the pot) or the longest option.
            let room = params.max_new_tokens.min(pot.pot / 4).max(longest).max(1);
            let budget = pot.pot.saturating_sub(room).max(1);
            truncated = ids.len().saturating_sub(budget);
            ids = context::truncate_middle(&ids, budget);
        }
        if pot.policy.compresses() {
            if ids.len() > pot.max_input {
                return Err(Error::InvalidRequest(format!(
                    "the prompt is {} tokens; context.max_input_tokens is {}",
                    ids.len(),
                    pot.max_input
                )));
            }
            if 2 * longest > pot.pot - pot.keep {
                return Err(Error::InvalidRequest(format!(
                    "a choice of {longest} tokens leaves too little of the context pot ({} entries, {} kept) to read in",
                    pot.pot, pot.keep
                )));
            }
            return Ok(Fitted { ids, pot, catalyst, truncated, limit: usize::MAX });
        }
        let limit = pot.pot;
        if ids.len() >= limit {
            return Err(Error::InvalidRequest(format!(
                "the prompt is {} tokens; the context limit is {limit} (a [context] policy other than \"refuse\" \
                 accepts longer inputs)",
                ids.len()
            )));
        }
        if ids.len() + longest > limit {
            return Err(Error::InvalidRequest(format!(
                "the prompt ({} tokens) and a choice of {longest} tokens exceed the context limit of {limit}",
                ids.len()
            )));
        }
        Ok(Fitted { ids, pot, catalyst, truncated, limit })
    }

    /// Token ids of each option as it continues `prompt` (see [`choices::continuation`]).
    fn choice_ids(&self, prompt: &Prompt, options: &[String]) -> Result<Vec<Vec<u32>>> {
        choices::validate(options)?;
        let raw_text = match prompt {
            Prompt::Text(t) => Some(t.as_str()),
            Prompt::Chat(_) | Prompt::Tokens(_) => None,
        };
        let mut out = Vec::with_capacity(options.len());
        for (i, o) in options.iter().enumerate() {
            let ids = self.tokenizer.encode(&choices::continuation(raw_text, o))?;
            if ids.is_empty() {
                return Err(Error::InvalidRequest(format!("choice {} has no tokens", i + 1)));
            }
            out.push(ids);
        }
        Ok(out)
    }

    /// The content-free prompt of option calibration, in the request's form (chat or text).
    fn content_free_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = self.config.choices.content_free.clone();
        let cf = match prompt {
            Prompt::Chat(_) => Prompt::Chat(vec![Message::new("user", text)]),
            Prompt::Text(_) | Prompt::Tokens(_) => Prompt::Text(text),
        };
        self.prompt_ids(&cf)
    }

    /// Counts customization builds, evictions and the ready set into `metrics` from now on.
    pub fn set_metrics(&mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) {
        metrics.set_cached(self.ready.len());
        self.metrics = Some(metrics);
    }

    /// Longest sequence (prompt + generated tokens) a request may use: `[model] max_context`, or the
    /// model's own context when it is 0, never more than the model's.
    pub fn context_limit(&self) -> usize {
        let model = self.files.arch.max_position_embeddings;
        match self.config.model.max_context {
            0 => model,
            n => n.min(model),
        }
    }

    /// Logits at every position of `ids` (no cache), with the base model or an adapter.
    pub fn logits(&mut self, adapter: Option<&str>, ids: &[u32]) -> Result<Vec<f32>> {
        let decoder = self.decoder_for(adapter)?;
        let mut cache = decoder.new_cache()?;
        decoder.forward(ids, &mut cache, ids.len(), None)
    }

    /// Turns examples of a task into a customized adapter: embed the inputs, weigh the pool's
    /// adapters by similarity, merge the blend into the weights, make it ready, persist it.
    pub fn customize(&mut self, name: &str, examples: &[Example]) -> Result<CustomizeReport> {
        self.customize_as(name, examples, None)
    }

    /// [`Engine::customize`], recording `owner` (the client identity that asked; docs/service.md).
    pub fn customize_as(&mut self, name: &str, examples: &[Example], owner: Option<String>) -> Result<CustomizeReport> {
        adapters::validate_name(name)?;
        if examples.is_empty() || examples.len() > MAX_EXAMPLES {
            return Err(Error::InvalidRequest(format!("give 1 to {MAX_EXAMPLES} examples, got {}", examples.len())));
        }
        if let Some(i) = examples.iter().position(|e| e.input.trim().is_empty()) {
            return Err(Error::InvalidRequest(format!("example {} has an empty input", i + 1)));
        }
        let t0 = Instant::now();
        let c = self.customizer()?;
        let spec = c.pool.embedding.as_ref().ok_or_else(|| Error::Pool {
            path: c.pool.dir.clone(),
            msg: format!(
                "is a server pool paired with '{}' and has no task embedding: it is customized by blend weights only",
                c.pool.paired_with.as_deref().unwrap_or("?")
            ),
        })?;
        let mut embs = Vec::with_capacity(examples.len());
        for e in examples {
            let ids = self.tokenizer.encode(&e.input)?;
            embs.push(c.embedder.embed(&ids, spec)?);
        }
        let centroids: Vec<&[f32]> = c.pool.adapters.iter().map(|a| a.centroid.as_slice()).collect();
        let sims = blend::similarities(&embs, &centroids, self.config.blend.similarity)?;
        let (weights, example_losses) = match self.config.blend.method {
            blend::BlendMethod::Similarity => (blend::weights(&sims, &self.config.blend), None),
            blend::BlendMethod::ExampleLoss => {
                let losses = self.adapter_losses(examples)?;
                (blend::weights_from_losses(&losses, &self.config.blend), Some(losses))
            }
        };
        let embed_ms = ms(t0.elapsed());
        let customization = Customization {
            name: name.to_string(),
            pool_id: c.pool.id.clone(),
            adapters: c.pool.names().iter().map(|s| s.to_string()).collect(),
            weights,
            similarities: sims,
            example_losses,
            example_digest: adapters::digest(examples),
            example_count: examples.len(),
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            examples: self.config.adapters.store_examples.then(|| examples.to_vec()),
            example_embeddings: embs,
            calibrated: None,
            owner,
        };
        let (merge_ms, session_ms) = self.commit_customization(&customization)?;
        Ok(CustomizeReport { customization, embed_ms, merge_ms, session_ms, total_ms: ms(t0.elapsed()) })
    }

    /// Mean answer loss (nats per token) of the examples' outputs after their inputs under each pool
    /// adapter alone, in pool order (`[blend] method = "example_loss"`). Each adapter is merged into a
    /// model of its own, used and dropped (never cached, so no customization is evicted); the first
    /// [`LOSS_EXAMPLES`] examples are used, inputs cut to their last [`LOSS_PROMPT_TOKENS`] tokens and
    /// outputs to their first [`LOSS_ANSWER_TOKENS`], as the pool was trained.
    pub fn adapter_losses(&self, examples: &[Example]) -> Result<Vec<f32>> {
        let pairs = self.loss_pairs(examples)?;
        let n = self.customizer()?.pool.adapters.len();
        let mut losses = Vec::with_capacity(n);
        for i in 0..n {
            let one_hot: Vec<f32> = (0..n).map(|j| if j == i { 1.0 } else { 0.0 }).collect();
            let mut merged = self.blend_decoder(&one_hot, merge::Composition::Deltas)?;
            let loss = answer_loss(&mut merged.decoder, &pairs, self.files.arch.vocab_size)?;
            if !loss.is_finite() {
                let c = self.customizer()?;
                return Err(Error::Pool {
                    path: c.pool.dir.clone(),
                    msg: format!(
                        "adapter {}: the examples' loss under it is {loss} (broken tensors?)",
                        c.pool.names()[i]
                    ),
                });
            }
            losses.push(loss);
        }
        Ok(losses)
    }

    /// Mean answer loss of the examples under the base model or a ready adapter (the quantity
    /// `example_loss` blending and LoraHub's search minimize).
    pub fn examples_loss(&mut self, adapter: Option<&str>, examples: &[Example]) -> Result<f32> {
        let pairs = self.loss_pairs(examples)?;
        let vocab = self.files.arch.vocab_size;
        answer_loss(self.decoder_for(adapter)?, &pairs, vocab)
    }

    /// (input tokens, output tokens) of the examples the loss is measured on.
    fn loss_pairs(&self, examples: &[Example]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let mut pairs = Vec::new();
        for e in examples.iter().take(LOSS_EXAMPLES) {
            let input = self.tokenizer.encode(&e.input)?;
            let output = self.tokenizer.encode(&e.output)?;
            if input.is_empty() || output.is_empty() {
                continue;
            }
            let input = input[input.len().saturating_sub(LOSS_PROMPT_TOKENS)..].to_vec();
            pairs.push((input, output[..output.len().min(LOSS_ANSWER_TOKENS)].to_vec()));
        }
        if pairs.is_empty() {
            return Err(Error::InvalidRequest(
                "blend method example_loss needs examples with a non-empty input and output".into(),
            ));
        }
        Ok(pairs)
    }

    /// A decoder with `weights` merged, outside the ready set (nothing is evicted or persisted), with
    /// what it adds to the process in bytes and the merge and session-build times in ms.
    fn blend_decoder(&self, weights: &[f32], composition: merge::Composition) -> Result<MergedDecoder> {
        let cz = self.customizer()?;
        let threads = merge_threads(&self.config.adapters);
        let t0 = Instant::now();
        if let (Some(unmerged), Some(pf), merge::Composition::Deltas) =
            (&self.unmerged, &self.pool_factors, composition)
        {
            let scales = pf.scales(&cz.pool, weights)?;
            let bytes = scales.iter().map(|(_, v)| 4 * v.len()).sum();
            let decoder = unmerged.with_scales(&pf.shared, scales)?;
            return Ok(MergedDecoder { decoder, bytes, merge_ms: ms(t0.elapsed()), session_ms: 0.0 });
        }
        if let Some(unmerged) = &self.unmerged {
            let factors = merge::low_rank(&cz.pool, &self.files, weights, composition, threads)?;
            let bytes = factors.iter().map(LowRank::bytes).sum();
            let decoder = unmerged.with_factors(&self.files, factors)?;
            return Ok(MergedDecoder { decoder, bytes, merge_ms: ms(t0.elapsed()), session_ms: 0.0 });
        }
        let overrides = merge::merge(&cz.pool, &self.files, &cz.base_weights, weights, composition, threads)?;
        let merge_ms = ms(t0.elapsed());
        let bytes = ready_bytes(overrides.iter().map(WeightOverride::bytes).sum(), self.shared.as_ref(), &self.files);
        let t1 = Instant::now();
        let decoder = Decoder::load(&self.files, &self.runtime, &self.config.runtime, self.shared.as_ref(), overrides)?;
        cz.base_weights.release_resident_pages();
        Ok(MergedDecoder { decoder, bytes, merge_ms, session_ms: ms(t1.elapsed()) })
    }

    /// Makes a customized adapter from given blend weights (one per pool adapter, in pool order;
    /// non-negative, normalized to sum 1). This is what a server does with the weights a device
    /// sends: the examples never leave the device.
    pub fn customize_weights(&mut self, name: &str, weights: &[f32]) -> Result<CustomizeReport> {
        adapters::validate_name(name)?;
        let t0 = Instant::now();
        let customization = self.weights_customization(name, weights)?;
        let (merge_ms, session_ms) = self.commit_customization(&customization)?;
        Ok(CustomizeReport { customization, embed_ms: 0.0, merge_ms, session_ms, total_ms: ms(t0.elapsed()) })
    }

    /// Makes a blend sent by a device ready *without persisting it* (a server answering devices) and
    /// returns the name to generate with. `pool_id` is the device's pool: this pool or the one it is
    /// paired with. The same weights (to 1e-4) reuse the model kept ready.
    pub fn prepare_blend(&mut self, pool_id: &str, weights: &[f32]) -> Result<String> {
        let c = self.customizer()?;
        if !c.pool.accepts(pool_id) {
            return Err(Error::InvalidRequest(format!(
                "blend for pool '{pool_id}', but this server's pool is '{}'{}",
                c.pool.id,
                c.pool.paired_with.as_deref().map(|p| format!(" (paired with '{p}')")).unwrap_or_default()
            )));
        }
        // Validate and normalize first: the cache key must identify the blend actually merged.
        let mut customization = self.weights_customization("", weights)?;
        let key: Vec<i64> = customization.weights.iter().map(|w| (f64::from(*w) * 1e6).round() as i64).collect();
        let name =
            format!("{}{}", adapters::BLEND_PREFIX, &adapters::digest_str(&format!("{}{key:?}", c.pool.id))[..16]);
        if !self.ready.iter().any(|r| r.name == name) {
            customization.name = name.clone();
            self.make_ready(&customization, merge::Composition::Deltas)?;
        }
        Ok(name)
    }

    /// A device's blend for the pool of this server's exemplar bank, as exemplars in front of `prompt`
    /// (`src/pool/exemplars.rs`): the prompt to answer with the plain model and a label naming what was
    /// used. `None` without a bank for `pool_id`. Exemplars that would push the prompt past the context
    /// (with room to answer) are dropped, the lightest clusters' first.
    pub fn exemplar_prompt(&self, pool_id: &str, weights: &[f32], prompt: &Prompt) -> Option<Result<(Prompt, String)>> {
        let bank = self.exemplars.as_ref().filter(|b| b.pool_id == pool_id)?;
        let picked = match bank.pick(weights, exemplars::EXEMPLARS_PER_QUESTION) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let room = self.context_limit().saturating_sub(self.config.generation.max_new_tokens.max(64));
        for n in (0..=picked.len()).rev() {
            let candidate = exemplars::with_exemplars(prompt, &picked[..n]);
            match self.prompt_ids(&candidate) {
                Ok(ids) if ids.len() <= room || n == 0 => {
                    return Some(Ok((candidate, format!("exemplars:{n}"))));
                }
                Ok(_) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }

    /// Makes any finite weight vector ready as `name`, composed as `composition`, *unnormalised and not
    /// persisted*: for experiments and the benchmark's peers (LoraHub searches signed weights in
    /// [-1.5, 1.5] and composes factors). Returns the merge and session times in ms. The service never
    /// calls this: its blends are distributions over the pool (`customize_weights`).
    pub fn ready_experimental_blend(
        &mut self,
        name: &str,
        weights: &[f32],
        composition: merge::Composition,
    ) -> Result<(f64, f64)> {
        adapters::validate_name(name)?;
        let c = self.customizer()?;
        if weights.len() != c.pool.adapters.len() || weights.iter().any(|w| !w.is_finite()) {
            return Err(Error::InvalidRequest(format!(
                "{} finite blend weights needed, got {:?}",
                c.pool.adapters.len(),
                weights
            )));
        }
        let mut customization = self.weights_customization(name, &vec![1.0; weights.len()])?;
        customization.weights = weights.to_vec();
        self.make_ready(&customization, composition)
    }

    fn weights_customization(&self, name: &str, weights: &[f32]) -> Result<Customization> {
        let c = self.customizer()?;
        if weights.len() != c.pool.adapters.len() {
            return Err(Error::InvalidRequest(format!(
                "{} blend weights given; pool '{}' has {} adapters",
                weights.len(),
                c.pool.id,
                c.pool.adapters.len()
            )));
        }
        let total: f32 = weights.iter().sum();
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || total <= 0.0 || !total.is_finite() {
            return Err(Error::InvalidRequest("blend weights must be finite, non-negative, and not all zero".into()));
        }
        Ok(Customization {
            name: name.to_string(),
            pool_id: c.pool.id.clone(),
            adapters: c.pool.names().iter().map(|s| s.to_string()).collect(),
            weights: weights.iter().map(|w| w / total).collect(),
            similarities: Vec::new(),
            example_losses: None,
            example_digest: String::new(),
            example_count: 0,
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            examples: None,
            example_embeddings: Vec::new(),
            calibrated: None,
            owner: None,
        })
    }

    /// One saved customization.
    pub fn adapter(&self, name: &str) -> Result<&Customization> {
        self.store.as_ref().and_then(|s| s.get(name)).ok_or_else(|| Error::Adapter {
            name: name.into(),
            msg: "no such adapter (see `crayonctl adapters`)".into(),
        })
    }

    /// Stores routing thresholds calibrated for an adapter.
    pub fn set_calibration(&mut self, name: &str, t: crate::config::Thresholds) -> Result<()> {
        let mut c = self.adapter(name)?.clone();
        c.calibrated = Some(t);
        self.store_mut()?.save(c)
    }

    /// The task embedding of a text (as customization embeds example inputs); `None` without a pool
    /// embedding.
    pub fn task_embedding(&self, text: &str) -> Result<Option<Vec<f32>>> {
        let Some(c) = &self.customizer else { return Ok(None) };
        let Some(spec) = &c.pool.embedding else { return Ok(None) };
        let ids = self.tokenizer.encode(text)?;
        if ids.is_empty() {
            return Ok(None);
        }
        c.embedder.embed(&ids, spec).map(Some)
    }

    /// Saved customizations, by name.
    pub fn adapters(&self) -> Vec<&Customization> {
        self.store.as_ref().map(|s| s.list().collect()).unwrap_or_default()
    }

    pub fn remove_adapter(&mut self, name: &str) -> Result<Customization> {
        let c = self.store_mut()?.remove(name)?;
        self.drop_ready(name);
        Ok(c)
    }

    /// Names of the customized models currently kept ready, most recently used first.
    pub fn ready_adapters(&self) -> Vec<&str> {
        let mut r: Vec<&Ready> = self.ready.iter().collect();
        r.sort_by_key(|r| std::cmp::Reverse(r.last_used));
        r.into_iter().map(|r| r.name.as_str()).collect()
    }

    fn customizer(&self) -> Result<&Customizer> {
        self.customizer.as_ref().ok_or_else(|| Error::Config {
            path: "[pool] dir".into(),
            msg: "no adapter pool is configured, so customization is off".into(),
        })
    }

    fn store_mut(&mut self) -> Result<&mut AdapterStore> {
        self.store.as_mut().ok_or_else(|| Error::Config {
            path: "[pool] dir".into(),
            msg: "no adapter pool is configured, so there are no adapters".into(),
        })
    }

    /// Makes sure a customized model is in the ready cache and marks it most recently used.
    fn ensure_ready(&mut self, adapter: Option<&str>) -> Result<()> {
        let Some(name) = adapter else { return Ok(()) };
        if !self.ready.iter().any(|r| r.name == name) {
            let c = self.store.as_ref().and_then(|s| s.get(name)).cloned().ok_or_else(|| Error::Adapter {
                name: name.into(),
                msg: "no such adapter (see `crayonctl adapters`)".into(),
            })?;
            self.make_ready(&c, merge::Composition::Deltas)?;
        }
        self.clock += 1;
        let clock = self.clock;
        if let Some(r) = self.ready.iter_mut().find(|r| r.name == name) {
            r.last_used = clock;
        }
        Ok(())
    }

    /// Merges a customization into the weights and builds its session; returns (merge, session) ms.
    fn make_ready(&mut self, c: &Customization, composition: merge::Composition) -> Result<(f64, f64)> {
        let built = self.build_ready(c, composition)?;
        Ok(self.insert_ready(&c.name, built))
    }

    /// A customization as one transaction: its model is built, then it is persisted, and only then
    /// does it replace the previous one in memory and in the listing. A failure at any step (a bad
    /// pool, a full disk) leaves the previous customization of that name serving, on disk and listed.
    fn commit_customization(&mut self, c: &Customization) -> Result<(f64, f64)> {
        let built = self.build_ready(c, merge::Composition::Deltas)?;
        self.store_mut()?.save(c.clone())?;
        Ok(self.insert_ready(&c.name, built))
    }

    /// Puts `previous` back as `name` (or removes `name` when there was none), on disk and in memory:
    /// how a caller undoes a customization whose follow-up step (calibration) failed.
    pub fn restore_adapter(&mut self, name: &str, previous: Option<Customization>) -> Result<()> {
        self.drop_ready(name);
        match previous {
            Some(c) => self.store_mut()?.save(c),
            None => self.store_mut()?.remove(name).map(|_| ()),
        }
    }

    /// The ready model of `c`, built but not yet in the cache.
    fn build_ready(&self, c: &Customization, composition: merge::Composition) -> Result<MergedDecoder> {
        let cz = self.customizer()?;
        if c.pool_id != cz.pool.id || c.adapters != cz.pool.names() {
            return Err(Error::Adapter {
                name: c.name.clone(),
                msg: format!(
                    "was made with pool '{}', but the loaded pool is '{}': customize it again",
                    c.pool_id, cz.pool.id
                ),
            });
        }
        self.blend_decoder(&c.weights, composition)
    }

    /// Caches a built model as `name` (replacing one of that name), evicting beyond the budget;
    /// returns its (merge, session) ms.
    fn insert_ready(&mut self, name: &str, built: MergedDecoder) -> (f64, f64) {
        let MergedDecoder { decoder, bytes, merge_ms, session_ms } = built;
        self.drop_ready(name);
        self.clock += 1;
        self.ready.push(Ready { name: name.to_string(), decoder, bytes, last_used: self.clock });
        self.evict();
        if let Some(m) = &self.metrics {
            m.customization_built((merge_ms + session_ms) / 1e3);
            m.set_cached(self.ready.len());
        }
        tracing::info!(adapter = %name, merge_ms, session_ms, "customized model ready");
        (merge_ms, session_ms)
    }

    /// Whether blends run unmerged on the shared 4-bit weights (else each is a merged model).
    pub fn blends_unmerged(&self) -> bool {
        self.unmerged.is_some()
    }

    /// Bytes the ready customization `name` is counted as in `adapters.cache_mb` (None when not ready).
    pub fn ready_bytes(&self, name: &str) -> Option<usize> {
        self.ready.iter().find(|r| r.name == name).map(|r| r.bytes)
    }

    /// Drops the ready model named `name`, if any, and gives its memory back to the system.
    fn drop_ready(&mut self, name: &str) {
        let before = self.ready.len();
        self.ready.retain(|r| r.name != name);
        if self.ready.len() != before {
            crate::runtime::release_freed_memory();
            if let Some(m) = &self.metrics {
                m.set_cached(self.ready.len());
            }
        }
    }

    /// Drops least recently used models beyond `adapters.cache_mb`, always keeping the newest.
    fn evict(&mut self) {
        let budget = self.config.adapters.cache_mb.saturating_mul(1 << 20);
        while self.ready.len() > 1 && self.ready.iter().map(|r| r.bytes).sum::<usize>() > budget {
            let Some(oldest) = self.ready.iter().enumerate().min_by_key(|(_, r)| r.last_used).map(|(i, _)| i) else {
                break;
            };
            let gone = self.ready.remove(oldest);
            tracing::info!(adapter = %gone.name, "customized model dropped from memory (LRU)");
            drop(gone);
            if let Some(m) = &self.metrics {
                m.customization_evicted();
                m.set_cached(self.ready.len());
            }
            crate::runtime::release_freed_memory();
        }
    }
}

/// What a ready blend adds to the process, for the cache budget. With shared weights: its merged
/// matrices, ONNX Runtime's packed copy of them, and with a tied LM head the session's own transposed
/// copy of the embedding table. Without: the session's own copy of the rest of the file instead.
/// Measured to match within a few percent (docs/benchmarks.md, "Memory").
fn ready_bytes(merged: usize, shared: Option<&Arc<SharedWeights>>, files: &ModelFiles) -> usize {
    match shared {
        Some(sh) => 2 * merged + sh.tied_head_bytes(),
        None => {
            let file = std::fs::metadata(files.path(&files.manifest.weights)).map_or(0, |m| m.len() as usize);
            merged + file.max(merged)
        }
    }
}

/// A prompt fitted to its request's `[context]` settings (see `Engine::fit_context`).
struct Fitted {
    ids: Vec<u32>,
    pot: context::Pot,
    /// The catalyst prompt's ids (`infinipot` only).
    catalyst: Vec<u32>,
    /// Prompt tokens cut (`truncate`).
    truncated: usize,
    /// Longest prompt + answer (unbounded when the policy compresses).
    limit: usize,
}

/// The base decoder, or the ready customized one named `adapter`.
fn select<'a>(base: &'a mut Decoder, ready: &'a mut [Ready], adapter: Option<&str>) -> Result<&'a mut Decoder> {
    match adapter {
        None => Ok(base),
        Some(name) => ready.iter_mut().find(|r| r.name == name).map(|r| &mut r.decoder).ok_or_else(|| Error::Adapter {
            name: name.into(),
            msg: "is not loaded (adapters.cache_mb too small?)".into(),
        }),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A decoder with a blend merged in, and what building it cost.
struct MergedDecoder {
    decoder: Decoder,
    bytes: usize,
    merge_ms: f64,
    session_ms: f64,
}

/// Mean negative log-likelihood per output token of `pairs` (input, output) under `decoder`.
fn answer_loss(decoder: &mut Decoder, pairs: &[(Vec<u32>, Vec<u32>)], vocab: usize) -> Result<f32> {
    let (mut total, mut count) = (0f64, 0usize);
    for (input, output) in pairs {
        let ids: Vec<u32> = input.iter().chain(output).copied().collect();
        let mut cache = decoder.new_cache()?;
        let logits = decoder.forward(&ids, &mut cache, ids.len(), None)?;
        for (j, &t) in output.iter().enumerate() {
            let row = &logits[(input.len() - 1 + j) * vocab..(input.len() + j) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
            total += f64::from(lse - row[t as usize]);
            count += 1;
        }
    }
    Ok((total / count.max(1) as f64) as f32)
}

/// Worker threads for merges and factor building (`adapters.merge_threads`, 0 = one per core).
fn merge_threads(cfg: &crate::config::AdaptersConfig) -> usize {
    match cfg.merge_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}
