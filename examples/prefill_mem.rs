// scratch: peak RSS of one prefill of N tokens, in one pass or in passes of 512
use crayon::{Config, Engine};
fn rss_peak_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmHWM")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a[1].parse().unwrap();
    let chunk: usize = a[2].parse().unwrap();
    let mut cfg = Config::load(std::path::Path::new("crayon.dev.toml")).unwrap();
    cfg.runtime.intra_threads = 2;
    let mut engine = Engine::load(&cfg).unwrap();
    let before = rss_peak_mb();
    let ids: Vec<u32> = (0..n).map(|i| 1000 + (i as u32 % 5000)).collect();
    let dec = engine.decoder_mut();
    let mut cache = dec.new_cache_with_capacity(n).unwrap();
    let t = std::time::Instant::now();
    for c in ids.chunks(chunk) {
        dec.forward(c, &mut cache, 1, None).unwrap();
    }
    println!(
        "n {n} chunk {chunk}: {:.2} s, {:.0} tok/s, peak RSS {:.0} MB (after load {:.0} MB)",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64(),
        rss_peak_mb(),
        before
    );
}
