//! Generation: request types, and the loop prefill -> decode with sampling, stop tokens, stop
//! strings, streaming and cancellation.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ort::session::RunOptions;
use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::choices::{self, ChoiceJob, OptionScore, ScoringOverrides};
use crate::config::GenerationConfig;
use crate::context::{self, ContextOverrides, ContextPolicy, ContextReport, Heads, Pot, Rope, Selection};
use crate::error::{Error, Result};
use crate::model::{Decoder, KvCache};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What to continue: a chat (rendered with the model's template), raw text, or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Customized adapter to answer with; `None`: the base model.
    pub adapter: Option<String>,
    /// For a choice question: the answer options, full texts ("Paris", "Lyon") or labels ("A", "B").
    /// The answer is then the option whose text the model finds most likely after the prompt
    /// ([`crate::choices`]); nothing is sampled.
    pub choices: Vec<String>,
    /// Per-request overrides of `[choices]` scoring.
    pub choice_scoring: ScoringOverrides,
    /// Report each generated token's log-probability with this many most likely alternatives
    /// (OpenAI `logprobs` / `top_logprobs`; at most [`MAX_TOP_LOGPROBS`]); `None`: not reported.
    pub logprobs: Option<usize>,
    /// Where each token's log-probability also goes as soon as it is sampled (streaming interfaces
    /// send them with the text).
    pub logprob_sink: Option<LogprobSink>,
    /// Per-request overrides of `[context]` (long inputs, [`crate::context`]).
    pub context: ContextOverrides,
}

/// Token log-probabilities as they are generated (see [`GenerationParams::logprob_sink`]).
pub type LogprobSink = std::sync::Arc<std::sync::Mutex<Vec<TokenLogprob>>>;

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;

/// Most alternatives per token `logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl GenerationParams {
    /// The request-level rules every interface shares, checked before any work: sampling values in
    /// range, no empty stop string, answer options well formed (`choices::validate`).
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidRequest("stop strings must not be empty".into()));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::InvalidRequest(format!("at most {MAX_STOP_STRINGS} stop strings")));
        }
        choices::validate(&self.choices)
    }

    pub fn from_config(g: &GenerationConfig) -> GenerationParams {
        GenerationParams {
            max_new_tokens: g.max_new_tokens,
            sampling: SamplingParams { temperature: g.temperature, top_k: g.top_k, top_p: g.top_p, seed: g.seed },
            stop: g.stop.clone(),
            adapter: None,
            choices: Vec::new(),
            choice_scoring: ScoringOverrides::default(),
            logprobs: None,
            logprob_sink: None,
            context: ContextOverrides::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-turn token.
    Stop,
    /// A stop string appeared (it is not part of the text).
    StopString,
    /// `max_new_tokens` or the context limit was reached.
    Length,
    /// The caller cancelled.
    Cancelled,
}

/// Per generated token: id and log-probabilities (see [`crate::sampler::Choice`]).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TokenInfo {
    pub id: u32,
    pub logprob: f32,
    pub top_logprob: f32,
}

