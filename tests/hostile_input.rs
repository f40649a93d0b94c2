//! Hostile input: whatever the application writes into the outbox table and whatever the
//! operator writes into the configuration, the relay answers with a record, a poison row or a
//! configuration error. It never panics, and nothing of a row that cannot be encoded reaches
//! the topic: a row is published whole or not at all.
//!
//! The row tests run the relay against a real PostgreSQL and broker and read the topic back;
//! the configuration tests throw generated files and environment variables at the real loader.

use outbox_relay::config::ConfigError;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Configuration

/// Every key of the configuration, dotted (`relay.batch_size`), read off the defaults so that
/// keys added later are fuzzed too.
fn config_keys() -> Vec<String> {
    fn walk(table: &toml::Table, prefix: &str, keys: &mut Vec<String>) {
        for (name, value) in table {
            let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            match value {
                toml::Value::Table(inner) => walk(inner, &key, keys),
                _ => keys.push(key),
            }
        }
    }
    let defaults: toml::Table = toml::from_str(&outbox_relay::Config::default().to_redacted_toml()).unwrap();
    let mut keys = Vec::new();
    walk(&defaults, "", &mut keys);
    // librdkafka properties: a few that the relay checks itself, some real ones, and any name.
    for property in ["acks", "enable.idempotence", "transactional.id", "message.max.bytes", "linger.ms", "debug"] {
        keys.push(format!("kafka.properties.{property}"));
    }
    keys
}

fn config_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(config_keys()),
        1 => "[a-z_.]{0,12}\\.[a-z_.]{0,12}",
        1 => any::<String>().prop_map(|name| format!("kafka.properties.{name}")),
    ]
}

/// Values that validators parse: numbers, durations, addresses, URLs, templates, and any text.
fn config_text_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "-?[0-9]{1,25}(ms|s|m|h|d|y)?",
        "postgres(ql)?://[a-z:@%]{0,8}[a-z0-9.]{0,6}(:[0-9a-z]{0,8})?(/[a-z]{0,4})?(\\?[a-z=&]{0,12})?",
        "(host|port|password|user|dbname)\\s?=\\s?'?[a-z0-9 \\\\']{0,8}",
        "[a-z0-9.:\\[\\]]{0,20}",
        "[{}a-z._]{0,16}",
    ]
}

fn config_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        4 => config_text_value().prop_map(toml::Value::String),
        1 => any::<i64>().prop_map(toml::Value::Integer),
        1 => any::<f64>().prop_map(toml::Value::Float),
        1 => any::<bool>().prop_map(toml::Value::Boolean),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|map| toml::Value::Table(map.into_iter().collect())),
        ]
    })
}

/// A TOML document setting some configuration keys (known or not) to generated values.
fn config_document() -> impl Strategy<Value = String> {
    prop::collection::vec((config_key(), config_value()), 0..6).prop_map(|settings| {
        let mut document = toml::Table::new();
        for (key, value) in settings {
            let mut table = &mut document;
            let mut parts: Vec<&str> = key.split('.').collect();
            let last = parts.pop().unwrap_or_default();
            for part in parts {
                let entry = table.entry(part).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if !entry.is_table() {
                    *entry = toml::Value::Table(toml::Table::new());
                }
                table = entry.as_table_mut().unwrap();
            }
            table.insert(last.to_owned(), value);
        }
        toml::to_string(&document).unwrap_or_default()
    })
}

/// A configuration file's bytes: a generated document, any text, or any bytes.
fn config_file() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => config_document().prop_map(String::into_bytes),
        1 => any::<String>().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// An environment variable for the loader: a configuration key in `OUTBOX_RELAY_` form, or any
/// name after the prefix; the value is any text an environment can hold (no NUL).
fn config_env_var() -> impl Strategy<Value = (String, String)> {
    let name = prop_oneof![
        4 => config_key().prop_map(|key| key.to_ascii_uppercase().replace('.', "__")),
        1 => "[A-Za-z0-9_]{0,16}",
    ];
    let value = prop_oneof![config_text_value(), config_value().prop_map(|v| v.to_string())];
    (name, value.prop_map(|v| v.replace('\0', "")))
        .prop_filter("an environment variable name holds no = or NUL", |(name, _)| !name.contains(['=', '\0']))
        .prop_map(|(name, value)| (format!("OUTBOX_RELAY_{name}"), value))
}

/// Loads `file` (if any) and `vars` through [`outbox_relay::Config::load`] in a figment jail
/// (its own directory and environment, restored afterwards).
#[allow(clippy::result_large_err)] // the jail's closure returns figment's own (large) error type
fn load(file: Option<&[u8]>, vars: &[(String, String)]) -> Result<outbox_relay::Config, ConfigError> {
    let mut result = None;
    figment::Jail::expect_with(|jail| {
        let path = jail.directory().join("relay.toml");
        if let Some(bytes) = file {
            std::fs::write(&path, bytes).unwrap();
        }
        for (name, value) in vars {
            jail.set_env(name, value);
        }
        result = Some(outbox_relay::Config::load(file.map(|_| path.as_path())));
        Ok(())
    });
    result.expect("the jail ran")
}

/// A loaded configuration validates again; a refused one says what is wrong. (Its key can be
/// empty: a file that sets the key `""` is refused as an unknown key named "".)
fn assert_loaded_or_refused(result: Result<outbox_relay::Config, ConfigError>) -> Result<(), TestCaseError> {
    match result {
        Ok(config) => prop_assert_eq!(config.validate(), Ok(())),
        Err(error) => prop_assert!(!error.problem.is_empty(), "{:?}", error),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_config_file_loads_or_is_a_config_error(file in config_file()) {
        assert_loaded_or_refused(load(Some(&file), &[]))?;
    }

    #[test]
    fn any_environment_loads_or_is_a_config_error(vars in prop::collection::vec(config_env_var(), 0..5)) {
        assert_loaded_or_refused(load(None, &vars))?;
    }
}

#[test]
fn a_config_file_nested_deeper_than_the_parser_allows_is_a_config_error() {
    let file = format!("x = {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let error = load(Some(file.as_bytes()), &[]).unwrap_err();
    assert_eq!(error.key, "config", "{error}");
}

#[test]
fn a_config_file_that_is_not_utf8_is_a_config_error() {
    let error = load(Some(b"[relay]\nbatch_size = \"\xff\"\n"), &[]).unwrap_err();
    assert!(error.problem.contains("UTF-8"), "{error}");
}

#[test]
fn a_quoted_environment_value_that_figment_cannot_unescape_is_a_config_error_not_a_panic() {
    // figment 0.10.19 slices such a value at a character index; "é" is two bytes, so it panicked.
    let vars = [("OUTBOX_RELAY_LOG__LEVEL".to_owned(), r#""é\n""#.to_owned())];
    let error = load(None, &vars).unwrap_err();
    assert_eq!(error.key, "log.level");
    assert!(error.problem.contains("OUTBOX_RELAY_LOG__LEVEL"), "{error}");
}
