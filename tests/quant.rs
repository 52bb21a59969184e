//! The 4-bit model folder (`crayon-export --precision q4`) against its float32 reference: the tiny model
//! is exported in both precisions from the same weights on the 4-bit grid (scripts/setup), so the
//! float32 folder is exactly what the 4-bit blocks decode to and one pool serves both.

mod common;

use common::*;
use crayon::model::WeightOverride;
use crayon::{Config, Engine};

fn tiny_q4() -> Config {
    config_for(&model_dir("tiny-q4"))
}

fn with_pool(mut cfg: Config) -> (Config, tempfile::TempDir) {
    cfg.pool.dir = repo().join("models/tiny-pool");
    let state = tempfile::tempdir().unwrap();
    cfg.adapters.state_dir = state.path().to_path_buf();
    (cfg, state)
}

fn top1(logits: &[f32], vocab: usize) -> Vec<usize> {
    logits
        .chunks(vocab)
        .map(|row| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0))
        .collect()
}

fn agreement(a: &[usize], b: &[usize]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len().max(1) as f64
}

/// Pearson correlation of two equally long vectors.
fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().map(|&v| v as f64).sum::<f64>() / n, b.iter().map(|&v| v as f64).sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt().max(1e-30)
}

fn logits(cfg: &Config, ids: &[u32]) -> Vec<f32> {
    Engine::load(cfg).unwrap().logits(None, ids).unwrap()
}

#[test]
fn four_bit_folder_decodes_to_its_float32_reference() {
    let f32_dir = model_dir("tiny");
    let q4 = crayon::model::ModelFiles::open(&model_dir("tiny-q4")).unwrap();
    let reference = crayon::model::ModelFiles::open(&f32_dir).unwrap();
    assert_eq!(q4.manifest.precision, crayon::model::Precision::Q4);
    assert!(q4.computes_with(&reference.manifest.weights_sha256), "decodes_to_sha256 must name the float32 export");

    let base = crayon::weights::WeightFile::open(&f32_dir.join("model.safetensors")).unwrap();
    let quant = crayon::weights::WeightFile::open(&q4.path(&q4.manifest.weights)).unwrap();
    for name in reference.target_weight_names() {
        let (want, got) = (base.f32(&name).unwrap(), quant.dense(&name).unwrap());
        assert!(max_abs_diff(&want, &got) <= 1e-6, "{name} decodes away from the float32 weights");
    }
    let (want, got) = (
        base.f32_row("model.embed_tokens.weight", 7).unwrap(),
        quant.dense_row("model.embed_tokens.weight", 7).unwrap(),
    );
    assert_eq!(want, got, "8-bit embedding rows decode exactly");
}

#[test]
fn four_bit_model_tracks_the_float32_reference() {
    let r = reference(&model_dir("tiny"));
    let vocab = crayon::model::ModelFiles::open(&model_dir("tiny")).unwrap().arch.vocab_size;
    let got = logits(&tiny_q4(), &r.input_ids);
    let diff = max_abs_diff(&got, &r.logits);
    let agree = agreement(&top1(&got, vocab), &top1(&r.logits, vocab));
    // int8 activations (MatMulNBits accuracy level 4) move logits a little; float32 weights do not.
    assert!(diff < 0.5, "4-bit vs float32 reference: max |diff| {diff}");
    assert!(agree >= 0.9, "4-bit vs float32 reference: top-1 agreement {agree}");
}

#[test]
fn reencoding_the_decoded_weights_changes_nothing() {
    // An override of the decoded matrix is re-encoded onto the same grid: the model is unchanged.
    let cfg = tiny_q4();
    let r = reference(&model_dir("tiny"));
    let name = "model.layers.0.mlp.down_proj.weight";
    let quant = crayon::weights::WeightFile::open(&cfg.model.dir.join("model.safetensors")).unwrap();
    let decoded = quant.dense(name).unwrap().into_owned();
    let base = logits(&cfg, &r.input_ids);
    let mut e = Engine::load_with_overrides(&cfg, vec![WeightOverride::dense(name, decoded.clone())]).unwrap();
    let same = e.logits(None, &r.input_ids).unwrap();
    assert!(max_abs_diff(&same, &base) < 1e-5, "re-encoded weights changed the logits");
    let mut e = Engine::load_with_overrides(&cfg, vec![WeightOverride::dense(name, vec![0.0; decoded.len()])]).unwrap();
    assert!(max_abs_diff(&e.logits(None, &r.input_ids).unwrap(), &base) > 1e-3, "an override must take effect");
    let err = Engine::load_with_overrides(&cfg, vec![WeightOverride::dense(name, vec![0.0; 5])]).err().unwrap();
    assert!(err.to_string().contains("has 5 values"), "{err}");
}