/// A token's log-probability as OpenAI reports it (`logprobs.content[]` of a chat completion): its
/// text, its bytes (a byte-level token can be part of a UTF-8 character) and the most likely
/// alternatives at its position. Log-probabilities are the model's (before temperature or top-p).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl TopLogprob {
    fn of(tokenizer: &Tokenizer, id: u32, logprob: f32) -> TopLogprob {
        let bytes = tokenizer.token_bytes(id);
        TopLogprob { token: String::from_utf8_lossy(&bytes).into_owned(), logprob, bytes }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Probability of each of `params.choices` (softmax of their scores; empty without choices).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub choice_probs: Vec<f32>,
    /// Each option's likelihood (empty without choices); `text` is then the chosen option.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub choice_scores: Vec<OptionScore>,
    /// How sure the model is of the chosen option (`[choices] confidence`; `crate::choices`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choice_confidence: Option<f32>,
    /// Per generated token (or the chosen option's tokens), when `params.logprobs` asked for them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
    /// What the context policy did (absent under `refuse`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextReport>,
    #[serde(serialize_with = "as_secs")]
    pub prefill_time: Duration,
    #[serde(serialize_with = "as_secs")]
    pub decode_time: Duration,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Generation {
    fn empty(prompt_tokens: usize) -> Generation {
        Generation {
            text: String::new(),
            tokens: Vec::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens,
            choice_probs: Vec::new(),
            choice_scores: Vec::new(),
            choice_confidence: None,
            logprobs: Vec::new(),
            context: None,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        }
    }

    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode speed over the tokens that needed a decode step (the first comes from the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Cancels a running generation from any thread, including in the middle of a long prefill
/// (through ONNX Runtime's run-level terminate flag).
#[derive(Clone, Default)]
pub struct CancelToken(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    run: Mutex<Option<Arc<RunOptions>>>,
}

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        if let Some(ro) = self.0.run.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = ro.terminate();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    fn attach(&self, ro: Option<Arc<RunOptions>>) {
        *self.0.run.lock().unwrap_or_else(|p| p.into_inner()) = ro;
    }
}

/// What one generation needs besides the decoder: all of it fixed for the whole run.
pub(crate) struct Job<'a> {
    pub tokenizer: &'a Tokenizer,
    pub stop_ids: &'a [u32],
    /// Prompt token ids.
    pub ids: &'a [u32],
    /// Already capped by the context limit.
    pub max_new: usize,
    pub params: &'a GenerationParams,
    /// For a choice question: what scoring needs (then nothing is sampled).
    pub choices: Option<ChoiceJob<'a>>,
    /// How the cache is kept within its pot ([`crate::context`]); `ids` are already truncated.
    pub context: ContextJob<'a>,
}

/// A request's context policy, resolved by the engine.
pub(crate) struct ContextJob<'a> {
    pub pot: Pot,
    /// The catalyst prompt's ids (`infinipot`).
    pub catalyst: &'a [u32],
    pub rope: Rope,
    /// Prompt tokens the engine cut (`truncate`).
    pub truncated: usize,
}

/// Runs one generation on `decoder`: prefill, then the decode loop with sampling, stop tokens, stop
/// strings, streaming and cancellation.
pub(crate) fn run(
    decoder: &mut Decoder,
    job: &Job,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let run_options = Arc::new(RunOptions::new().map_err(Error::ort("creating run options"))?);
    cancel.attach(Some(run_options.clone()));
    if cancel.is_cancelled() {
        let _ = run_options.terminate();
    }
    let result = match &job.choices {
        Some(c) => choose(decoder, job, c, cancel, &run_options, on_text),
        None => decode_loop(decoder, job, cancel, &run_options, on_text),
    };
    cancel.attach(None);
    result
}

fn decode_loop(
    decoder: &mut Decoder,
    job: &Job,
    cancel: &CancelToken,
    run_options: &RunOptions,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let Job { tokenizer, stop_ids, ids, max_new, params, .. } = *job;
    let mut out = Generation::empty(ids.len());
    let mut reader = Reader::new(decoder, &job.context, cancel, run_options)?;
    let mut cache = decoder.new_cache_with_capacity(reader.capacity(ids.len() + max_new))?;
    let started = Instant::now();
    let reserve = max_new.min(job.context.pot.pot.saturating_sub(job.context.pot.keep) / 2);
    let prefilled = reader.prefill(decoder, ids, reserve, &mut cache);
    out.context = reader.report();
    let mut logits = match prefilled? {
        Some(l) => l,
        None => return Ok(cancelled(out)),
    };
    out.prefill_time = started.elapsed();
    let decode_start = Instant::now();
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut stream = StreamDecoder::default();
    let mut stops = StopStrings::new(&params.stop);
    let mut emit = |out: &mut Generation, s: &str| -> ControlFlow<()> {
        if s.is_empty() {
            return ControlFlow::Continue(());
        }
        out.text.push_str(s);
        on_text(s)
    };
    let mut finish = FinishReason::Length;
    for i in 0..max_new {
        if cancel.is_cancelled() {
            finish = FinishReason::Cancelled;
            break;
        }
        let c = sampler.sample(&logits);
        out.tokens.push(TokenInfo { id: c.token, logprob: c.logprob, top_logprob: c.top_logprob });
        if stop_ids.contains(&c.token) {
            finish = FinishReason::Stop;
            break;
        }
        // Tokens of the answer only (not the end-of-turn token), as OpenAI reports them.
        if let Some(k) = params.logprobs {
            let top = crate::sampler::top_logprobs(&logits, k.min(MAX_TOP_LOGPROBS));
            let TopLogprob { token, bytes, .. } = TopLogprob::of(tokenizer, c.token, c.logprob);
            let top_logprobs = top.into_iter().map(|(id, lp)| TopLogprob::of(tokenizer, id, lp)).collect();
            let entry = TokenLogprob { token, logprob: c.logprob, bytes, top_logprobs };
            if let Some(sink) = &params.logprob_sink {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(entry.clone());
            }
            out.logprobs.push(entry);
        }
        let (ready, hit) = stops.push(&stream.push(tokenizer, c.token)?);
        if emit(&mut out, &ready).is_break() {
            finish = FinishReason::Cancelled;
            break;
        }
        if hit {
            finish = FinishReason::StopString;
            break;
        }
        if i + 1 == max_new {
            break;
        }
        let stepped = reader.read(decoder, &[c.token], Some(&logits), &mut cache);
        out.context = reader.report();
        match stepped? {
            Some(l) => logits = l,
            None => {
                finish = FinishReason::Cancelled;
                break;
            }
        }
    }
    if matches!(finish, FinishReason::Stop | FinishReason::Length) {
        let (ready, _) = stops.push(&stream.flush(tokenizer)?);
        let _ = emit(&mut out, &ready);
        let _ = emit(&mut out, &stops.finish());
    }
    out.decode_time = decode_start.elapsed();
    out.finish_reason = finish;
    Ok(out)
}

