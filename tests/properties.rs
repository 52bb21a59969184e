//! Property tests (issue #14) on the parsers that hostile local clients and damaged files reach: the
//! socket's framing and requests, the config, and stored adapter state. On arbitrary input each one
//! either succeeds with its invariants kept or fails with an error — never a panic, never a state
//! that breaks the service later.

use std::path::Path;

use crayon::adapters::AdapterStore;
use crayon::socket::proto::{self, HEADER, Split};
use proptest::prelude::*;
use serde_json::{Value, json};

/// JSON values of any shape, a few levels deep (what a client can put in a frame or a state file).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        // Binary fractions: serde_json's default float parser is not exact to the last bit for all f64.
        any::<i16>().prop_map(|i| Value::from(f64::from(i) / 8.0)),
        "[a-z_]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("op".to_string()),
                    Just("id".to_string()),
                    Just("body".to_string()),
                    Just("target".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Whatever the bytes, the split says exactly what the 4-byte prefix and the limit allow.
    #[test]
    fn frame_splitting_is_exact_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..48), max in 0usize..40) {
        let declared = (bytes.len() >= HEADER).then(|| u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize);
        match (proto::split_frame(&bytes, max), declared) {
            (Split::Incomplete, None) => {}
            (Split::Incomplete, Some(n)) => prop_assert!(n > 0 && n <= max && bytes.len() < HEADER + n),
            (Split::Frame(n), Some(d)) => prop_assert!(n == d && n > 0 && n <= max && bytes.len() >= HEADER + n),
            (Split::Oversized(n), Some(d)) => prop_assert!(n == d && (n == 0 || n > max)),
            (other, d) => prop_assert!(false, "{other:?} with prefix {d:?}"),
        }
    }

    /// Any JSON value survives framing and splitting unchanged, even when it arrives in pieces.
    #[test]
    fn frames_round_trip_in_pieces(v in json_value(), cut in 0usize..64) {
        let f = proto::frame(&v);
        let cut = cut.min(f.len());
        if cut < f.len() {
            prop_assert_eq!(proto::split_frame(&f[..cut], 1 << 20), Split::Incomplete);
        }
        let Split::Frame(n) = proto::split_frame(&f, 1 << 20) else { panic!("a whole frame") };
        prop_assert_eq!(serde_json::from_slice::<Value>(&f[HEADER..HEADER + n]).unwrap(), v);
    }

    /// A request body of any shape parses or is refused; what parses re-serializes to a request that
    /// parses again (the socket answers refusals with `malformed`, never by dropping the connection).
    #[test]
    fn requests_of_any_shape_parse_or_are_refused(v in json_value()) {
        if let Ok(r) = serde_json::from_value::<proto::Request>(v) {
            let again = serde_json::to_value(&r).unwrap();
            prop_assert!(serde_json::from_value::<proto::Request>(again).is_ok());
        }
    }

    /// Config text of any shape within the schema's tables parses or is refused with a message; a
    /// config that parses has passed validation (positive limits, known modes).
    #[test]
    fn config_parses_or_is_refused(
        table in prop_oneof![Just("server"), Just("socket"), Just("router"), Just("adapters"), Just("blend"), Just("generation")],
        key in prop_oneof![
            prop::sample::select(vec!["max_concurrent", "max_connections", "max_frame_bytes", "mode", "temperature", "top_k", "cache_mb"]).prop_map(String::from),
            "[a-z_]{1,12}",
        ],
        value in prop_oneof![Just("0".to_string()), Just("-1".to_string()), Just("1e309".to_string()), Just("\"x\"".to_string()), Just("[]".to_string()), any::<i32>().prop_map(|i| i.to_string()), any::<f32>().prop_map(|f| format!("{f:?}"))],
    ) {
        let text = format!("[{table}]\n{key} = {value}\n");
        match crayon::Config::parse(&text, Path::new("/")) {
            Ok(cfg) => prop_assert!(cfg.server.max_concurrent > 0 && cfg.socket.max_connections > 0),
            Err(msg) => prop_assert!(!msg.is_empty()),
        }
    }

    /// State files of any content never stop the store from opening, and only well-formed ones load:
    /// named as their file, a distribution of weights, one-width finite embeddings.
    #[test]
    fn stored_state_of_any_shape_loads_only_when_valid(v in json_value(), weights in proptest::collection::vec(-1.0f32..2.0, 0..4)) {
        let dir = tempfile::tempdir().unwrap();
        let adapters = dir.path().join("adapters");
        std::fs::create_dir_all(&adapters).unwrap();
        std::fs::write(adapters.join("junk.json"), v.to_string()).unwrap();
        let n = weights.len();
        let state = json!({"name": "w", "pool_id": "p", "adapters": vec!["a"; n], "weights": weights,
                           "similarities": vec![0.0; n], "example_digest": "d", "example_count": 1, "created_unix": 0});
        std::fs::write(adapters.join("w.json"), state.to_string()).unwrap();
        let store = AdapterStore::open(dir.path()).unwrap();
        let sum: f32 = weights.iter().sum();
        let valid = weights.iter().all(|w| *w >= 0.0) && (sum - 1.0).abs() <= 1e-3;
        prop_assert_eq!(store.get("w").is_some(), valid);
        for c in store.list() {
            prop_assert!(c.weights.iter().all(|w| w.is_finite() && *w >= 0.0));
        }
    }
}