#[test]
fn one_member_of_a_fused_projection_is_replaceable() {
    // q, k and v run as one 4-bit product over adjacent tensors: replacing k alone must keep q and v
    // from the file, and must act as replacing k does in the float32 model.
    let cfg = tiny_q4();
    let r = reference(&model_dir("tiny"));
    let name = "model.layers.1.self_attn.k_proj.weight";
    let quant = crayon::weights::WeightFile::open(&cfg.model.dir.join("model.safetensors")).unwrap();
    let decoded = quant.dense(name).unwrap().into_owned();
    let base = logits(&cfg, &r.input_ids);
    let mut e = Engine::load_with_overrides(&cfg, vec![WeightOverride::dense(name, decoded.clone())]).unwrap();
    assert!(max_abs_diff(&e.logits(None, &r.input_ids).unwrap(), &base) < 1e-5, "q and v must come from the file");
    let zero = || vec![WeightOverride::dense(name, vec![0.0; decoded.len()])];
    let q4 = Engine::load_with_overrides(&cfg, zero()).unwrap().logits(None, &r.input_ids).unwrap();
    let f32 = Engine::load_with_overrides(&tiny(), zero()).unwrap().logits(None, &r.input_ids).unwrap();
    assert!(max_abs_diff(&q4, &base) > 1e-3, "the override must take effect");
    let vocab = 49152;
    let agree = agreement(&top1(&q4, vocab), &top1(&f32, vocab));
    assert!(agree >= 0.9, "4-bit and float32 with the same k replaced: top-1 agreement {agree}");
}

#[test]
fn four_bit_blend_keeps_the_blends_effect() {
    // The same blend merged into the float32 model and applied unmerged (low-rank factors beside the
    // 4-bit matrices) on the 4-bit one: what the blend does to the logits (the change against each
    // model's own base) must be the same.
    let r = pool_reference(&repo().join("models/tiny-pool"));
    let vocab = 49152;
    let run = |cfg: Config| {
        let (cfg, _state) = with_pool(cfg);
        let mut e = Engine::load(&cfg).unwrap();
        e.customize_weights("mix", &r.blend_weights).unwrap();
        let blended = e.logits(Some("mix"), &r.input_ids).unwrap();
        let base = e.logits(None, &r.input_ids).unwrap();
        let n = blended.len();
        (blended[n - 4 * vocab..].to_vec(), base[n - 4 * vocab..].to_vec())
    };
    let (f_blend, f_base) = run(tiny());
    assert!(max_abs_diff(&f_blend, &r.blend_logits) < 1e-4, "float32 merge vs PEFT");
    let (q_blend, q_base) = run(tiny_q4());
    let delta = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f32>>();
    let corr = correlation(&delta(&q_blend, &q_base), &delta(&f_blend, &f_base));
    let agree = agreement(&top1(&q_blend, vocab), &top1(&f_blend, vocab));
    eprintln!("4-bit blend: correlation of logit changes {corr:.4}, top-1 agreement with float32 merged {agree:.3}");
    assert!(corr > 0.98, "the 4-bit blend keeps the blend's effect: correlation {corr}");
    assert!(agree >= 0.99, "4-bit blend vs float32 merged: top-1 agreement {agree}");
    let diff = max_abs_diff(&q_blend, &r.blend_logits);
    assert!(diff < 0.5, "4-bit blend vs PEFT: max |diff| {diff}");
}

#[test]
fn task_embeddings_match_across_precisions() {
    let (f, _s1) = with_pool(tiny());
    let (q, _s2) = with_pool(tiny_q4());
    let (f, q) = (Engine::load(&f).unwrap(), Engine::load(&q).unwrap());
    let text = "Question: which planet is largest?\nAnswer:";
    let (a, b) = (f.task_embedding(text).unwrap().unwrap(), q.task_embedding(text).unwrap().unwrap());
    assert!(max_abs_diff(&a, &b) < 1e-5, "the pool sees the same task in both precisions");
}