/// Prompt tokens per forward pass. The scratch memory of one pass grows with its length (attention
/// scores, MLP activations): an 8,000-token prompt on SmolLM2-135M 4-bit peaked at 981 MB RSS in one
/// pass and 681 MB in passes of 512, at the same speed (2 cores, 2026-12-03); a cancelled request also
/// stops within one pass.
pub const PREFILL_CHUNK: usize = 512;

/// Forward passes over `ids` in chunks of [`PREFILL_CHUNK`], returning the last position's logits;
/// `None` when cut short by cancellation.
fn step(
    decoder: &mut Decoder,
    ids: &[u32],
    cache: &mut KvCache,
    cancel: &CancelToken,
    run_options: &RunOptions,
) -> Result<Option<Vec<f32>>> {
    let mut last = None;
    for chunk in ids.chunks(PREFILL_CHUNK) {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        match decoder.forward(chunk, cache, 1, Some(run_options)) {
            Ok(l) => last = Some(l),
            Err(_) if cancel.is_cancelled() => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    match last {
        Some(l) => Ok(Some(l)),
        None => Err(Error::InvalidRequest("nothing to compute: no tokens".into())),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prompt tokens per forward pass while NuC scores are taken: logits come back for every position
/// (4 bytes x vocabulary each, 25 MB per pass of 128 on a 49k vocabulary).
const NUC_CHUNK: usize = 128;

/// Reads tokens into the cache under the request's context policy: chunked forward passes as
/// [`step`], compressing the cache first whenever the next tokens would overflow the pot (`window`,
/// `infinipot`; see [`crate::context`]).
struct Reader<'a> {
    ctx: &'a ContextJob<'a>,
    cancel: &'a CancelToken,
    run_options: &'a RunOptions,
    /// NuC score of every cache entry, per lane (layer * kv_heads + head); `None` without NuC.
    nuc: Option<Vec<Vec<f32>>>,
    heads: Heads,
    layers: usize,
    compressions: usize,
    dropped: usize,
    max_entries: usize,
    compress_time: Duration,
}

impl<'a> Reader<'a> {
    fn new(
        decoder: &Decoder,
        ctx: &'a ContextJob<'a>,
        cancel: &'a CancelToken,
        run_options: &'a RunOptions,
    ) -> Result<Reader<'a>> {
        let a = decoder.arch();
        if ctx.pot.policy == ContextPolicy::Infinipot && !decoder.has_queries() {
            return Err(Error::InvalidRequest(
                "context policy \"infinipot\" needs a model exported with its layers' queries (attn_query.N): \
                 re-export it (scripts/setup or the exporter)"
                    .into(),
            ));
        }
        let lanes = a.num_hidden_layers * a.num_key_value_heads;
        Ok(Reader {
            ctx,
            cancel,
            run_options,
            nuc: ctx.pot.needs_nuc().then(|| vec![Vec::new(); lanes]),
            heads: Heads { q_heads: a.num_attention_heads, kv_heads: a.num_key_value_heads, head_dim: a.head_dim },
            layers: a.num_hidden_layers,
            compressions: 0,
            dropped: 0,
            max_entries: 0,
            compress_time: Duration::ZERO,
        })
    }

    fn compresses(&self) -> bool {
        self.ctx.pot.policy.compresses()
    }

    /// Cache positions to allocate: the pot (and the catalyst's) when compressing, else what the
    /// request needs.
    fn capacity(&self, needed: usize) -> usize {
        match self.ctx.pot.policy {
            ContextPolicy::Infinipot => self.ctx.pot.pot + self.ctx.catalyst.len(),
            ContextPolicy::Window => self.ctx.pot.pot,
            _ => needed,
        }
    }

    fn report(&self) -> Option<ContextReport> {
        let ctx = self.ctx;
        (ctx.pot.policy != ContextPolicy::Refuse).then_some(ContextReport {
            policy: ctx.pot.policy,
            pot_tokens: ctx.pot.pot,
            compressions: self.compressions,
            dropped_tokens: self.dropped + ctx.truncated,
            max_entries: self.max_entries,
            compress_ms: self.compress_time.as_secs_f64() * 1e3,
        })
    }

    /// Reads the prompt, in segments that end with it (see [`Pot::segments`]), leaving `reserve`
    /// entries free for what follows; returns the last position's logits, `None` when cancelled.
    fn prefill(
        &mut self,
        decoder: &mut Decoder,
        ids: &[u32],
        reserve: usize,
        cache: &mut KvCache,
    ) -> Result<Option<Vec<f32>>> {
        if !self.compresses() {
            let out = step(decoder, ids, cache, self.cancel, self.run_options);
            self.max_entries = cache.len();
            return out;
        }
        let (first, seg) = self.ctx.pot.segments(ids.len(), reserve);
        let Some(mut last) = self.read_plain(decoder, &ids[..first], None, cache)? else {
            return Ok(None);
        };
        if seg > 0 {
            for segment in ids[first..].chunks(seg) {
                if !self.compress(decoder, cache)? {
                    return Ok(None);
                }
                match self.read_plain(decoder, segment, Some(&last), cache)? {
                    Some(l) => last = l,
                    None => return Ok(None),
                }
            }
        }
        self.max_entries = self.max_entries.max(cache.len());
        Ok(Some(last))
    }

    /// Reads `ids` after the cache (a decode step), compressing first if they would overflow the pot.
    /// `prev`: the logits that predicted `ids[0]` (for its NuC score).
    fn read(
        &mut self,
        decoder: &mut Decoder,
        ids: &[u32],
        prev: Option<&[f32]>,
        cache: &mut KvCache,
    ) -> Result<Option<Vec<f32>>> {
        if self.compresses() && cache.len() + ids.len() > self.ctx.pot.pot && !self.compress(decoder, cache)? {
            return Ok(None);
        }
        let out = self.read_plain(decoder, ids, prev, cache);
        self.max_entries = self.max_entries.max(cache.len());
        out
    }

    /// Forward passes over `ids` with no compression, recording NuC scores when they are needed.
    fn read_plain(
        &mut self,
        decoder: &mut Decoder,
        ids: &[u32],
        prev: Option<&[f32]>,
        cache: &mut KvCache,
    ) -> Result<Option<Vec<f32>>> {
        let Some(lanes) = self.nuc.as_mut() else { return step(decoder, ids, cache, self.cancel, self.run_options) };
        let vocab = decoder.arch().vocab_size;
        let mut prev: Option<Vec<f32>> = prev.map(<[f32]>::to_vec);
        for chunk in ids.chunks(NUC_CHUNK) {
            if self.cancel.is_cancelled() {
                return Ok(None);
            }
            let logits = match decoder.forward(chunk, cache, chunk.len(), Some(self.run_options)) {
                Ok(l) => l,
                Err(_) if self.cancel.is_cancelled() => return Ok(None),
                Err(e) => return Err(e),
            };
            for (j, &token) in chunk.iter().enumerate() {
                let before = if j == 0 { prev.as_deref() } else { Some(&logits[(j - 1) * vocab..j * vocab]) };
                // The input's first token has no prediction: keep it like an attention sink.
                let score = before.map_or(f32::MAX, |row| context::nll(row, token));
                lanes.iter_mut().for_each(|lane| lane.push(score));
            }
            prev = Some(logits[(chunk.len() - 1) * vocab..].to_vec());
        }
        match prev {
            Some(l) if !ids.is_empty() => Ok(Some(l)),
            _ => Err(Error::InvalidRequest("nothing to compute: no tokens".into())),
        }
    }

    /// Compresses the cache to `keep` entries by the policy; `false` when cancelled.
    fn compress(&mut self, decoder: &mut Decoder, cache: &mut KvCache) -> Result<bool> {
        let started = Instant::now();
        let done = self.compress_now(decoder, cache);
        self.compress_time += started.elapsed();
        done
    }

    fn compress_now(&mut self, decoder: &mut Decoder, cache: &mut KvCache) -> Result<bool> {
        let pot = self.ctx.pot;
        let len = cache.len();
        self.max_entries = self.max_entries.max(len);
        if len <= pot.keep {
            return Ok(true);
        }
        let lanes = self.layers * self.heads.kv_heads;
        let selections: Vec<Selection> = match pot.policy {
            ContextPolicy::Infinipot => {
                let t0 = Instant::now();
                let queries = match decoder.forward_queries(self.ctx.catalyst, cache, 1, Some(self.run_options)) {
                    Ok((_, q, stride)) => (q, stride),
                    Err(_) if self.cancel.is_cancelled() => return Ok(false),
                    Err(e) => return Err(e),
                };
                let t1 = Instant::now();
                let scores = self.catalyst_scores(cache, &queries.0, queries.1, len);
                cache.truncate(len);
                let scores = scores?;
                tracing::debug!(catalyst_ms = ms(t1 - t0), scoring_ms = ms(t1.elapsed()), "context: catalyst scored");
                let none = Vec::new();
                (0..lanes)
                    .map(|lane| {
                        let (l, h) = (lane / self.heads.kv_heads, lane % self.heads.kv_heads);
                        let nuc = self.nuc.as_ref().map_or(&none, |n| &n[lane]);
                        context::infinipot_selection(&scores[l][h], nuc, pot.keep, pot.nuc_share)
                    })
                    .collect()
            }
            _ => vec![context::window_selection(len, pot.keep, pot.sinks); lanes],
        };
        let t = Instant::now();
        cache.compact(&selections, &self.ctx.rope)?;
        tracing::debug!(compaction_ms = ms(t.elapsed()), len, keep = pot.keep, "context: cache compacted");
        if let Some(nuc) = self.nuc.as_mut() {
            for (lane, sel) in nuc.iter_mut().zip(&selections) {
                *lane = sel.iter().map(|&i| lane[i as usize]).collect();
            }
        }
        self.compressions += 1;
        self.dropped += len - pot.keep;
        Ok(true)
    }

    /// Per layer and KV head, the CaP score of each of the first `len` entries (layers split across
    /// threads: ONNX Runtime's are idle meanwhile).
    fn catalyst_scores(
        &self,
        cache: &KvCache,
        queries: &[Vec<f32>],
        stride: usize,
        len: usize,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let keys: Vec<&[f32]> = (0..self.layers).map(|l| cache.layer_keys(l)).collect::<Result<_>>()?;
        let capacity = cache.capacity();
        let (heads, rope) = (self.heads, &self.ctx.rope);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, self.layers.max(1));
        let per = self.layers.div_ceil(threads);
        let mut out = vec![Vec::new(); self.layers];
        std::thread::scope(|s| {
            for (t, part) in out.chunks_mut(per).enumerate() {
                let keys = &keys;
                s.spawn(move || {
                    for (j, slot) in part.iter_mut().enumerate() {
                        let l = t * per + j;
                        *slot = context::catalyst_scores(heads, rope, &queries[l], stride, keys[l], capacity, len);
                    }
                });
            }
        });
        Ok(out)
    }
}

/// Answers a choice question: prefill the prompt once, score every option from its cache (and after
/// the content-free prompt when calibrating), answer with the best option.
fn choose(
    decoder: &mut Decoder,
    job: &Job,
    c: &ChoiceJob,
    cancel: &CancelToken,
    run_options: &RunOptions,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let mut out = Generation::empty(job.ids.len());
    let started = Instant::now();
    let longest = c.options.iter().map(Vec::len).max().unwrap_or(0);
    let mut reader = Reader::new(decoder, &job.context, cancel, run_options)?;
    let mut cache = decoder.new_cache_with_capacity(reader.capacity(job.ids.len() + longest))?;
    let prefilled = reader.prefill(decoder, job.ids, longest, &mut cache);
    out.context = reader.report();
    let Some(last) = prefilled? else { return Ok(cancelled(out)) };
    out.prefill_time = started.elapsed();
    let scoring = Instant::now();
    let Some(lps) = choices::option_logprobs(decoder, &mut cache, &last, c.options, cancel, run_options)? else {
        return Ok(cancelled(out));
    };
    drop(cache);
    let content_free = match c.content_free {
        Some(cf_ids) => {
            let mut cf_cache = decoder.new_cache_with_capacity(cf_ids.len() + longest)?;
            let Some(cf_last) = step(decoder, cf_ids, &mut cf_cache, cancel, run_options)? else {
                return Ok(cancelled(out));
            };
            match choices::option_logprobs(decoder, &mut cf_cache, &cf_last, c.options, cancel, run_options)? {
                Some(l) => Some(l),
                None => return Ok(cancelled(out)),
            }
        }
        None => None,
    };
    let scored = choices::decide(c, &lps, content_free.as_deref(), c.options);
    out.decode_time = scoring.elapsed();
    out.text = scored.options[scored.chosen].text.clone();
    out.tokens = scored.chosen_tokens;
    out.choice_probs = scored.probs;
    out.choice_scores = scored.options;
    out.choice_confidence = Some(scored.confidence);
    if job.params.logprobs.is_some() {
        // The chosen option's tokens (their alternatives are not computed by option scoring).
        out.logprobs = out
            .tokens
            .iter()
            .map(|t| {
                let TopLogprob { token, bytes, .. } = TopLogprob::of(job.tokenizer, t.id, t.logprob);
                TokenLogprob { token, logprob: t.logprob, bytes, top_logprobs: Vec::new() }
            })
            .collect();
    }
    out.finish_reason = FinishReason::Stop;
    if on_text(&out.text).is_break() {
        out.finish_reason = FinishReason::Cancelled;
    }
    Ok(out)
}

fn cancelled(mut out: Generation) -> Generation {
    out.finish_reason = FinishReason::Cancelled;
    out
}

/// Finds stop strings in streamed text, holding back any tail that could still become one.
struct StopStrings<'a> {
    stops: &'a [String],
    text: String,
    emitted: usize,
}

