//! Adapter pool, blending and merging on the tiny model and its pool: correctness against PEFT's own
//! merged model, blend weights, switching, persistence, eviction, and every pool error path.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use crayon::{Engine, Example};

fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| Example {
            input: format!("Question: What is {i} plus {i}?\n A. {}\n B. {}\nAnswer:", 2 * i, i),
            output: " A".into(),
        })
        .collect()
}

#[test]
fn merged_blend_matches_peft_merged_model() {
    let (cfg, _state) = tiny_with_pool();
    let r = pool_reference(&cfg.pool.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let vocab = engine.files().arch.vocab_size;
    engine.customize_weights("mix", &r.blend_weights).unwrap();
    let got = engine.logits(Some("mix"), &r.input_ids).unwrap();
    let diff = max_abs_diff(last_rows(&got, vocab, 4), &r.blend_logits);
    assert!(diff < 1e-4, "blend vs PEFT: max |diff| {diff}");
    let base = engine.logits(None, &r.input_ids).unwrap();
    assert!(max_abs_diff(last_rows(&base, vocab, 4), &r.blend_logits) > 1e-3, "the blend must change the model");
}

#[test]
fn one_adapter_at_weight_one_equals_that_adapter_alone() {
    let (cfg, _state) = tiny_with_pool();
    let r = pool_reference(&cfg.pool.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let vocab = engine.files().arch.vocab_size;
    let mut one_hot = vec![0.0; r.blend_weights.len()];
    one_hot[0] = 1.0;
    engine.customize_weights("first", &one_hot).unwrap();
    let got = engine.logits(Some("first"), &r.input_ids).unwrap();
    let diff = max_abs_diff(last_rows(&got, vocab, 4), &r.single_logits);
    assert!(diff < 1e-4, "one-hot blend vs PEFT single adapter: max |diff| {diff}");
}

/// LoraHub's composition `(Σ w B)(Σ w A)` (the benchmark's peer) weights both factors: one adapter at
/// weight 2 is its delta times 4, and two adapters have cross terms the sum of deltas lacks.
#[test]
fn factor_composition_weights_both_factors() {
    use crayon::pool::merge::Composition;
    let (cfg, _state) = tiny_with_pool();
    let mut engine = Engine::load(&cfg).unwrap();
    let n = engine.pool().unwrap().adapters.len();
    let at = |pairs: &[(usize, f32)]| {
        let mut w = vec![0.0; n];
        for &(i, v) in pairs {
            w[i] = v;
        }
        w
    };
    engine.ready_experimental_blend("f2", &at(&[(0, 2.0)]), Composition::Factors).unwrap();
    engine.ready_experimental_blend("d4", &at(&[(0, 4.0)]), Composition::Deltas).unwrap();
    engine.ready_experimental_blend("f11", &at(&[(0, 1.0), (1, 1.0)]), Composition::Factors).unwrap();
    engine.ready_experimental_blend("d11", &at(&[(0, 1.0), (1, 1.0)]), Composition::Deltas).unwrap();
    let ids = [1, 20, 30, 40, 50];
    let [f2, d4, f11, d11, base] = ["f2", "d4", "f11", "d11"]
        .map(Some)
        .into_iter()
        .chain([None])
        .map(|a| engine.logits(a, &ids).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let diff = max_abs_diff(&f2, &d4);
    assert!(diff < 1e-4, "(2B)(2A) must equal 4BA: max |diff| {diff}");
    assert!(max_abs_diff(&f2, &base) > 1e-3, "the composition must change the model");
    assert!(max_abs_diff(&f11, &d11) > 1e-4, "factor composition has cross terms B_0 A_1 + B_1 A_0");
    assert!(engine.ready_experimental_blend("bad", &at(&[(0, f32::NAN)]), Composition::Factors).is_err());
}

/// Sharing the model's weights across sessions (`runtime.share_weights`) is a memory layout, not a
/// numerical change: base and blended logits are identical with and without it, for a pool that
/// replaces every matrix (plain initializers) and one that replaces a subset (the shared packed
/// container, with the blend's matrices as the session's own).
#[test]
fn shared_and_private_weights_give_identical_logits() {
    for pool in ["models/tiny-pool", "models/tiny-server-pool"] {
        let (mut cfg, _state) = tiny_with_pool();
        cfg.pool.dir = repo().join(pool);
        let mut logits = Vec::new();
        for share in [true, false] {
            cfg.runtime.share_weights = share;
            let mut engine = Engine::load(&cfg).unwrap();
            let n = engine.pool().unwrap().adapters.len();
            let weights: Vec<f32> = (0..n).map(|i| (i + 1) as f32).collect();
            engine.customize_weights("mix", &weights).unwrap();
            engine.customize_weights("other", &weights.iter().rev().copied().collect::<Vec<_>>()).unwrap();
            let ids = [1, 20, 30, 40, 50];
            let got = [None, Some("mix"), Some("other")].map(|a| engine.logits(a, &ids).unwrap());
            logits.push(got);
        }
        assert!(logits[0][1] != logits[0][0], "{pool}: the blend must change the model");
        for (i, what) in ["base", "blend 'mix'", "blend 'other'"].iter().enumerate() {
            let diff = max_abs_diff(&logits[0][i], &logits[1][i]);
            assert!(diff == 0.0, "{pool}, {what}: shared vs private weights differ by {diff}");
        }
    }
}

#[test]
fn blend_weights_from_examples_form_a_distribution() {
    let (cfg, _state) = tiny_with_pool();
    let mut engine = Engine::load(&cfg).unwrap();
    let report = engine.customize("arith", &examples(5)).unwrap();
    let c = &report.customization;
    assert_eq!(c.weights.len(), engine.pool().unwrap().adapters.len());
    assert!(c.weights.iter().all(|&w| w >= 0.0));
    assert!((c.weights.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    assert_eq!(c.example_count, 5);
    assert_eq!(c.example_digest, crayon::adapters::digest(&examples(5)));
    assert!(c.examples.is_none(), "examples are not stored unless asked");
}

#[test]
fn switching_a_b_a_gives_a_exactly_again() {
    let (cfg, _state) = tiny_with_pool();
    let r = pool_reference(&cfg.pool.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let n = r.blend_weights.len();
    let mut a = vec![0.0; n];
    a[0] = 1.0;
    let mut b = vec![0.0; n];
    b[n - 1] = 1.0;
    engine.customize_weights("a", &a).unwrap();
    engine.customize_weights("b", &b).unwrap();
    let first = engine.logits(Some("a"), &r.input_ids).unwrap();
    let other = engine.logits(Some("b"), &r.input_ids).unwrap();
    let again = engine.logits(Some("a"), &r.input_ids).unwrap();
    assert_ne!(first, other);
    assert_eq!(first, again, "bit-identical after switching back");
}

#[test]
fn customizations_persist_across_restarts_and_can_be_removed() {
    let (cfg, _state) = tiny_with_pool();
    let r = pool_reference(&cfg.pool.dir);
    let before = {
        let mut engine = Engine::load(&cfg).unwrap();
        engine.customize("kept", &examples(3)).unwrap();
        engine.logits(Some("kept"), &r.input_ids).unwrap()
    };
    let mut engine = Engine::load(&cfg).unwrap();
    assert_eq!(engine.adapters().iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["kept"]);
    assert!(engine.ready_adapters().is_empty(), "restored lazily");
    assert_eq!(engine.logits(Some("kept"), &r.input_ids).unwrap(), before);
    engine.remove_adapter("kept").unwrap();
    assert!(engine.logits(Some("kept"), &r.input_ids).unwrap_err().to_string().contains("no such adapter"));
    assert!(Engine::load(&cfg).unwrap().adapters().is_empty());
}

#[test]
fn storing_examples_is_opt_in() {
    let (mut cfg, _state) = tiny_with_pool();
    cfg.adapters.store_examples = true;
    let mut engine = Engine::load(&cfg).unwrap();
    engine.customize("with-ex", &examples(2)).unwrap();
    let saved = fs::read_to_string(cfg.adapters.state_dir.join("adapters/with-ex.json")).unwrap();
    assert!(saved.contains("What is 1 plus 1?"));
}

#[test]
fn least_recently_used_models_are_dropped_beyond_the_budget() {
    let (mut cfg, _state) = tiny_with_pool();
    cfg.adapters.cache_mb = 0; // room for the newest only
    let r = pool_reference(&cfg.pool.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let n = r.blend_weights.len();
    let one_hot = |k: usize| {
        let mut w = vec![0.0; n];
        w[k] = 1.0;
        w
    };
    engine.customize_weights("x", &one_hot(0)).unwrap();
    let x = engine.logits(Some("x"), &r.input_ids).unwrap();
    engine.customize_weights("y", &one_hot(1)).unwrap();
    assert_eq!(engine.ready_adapters(), ["y"]);
    assert_eq!(engine.logits(Some("x"), &r.input_ids).unwrap(), x, "rebuilt on demand, same result");
    assert_eq!(engine.ready_adapters(), ["x"]);
}

#[test]
fn bad_customization_requests_are_refused() {
    let (cfg, _state) = tiny_with_pool();
    let mut engine = Engine::load(&cfg).unwrap();
    let err = |r: crayon::Result<crayon::engine::CustomizeReport>| r.expect_err("must fail").to_string();
    assert!(err(engine.customize("x", &[])).contains("examples"));
    assert!(err(engine.customize("bad name", &examples(1))).contains("adapter name"));
    assert!(err(engine.customize("x", &[Example { input: " ".into(), output: "y".into() }])).contains("empty input"));
    assert!(err(engine.customize_weights("x", &[1.0])).contains("blend weights"));
    let n = engine.pool().unwrap().adapters.len();
    assert!(err(engine.customize_weights("x", &vec![-1.0; n])).contains("non-negative"));
    assert!(err(engine.customize_weights("x", &vec![f32::NAN; n])).contains("finite"));
    assert!(engine.logits(Some("never-made"), &[1, 2]).unwrap_err().to_string().contains("no such adapter"));
}

#[test]
fn customization_without_a_pool_says_so() {
    let mut engine = Engine::load(&tiny()).unwrap();
    let e = engine.customize("x", &examples(1)).unwrap_err().to_string();
    assert!(e.contains("no adapter pool is configured"), "{e}");
}

#[test]
fn adapter_made_with_another_pool_is_refused_clearly() {
    let (cfg, _state) = tiny_with_pool();
    let mut engine = Engine::load(&cfg).unwrap();
    engine.customize("old", &examples(1)).unwrap();
    let file = cfg.adapters.state_dir.join("adapters/old.json");
    let text = fs::read_to_string(&file).unwrap().replace(&engine.pool().unwrap().id, "some-other-pool");
    fs::write(&file, text).unwrap();
    let mut engine = Engine::load(&cfg).unwrap();
    let e = engine.logits(Some("old"), &[1, 2]).unwrap_err().to_string();
    assert!(e.contains("some-other-pool") && e.contains("customize it again"), "{e}");
}

// ---- pool error paths ----

fn copy_pool() -> tempfile::TempDir {
    let src = repo().join("models/tiny-pool");
    let dst = tempfile::tempdir().unwrap();
    copy_dir(&src, dst.path());
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    for e in fs::read_dir(src).unwrap().flatten() {
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            fs::create_dir_all(&to).unwrap();
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), to).unwrap();
        }
    }
}

fn pool_error(edit: impl FnOnce(&Path)) -> String {
    let pool = copy_pool();
    edit(pool.path());
    let (mut cfg, _state) = tiny_with_pool();
    cfg.pool.dir = pool.path().to_path_buf();
    match Engine::load(&cfg) {
        Ok(_) => panic!("a broken pool must be refused"),
        Err(e) => e.to_string(),
    }
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("pool.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    fs::write(p, v.to_string()).unwrap();
}

#[test]
fn pool_for_another_base_model_is_refused() {
    let e = pool_error(|d| edit_manifest(d, |v| v["base_model"]["weights_sha256"] = "0123456789abcdef".into()));
    assert!(e.contains("pool.json") && e.contains("built for base weights 0123456789ab"), "{e}");
}

#[test]
fn missing_pool_pieces_are_named() {
    let e = pool_error(|d| fs::remove_file(d.join("pool.json")).unwrap());
    assert!(e.contains("pool.json"), "{e}");
    let e = pool_error(|d| fs::remove_file(d.join("c01/adapter_model.safetensors")).unwrap());
    assert!(e.contains("c01/adapter_model.safetensors"), "{e}");
    let e = pool_error(|d| fs::write(d.join("c02/adapter_model.safetensors"), b"garbage").unwrap());
    assert!(e.contains("c02/adapter_model.safetensors") && e.contains("safetensors"), "{e}");
    let e = pool_error(|d| fs::write(d.join("pool.json"), "{").unwrap());
    assert!(e.contains("pool.json") && e.contains("invalid"), "{e}");
}

#[test]
fn wrong_shapes_unknown_targets_and_bad_centroids_are_refused() {
    let e = pool_error(|d| edit_manifest(d, |v| v["adapters"][0]["rank"] = 8.into()));
    assert!(e.contains("shape") && e.contains("expected [8,"), "{e}");
    let e = pool_error(|d| edit_manifest(d, |v| v["adapters"][1]["targets"][0] = "mlp.wrong_proj".into()));
    assert!(e.contains("mlp.wrong_proj") && e.contains("not one of the model's"), "{e}");
    let e = pool_error(|d| edit_manifest(d, |v| v["adapters"][0]["centroid"] = serde_json::json!([0.5, 0.5])));
    assert!(e.contains("centroid has 2 values"), "{e}");
    let e = pool_error(|d| edit_manifest(d, |v| v["format"] = "crayon-pool/7".into()));
    assert!(e.contains("crayon-pool/7"), "{e}");
    let e = pool_error(|d| edit_manifest(d, |v| v["adapters"] = serde_json::json!([])));
    assert!(e.contains("no adapters"), "{e}");
}

/// A pool with one adapter per training dataset (`crayon_pool build --cluster-by task`): adapters are
/// named by their dataset, each trained on that dataset alone (so leaving a dataset out is dropping its
/// adapter), with a centroid the device's examples are compared with.
#[test]
fn task_pool_has_one_adapter_per_dataset_and_blends() {
    let (mut cfg, _state) = tiny_with_pool();
    cfg.pool.dir = repo().join("models/tiny-task-pool");
    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(cfg.pool.dir.join("pool.json")).unwrap()).unwrap();
    let datasets =
        ["arc_easy", "arc_challenge", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "socialiqa", "winogrande"];
    let adapters = manifest["adapters"].as_array().unwrap();
    assert_eq!(adapters.len(), datasets.len());
    for (a, d) in adapters.iter().zip(datasets) {
        assert_eq!(a["name"], d);
        let mix = a["task_mix"].as_object().unwrap();
        assert_eq!(mix.keys().collect::<Vec<_>>(), vec![d], "adapter {d} must be trained on {d} alone");
        assert!(a["centroid"].as_array().is_some_and(|c| !c.is_empty()), "adapter {d} needs a centroid");
    }
    let mut engine = Engine::load(&cfg).unwrap();
    assert_eq!(engine.pool().unwrap().names(), datasets);
    let report = engine.customize("arith", &examples(5)).unwrap();
    let w = &report.customization.weights;
    assert_eq!(w.len(), datasets.len());
    assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    let ids = [1, 20, 30, 40, 50];
    assert!(engine.logits(Some("arith"), &ids).unwrap() != engine.logits(None, &ids).unwrap());
}

/// `[blend] method = "example_loss"`: each adapter's loss equals the examples' loss under that adapter
/// made ready on its own, the weights are the softmax of −loss, and nothing else is evicted or saved.
#[test]
fn example_loss_blend_weighs_adapters_by_their_loss_on_the_examples() {
    let (mut cfg, _state) = tiny_with_pool();
    cfg.blend.method = crayon::pool::blend::BlendMethod::ExampleLoss;
    cfg.blend.loss_temperature = 0.05;
    let mut engine = Engine::load(&cfg).unwrap();
    let report = engine.customize("loss", &examples(3)).unwrap();
    let c = &report.customization;
    let losses = c.example_losses.clone().expect("example_loss customizations record the losses");
    let n = engine.pool().unwrap().adapters.len();
    assert_eq!(losses.len(), n);
    for (i, &l) in losses.iter().enumerate() {
        let one_hot: Vec<f32> = (0..n).map(|j| if j == i { 1.0 } else { 0.0 }).collect();
        engine.customize_weights("single", &one_hot).unwrap();
        let again = engine.examples_loss(Some("single"), &examples(3)).unwrap();
        assert!((again - l).abs() < 1e-4, "adapter {i}: {l} in the blend, {again} alone");
    }
    let expect = crayon::pool::blend::weights_from_losses(&losses, &cfg.blend);
    assert!(c.weights.iter().zip(&expect).all(|(a, b)| (a - b).abs() < 1e-6));
    let best = losses.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert!(c.weights.iter().all(|&w| w <= c.weights[best]));
    assert_eq!(engine.adapters().len(), 2, "only 'loss' and 'single' are saved: {:?}", engine.adapters());
    // Outputs are what the loss is about: examples without any are refused.
    let empty: Vec<Example> = examples(2).into_iter().map(|e| Example { output: String::new(), ..e }).collect();
    let err = engine.customize("none", &empty).unwrap_err().to_string();
    assert!(err.contains("non-empty input and output"), "{err}");
}

/// Customize is a transaction (issue #14): when the new state cannot be written, the previous
/// customization of that name keeps serving, stays listed and stays on disk, and no temporary file
/// is left. (The write is made to fail by a directory where the temporary file goes: it works as root,
/// where permission bits do not.)
#[test]
fn a_customization_that_cannot_be_saved_changes_nothing() {
    let (cfg, _state) = tiny_with_pool();
    let r = pool_reference(&cfg.pool.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let old = engine.customize("task", &examples(2)).unwrap().customization;
    let old_logits = engine.logits(Some("task"), &r.input_ids).unwrap();
    let dir = cfg.adapters.state_dir.join("adapters");
    let on_disk = fs::read_to_string(dir.join("task.json")).unwrap();
    fs::create_dir(dir.join(".task.json.tmp")).unwrap();
    let mut other = examples(6);
    other.reverse();
    let err = engine.customize("task", &other).unwrap_err();
    assert!(err.to_string().starts_with("cannot write adapter state"), "{err}");
    assert_eq!(engine.adapter("task").unwrap().example_digest, old.example_digest, "the listing keeps the old one");
    assert_eq!(engine.logits(Some("task"), &r.input_ids).unwrap(), old_logits, "the old model still serves");
    assert_eq!(fs::read_to_string(dir.join("task.json")).unwrap(), on_disk, "the disk keeps the old one");
    fs::remove_dir(dir.join(".task.json.tmp")).unwrap();
    engine.customize("task", &other).unwrap();
    assert_ne!(engine.adapter("task").unwrap().example_digest, old.example_digest);
}

/// Stored state is checked at start (issue #14): interrupted saves are cleaned up; a file that names
/// another adapter (a copy, or an edit) cannot bring back a removed one; negative or non-normalized
/// blend weights and ragged embeddings are refused; files are 0640 whatever the umask.
#[test]
fn stored_adapters_are_validated_and_interrupted_saves_cleaned_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let (cfg, _state) = tiny_with_pool();
    let dir = cfg.adapters.state_dir.join("adapters");
    {
        let mut engine = Engine::load(&cfg).unwrap();
        engine.customize("a", &examples(2)).unwrap();
        engine.customize("b", &examples(3)).unwrap();
    }
    assert_eq!(fs::metadata(dir.join("a.json")).unwrap().permissions().mode() & 0o777, 0o640);
    let a = fs::read_to_string(dir.join("a.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&a).unwrap();
    fs::write(dir.join("copy-of-a.json"), &a).unwrap(); // names "a" inside
    fs::write(dir.join(".b.json.tmp"), "{half a save").unwrap();
    let n = v["weights"].as_array().unwrap().len();
    v["name"] = "negative".into();
    v["weights"] =
        serde_json::json!((0..n).map(|i| if i == 0 { -1.0 } else { 2.0 / (n - 1) as f64 }).collect::<Vec<_>>());
    fs::write(dir.join("negative.json"), v.to_string()).unwrap();
    v["name"] = "ragged".into();
    v["weights"] = serde_json::json!(vec![1.0 / n as f64; n]);
    v["example_embeddings"] = serde_json::json!([[0.1, 0.2], [0.3]]);
    fs::write(dir.join("ragged.json"), v.to_string()).unwrap();

    let mut engine = Engine::load(&cfg).unwrap();
    let names: Vec<String> = engine.adapters().iter().map(|c| c.name.clone()).collect();
    assert_eq!(names, ["a", "b"], "only the valid files load");
    assert!(!dir.join(".b.json.tmp").exists(), "the interrupted save is gone");
    engine.remove_adapter("a").unwrap();
    let names: Vec<String> = Engine::load(&cfg).unwrap().adapters().iter().map(|c| c.name.clone()).collect();
    assert_eq!(names, ["b"], "a removed adapter does not come back through another file");
}

/// A NaN in an adapter's tensors is refused at load, naming the tensor (issue #14): blends of it
/// would otherwise answer nothing, silently. (The last 4 bytes of the file are the last tensor's last
/// value: 0xFFFF is a NaN in f16 and bf16, and two of them make a NaN in f32.)
#[test]
fn non_finite_adapter_tensors_are_refused() {
    let e = pool_error(|d| {
        let p = d.join("c01/adapter_model.safetensors");
        let mut bytes = fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&[0xff; 4]);
        fs::write(p, bytes).unwrap();
    });
    assert!(e.contains("c01") && e.contains("non-finite value"), "{e}");
}

/// The pool tool's embeddings of a few prompts (`embedding-reference.json`, written by `crayon_pool
/// build` or `embed-reference` with the Python embedder that placed the centroids).
fn embedding_reference(pool: &Path) -> Vec<(String, Vec<u32>, Vec<f32>)> {
    let path = pool.join("embedding-reference.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup)", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["method"], "q_proj_mean");
    let rows = v["prompts"].as_array().unwrap();
    assert!(rows.len() >= 5, "{}", path.display());
    rows.iter()
        .map(|r| {
            let ids = r["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let emb = r["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            (r["text"].as_str().unwrap().to_string(), ids, emb)
        })
        .collect()
}

/// Rust↔Python parity of the task embedding (issue #13): the engine tokenizes and embeds each prompt
/// as the pool tool did when it placed the centroids — same ids, same vector — for the tiny pool and
/// the shipped real pool on the float32 model it was built on, and on the 4-bit model the device runs
/// (its blocks are the GGUF's own, which the float32 export decodes: the same numbers).
#[test]
fn task_embedding_matches_the_pool_tools() {
    let real = repo().join("pools/smollm2-135m-instruct");
    for (model, pool, min_cos) in [
        ("tiny", repo().join("models/tiny-pool"), 0.999_99),
        ("smollm2-135m-instruct", real.clone(), 0.999_99),
        ("smollm2-135m-instruct-q4", real, 0.999_99),
    ] {
        let mut cfg = config_for(&model_dir(model));
        cfg.pool.dir = pool.clone();
        let state = tempfile::tempdir().unwrap();
        cfg.adapters.state_dir = state.path().to_path_buf();
        let engine = Engine::load(&cfg).unwrap();
        let mut lowest = f32::INFINITY;
        for (text, ids, want) in embedding_reference(&pool) {
            assert_eq!(engine.tokenizer().encode(&text).unwrap(), ids, "{model}: token ids of {text:?}");
            let got = engine.task_embedding(&text).unwrap().expect("the pool has an embedding");
            assert_eq!(got.len(), want.len(), "{model}");
            let cos = crayon::pool::embed::cosine(&got, &want);
            assert!(cos >= min_cos, "{model}: {text:?} cosine {cos} < {min_cos}");
            lowest = lowest.min(cos);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "{model}: {text:?} max |diff| {diff}");
        }
        eprintln!("{model}: lowest cosine to the pool tool's embeddings {lowest:.6}");
    }
}