#[test]
fn shared_and_private_four_bit_weights_give_identical_logits() {
    let r = reference(&model_dir("tiny"));
    let mut private = tiny_q4();
    private.runtime.share_weights = false;
    let (shared, private) = (logits(&tiny_q4(), &r.input_ids), logits(&private, &r.input_ids));
    assert_eq!(shared, private);
}

#[test]
fn unmerged_factors_are_checked_and_rank_zero_is_the_base() {
    use crayon::model::{Decoder, LowRank, ModelFiles};
    let (cfg, _state) = with_pool(tiny_q4());
    let files = ModelFiles::open(&cfg.model.dir).unwrap();
    let rt = crayon::runtime::Runtime::get(&cfg.runtime).unwrap();
    let r = reference(&model_dir("tiny"));
    let mut unmerged = Decoder::load_unmerged(&files, &rt, &cfg.runtime, None).unwrap();
    let mut base = Decoder::load(&files, &rt, &cfg.runtime, None, Vec::new()).unwrap();
    let run = |d: &mut Decoder| {
        let mut cache = d.new_cache().unwrap();
        d.forward(&r.input_ids, &mut cache, 1, None).unwrap()
    };
    assert_eq!(run(&mut unmerged), run(&mut base), "rank-0 factors leave the model unchanged");

    let module = "model.layers.1.mlp.up_proj".to_string();
    let (inp, out) = (files.arch.hidden_size, files.arch.intermediate_size);
    let one = |a: usize, b: usize| LowRank { module: module.clone(), rank: 1, a: vec![0.1; a], b: vec![0.1; b] };
    let mut blended = unmerged.with_factors(&files, vec![one(inp, out)]).unwrap();
    assert!(max_abs_diff(&run(&mut blended), &run(&mut base)) > 1e-4, "factors must take effect");
    assert_eq!(run(&mut unmerged), run(&mut base), "other decoders of the session keep their own factors");
    let err = unmerged.with_factors(&files, vec![one(inp + 1, out)]).err().unwrap().to_string();
    assert!(err.contains("expected"), "{err}");
    let mut bad = one(inp, out);
    bad.module = "model.layers.9.mlp.up_proj".into();
    let err = unmerged.with_factors(&files, vec![bad]).err().unwrap().to_string();
    assert!(err.contains("not an adapter target"), "{err}");
}

#[test]
fn shared_pool_factors_with_scales_equal_the_folded_factors() {
    // A blend as per-rank scales over the pool's factors (built once) must give what the same blend's
    // own factors with the weights folded into B give; zero scales are the base model.
    use crayon::model::{Decoder, ModelFiles};
    use crayon::pool::merge::{self, Composition, PoolFactors};
    let (cfg, _state) = with_pool(tiny_q4());
    let files = ModelFiles::open(&cfg.model.dir).unwrap();
    let pool = crayon::pool::Pool::open(&cfg.pool.dir, &files).unwrap();
    let rt = crayon::runtime::Runtime::get(&cfg.runtime).unwrap();
    let r = reference(&model_dir("tiny"));
    let unmerged = Decoder::load_unmerged(&files, &rt, &cfg.runtime, None).unwrap();
    let mut base = Decoder::load(&files, &rt, &cfg.runtime, None, Vec::new()).unwrap();
    let run = |d: &mut Decoder| {
        let mut cache = d.new_cache().unwrap();
        d.forward(&r.input_ids, &mut cache, 1, None).unwrap()
    };
    let n = pool.adapters.len();
    let weights: Vec<f32> = (0..n).map(|k| (k + 1) as f32).map(|w| w / (n * (n + 1) / 2) as f32).collect();
    let pf = PoolFactors::new(&pool, &files, 2).unwrap();
    let mut scaled = unmerged.with_scales(&pf.shared, pf.scales(&pool, &weights).unwrap()).unwrap();
    let folded = merge::low_rank(&pool, &files, &weights, Composition::Deltas, 2).unwrap();
    let mut folded = unmerged.with_factors(&files, folded).unwrap();
    let (a, b) = (run(&mut scaled), run(&mut folded));
    assert!(max_abs_diff(&a, &run(&mut base)) > 1e-4, "the blend must take effect");
    assert!(max_abs_diff(&a, &b) < 1e-4, "scaled shared factors vs folded factors: {}", max_abs_diff(&a, &b));
    for scales in [pf.scales(&pool, &vec![0.0; n]).unwrap(), Vec::new()] {
        let mut silent = unmerged.with_scales(&pf.shared, scales).unwrap();
        assert!(max_abs_diff(&run(&mut silent), &run(&mut base)) < 1e-5, "zero or no scales: the base model");
    }
    let mut short = pf.scales(&pool, &weights).unwrap();
    short[0].1.pop();
    let err = unmerged.with_scales(&pf.shared, short).err().unwrap().to_string();
    assert!(err.contains("scales for"), "{err}");
}