impl<'a> StopStrings<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopStrings { stops, text: String::new(), emitted: 0 }
    }

    /// Adds text; returns what may be released now and whether a stop string was hit.
    fn push(&mut self, delta: &str) -> (String, bool) {
        let search_from = floor_char_boundary(&self.text, self.emitted);
        self.text.push_str(delta);
        let hit = self.stops.iter().filter_map(|s| self.text[search_from..].find(s.as_str())).min();
        let end = match hit {
            Some(pos) => search_from + pos,
            None => self.text.len() - self.held_back_len(),
        };
        let ready = self.text[self.emitted..end].to_string();
        self.emitted = end;
        if hit.is_some() {
            self.text.truncate(end);
        }
        (ready, hit.is_some())
    }

    /// Length of the longest tail of the text that is a proper prefix of a stop string.
    fn held_back_len(&self) -> usize {
        let tail = &self.text[self.emitted..];
        self.stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(|(i, _)| &s[..i]).filter(|p| tail.ends_with(p)).map(str::len))
            .max()
            .unwrap_or(0)
    }

    fn finish(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopStrings::new(&stops);
        let mut out = Vec::new();
        for p in pieces {
            let (ready, hit) = m.push(p);
            out.push(ready);
            if hit {
                return (out, true, String::new());
            }
        }
        let rest = m.finish();
        (out, false, rest)
    }

    #[test]
    fn stop_string_split_across_tokens_is_cut_and_never_shown() {
        let (out, hit, _) = feed(&["\nUser:"], &["Hello", " there\n", "Us", "er: next"]);
        assert!(hit);
        assert_eq!(out.concat(), "Hello there");
        assert_eq!(out[1], " there", "the newline may start the stop string: held back");
    }

    #[test]
    fn held_back_text_is_released_when_it_stops_matching() {
        let (out, hit, rest) = feed(&["STOP"], &["a ST", "ART", " b"]);
        assert!(!hit);
        assert_eq!(out, vec!["a ", "START", " b"]);
        assert_eq!(rest, "");
        let (out, hit, rest) = feed(&["STOP"], &["end ST"]);
        assert!(!hit);
        assert_eq!(out.concat() + &rest, "end ST");
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let (out, hit, _) = feed(&["b", "xyz"], &["aaxyzb"]);
        assert!(hit);
        assert_eq!(out.concat(), "aa");
    }

    #[test]
    fn multibyte_text_is_handled() {
        let (out, hit, _) = feed(&["é!"], &["café", " ok", "é", "!"]);
        assert!(hit);
        assert_eq!(out.concat(), "café ok");
    }
}