fn edit_manifest(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("crayon_model.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn broken_four_bit_manifests_are_refused_clearly() {
    use crayon::model::ModelFiles;
    let open_err = |edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = copy_model(&model_dir("tiny-q4"));
        edit_manifest(dir.path(), edit);
        ModelFiles::open(dir.path()).expect_err("must fail").to_string()
    };
    let err = open_err(&|m| m["precision"] = "q8".into());
    assert!(err.contains("unknown variant") && err.contains("q4"), "{err}");
    let err = open_err(&|m| {
        m.as_object_mut().unwrap().remove("quantization");
    });
    assert!(err.contains("block_size"), "{err}");
    let err = open_err(&|m| m["lora_onnx"] = "missing.onnx".into());
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn four_bit_folder_without_the_unmerged_graph_still_customizes() {
    // Folders exported before lora_onnx existed merge and re-quantize (with a warning in the log).
    let dir = copy_model(&model_dir("tiny-q4"));
    edit_manifest(dir.path(), |m| {
        m.as_object_mut().unwrap().remove("lora_onnx");
    });
    let (cfg, _state) = with_pool(config_for(dir.path()));
    let r = pool_reference(&cfg.pool.dir);
    let mut e = Engine::load(&cfg).unwrap();
    e.customize_weights("mix", &r.blend_weights).unwrap();
    let (blend, base) = (e.logits(Some("mix"), &r.input_ids).unwrap(), e.logits(None, &r.input_ids).unwrap());
    assert!(max_abs_diff(&blend, &base) > 1e-3, "the merged 4-bit blend must change the model");
}

/// Copies a folder tree (a pool: pool.json and one folder per adapter).
fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        match entry.file_type().unwrap().is_dir() {
            true => copy_tree(&entry.path(), &to),
            false => drop(std::fs::copy(entry.path(), to).unwrap()),
        }
    }
}

/// (mapped kB, resident kB) of this process's mappings of files under `dir` (/proc/self/smaps).
fn mapped_and_resident_kb(dir: &std::path::Path) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut ours, mut size, mut rss) = (false, 0, 0);
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|f| f.contains('-') && !f.ends_with(':')) {
            ours = fields.get(5).is_some_and(|p| std::path::Path::new(p).starts_with(dir));
        } else if ours {
            let kb = || fields.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            match fields.first() {
                Some(&"Size:") => size += kb(),
                Some(&"Rss:") => rss += kb(),
                _ => {}
            }
        }
    }
    (size, rss)
}

#[test]
fn mapped_model_and_pool_files_are_not_resident_after_loading() {
    // ONNX Runtime keeps packed copies of the 4-bit weights and the engine the pool's concatenated
    // factors, so the mapped files' pages are dropped from the process once loading is done (they are
    // read again from the file if used). Copies, so that no other test's engine maps the same files.
    let model = copy_model(&model_dir("tiny-q4"));
    let pool = tempfile::tempdir().unwrap();
    copy_tree(&repo().join("models/tiny-pool"), pool.path());
    let (mut cfg, _state) = with_pool(config_for(model.path()));
    cfg.pool.dir = pool.path().to_path_buf();
    let engine = Engine::load(&cfg).unwrap();
    for (what, dir) in [("model", model.path()), ("pool", pool.path())] {
        let (mapped, resident) = mapped_and_resident_kb(&dir.canonicalize().unwrap());
        assert!(mapped > 0, "the {what} files stay mapped");
        assert_eq!(resident, 0, "{what}: {resident} of {mapped} kB still resident");
    }
    drop(engine);
}
