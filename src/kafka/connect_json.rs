//! Values written as Kafka Connect writes them, so that a record matches, byte for byte, the one
//! Debezium's outbox router writes through Connect's converters:
//!
//! - `JsonConverter` (schemas off) writes JSON with Jackson: compact, strings escaped as Jackson
//!   escapes them (`\u001F`, upper-case hex), doubles as Java's `Double.toString` prints them
//!   (`1.0`, `1.0E-7`);
//! - `SimpleHeaderConverter` writes a header's value as its text, numbers as Java prints them;
//! - Debezium's `table.expand.json.payload` parses the payload with Jackson, infers a Connect
//!   schema from it and rebuilds the value through that schema ([`expand`]), which drops null
//!   fields and empty arrays, and gives every object of an array the fields of all of them.
//!
//! Values are read from PostgreSQL as text; [`ColumnKind`] says which are numbers or booleans.

use crate::postgres::layout::ColumnKind;

/// Appends `text` as a JSON string, escaped as Jackson escapes it: `"` and `\`, the control
/// characters with a short form (`\b \t \n \f \r`) in it, the others as `\u00XX` with upper-case
/// hex, and characters beyond the Basic Multilingual Plane (emoji) as their escaped UTF-16
/// surrogate pair (`\uD83D\uDE00`). Everything else, DEL, U+2028 and é included, is written as
/// is.
pub fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{0C}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => push_unicode_escape(out, c as u16),
            // Jackson writes a character beyond the BMP as its UTF-16 surrogate pair, escaped.
            c if (c as u32) > 0xFFFF => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    push_unicode_escape(out, *unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `\uXXXX` with upper-case hex, as Jackson writes it.
fn push_unicode_escape(out: &mut String, unit: u16) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push_str("\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[usize::from((unit >> shift) & 0xF)] as char);
    }
}

/// `text` as a JSON string.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    push_json_string(&mut out, text);
    out
}

/// A double as Java's `Double.toString` prints it: plain between 10^-3 and 10^7 (`100.5`,
/// `0.001`), computerized scientific notation outside (`1.0E-7`, `1.5E300`), always with a
/// digit after the point. The digits are the shortest that read back as the same double, as
/// Java 19 and later print them.
pub fn java_double(value: f64) -> String {
    java_decimal(value.is_sign_negative(), value.is_finite(), value == 0.0, &format!("{:e}", value.abs()), value)
}

/// A float (PostgreSQL's `real`, Connect's FLOAT32) as Java's `Float.toString` prints it.
pub fn java_float(value: f32) -> String {
    java_decimal(value.is_sign_negative(), value.is_finite(), value == 0.0, &format!("{:e}", value.abs()), value.into())
}

fn java_decimal(negative: bool, finite: bool, zero: bool, scientific: &str, value: f64) -> String {
    if !finite {
        return if value.is_nan() {
            "NaN".to_owned()
        } else if negative {
            "-Infinity".to_owned()
        } else {
            "Infinity".to_owned()
        };
    }
    let sign = if negative { "-" } else { "" };
    if zero {
        return format!("{sign}0.0");
    }
    // `{:e}` gives the shortest digits: "1.5e300", "1e-7".
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-3..7).contains(&exponent) {
        if exponent < 0 {
            let zeros = "0".repeat((-exponent - 1) as usize);
            return format!("{sign}0.{zeros}{digits}");
        }
        let point = exponent as usize + 1;
        let (whole, fraction) = if digits.len() > point {
            (digits[..point].to_owned(), digits[point..].to_owned())
        } else {
            (format!("{digits}{}", "0".repeat(point - digits.len())), "0".to_owned())
        };
        return format!("{sign}{whole}.{fraction}");
    }
    let fraction = if digits.len() > 1 { &digits[1..] } else { "0" };
    format!("{sign}{}.{fraction}E{exponent}", &digits[..1])
}

/// A column's value as JSON, as `JsonConverter` writes the Connect value Debezium makes of it:
/// numbers and booleans bare, doubles as Java prints them, everything else a string. `None`
/// (SQL NULL) is `null`.
pub fn column_json(value: Option<&str>, kind: ColumnKind) -> String {
    let Some(text) = value else { return "null".to_owned() };
    match kind {
        ColumnKind::Integer | ColumnKind::Boolean => text.to_owned(),
        ColumnKind::Double | ColumnKind::Real => {
            let printed = column_header(text, kind);
            // Jackson quotes the non-numbers (NaN, Infinity), which JSON cannot write bare.
            if printed.starts_with(|c: char| c == '-' || c.is_ascii_digit()) && printed != "-Infinity" {
                printed
            } else {
                json_string(&printed)
            }
        }
        ColumnKind::Text => json_string(text),
    }
}

/// A column's value as a header's text, as `SimpleHeaderConverter` writes it: its text, with
/// doubles and reals printed as Java prints them.
pub fn column_header(text: &str, kind: ColumnKind) -> String {
    match kind {
        ColumnKind::Double => text.parse::<f64>().map(java_double).unwrap_or_else(|_| text.to_owned()),
        ColumnKind::Real => text.parse::<f32>().map(java_float).unwrap_or_else(|_| text.to_owned()),
        ColumnKind::Integer | ColumnKind::Boolean | ColumnKind::Text => text.to_owned(),
    }
}

/// The payload expanded as Debezium's `table.expand.json.payload` does, then written by
/// `JsonConverter`; `None` when Debezium would send it as a string instead. That is a payload
/// that does not start with `{` or `[` or is not JSON, and one whose schema cannot be inferred
/// (an array mixing types, or numbers of different widths, or only nulls). A payload whose
/// schema is inferred but whose values do not fit it (a top-level array; an object in an array
/// whose field has another type than in the first object) stops Debezium's task; it is sent as
/// a string here.
pub fn expand(payload: &str) -> Option<String> {
    if !(payload.starts_with('{') || payload.starts_with('[')) {
        return None;
    }
    let node = Parser { text: payload.as_bytes(), at: 0, depth: 0 }.value().ok()?;
    let schema = infer(&node).ok()??;
    if !matches!(schema, Schema::Struct(_)) {
        return None;
    }
    let mut out = String::with_capacity(payload.len());
    write_value(&mut out, &node, &schema).ok()?;
    Some(out)
}

/// A JSON value as Jackson reads it: integers as int, long or big integer by size, every
/// number with a fraction or exponent as a double, object fields in order (a repeated name keeps
/// its first place and its last value).
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    Int(i32),
    Long(i64),
    BigInteger,
    Double(f64),
    Str(String),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

/// The Connect schema Debezium infers for a value.
#[derive(Debug, Clone, PartialEq)]
enum Schema {
    Str,
    Bool,
    Int32,
    Int64,
    Float64,
    Array(Box<Schema>),
    Struct(Vec<(String, Schema)>),
}

/// Why no schema: Debezium throws, and the payload stays a string.
struct Unexpandable;

/// The schema of `node`; `None` for what Debezium leaves out (null, an empty array).
fn infer(node: &Node) -> Result<Option<Schema>, Unexpandable> {
    Ok(Some(match node {
        Node::Null => return Ok(None),
        Node::Bool(_) => Schema::Bool,
        Node::Int(_) => Schema::Int32,
        Node::Long(_) => Schema::Int64,
        Node::BigInteger | Node::Double(_) => Schema::Float64,
        Node::Str(_) => Schema::Str,
        Node::Array(elements) if elements.is_empty() => return Ok(None),
        Node::Array(elements) => Schema::Array(Box::new(element_schema(elements)?)),
        Node::Object(fields) => {
            let mut schema: Vec<(String, Schema)> = Vec::with_capacity(fields.len());
            for (name, value) in fields {
                if let Some(field) = infer(value)?
                    && !schema.iter().any(|(seen, _)| seen == name)
                {
                    schema.push((name.clone(), field));
                }
            }
            Schema::Struct(schema)
        }
    }))
}

/// The schema of an array's elements, from its first non-null element: every other non-null
/// element must be of the same JSON type (and a number of the same width); objects merge their
/// fields, the first object's type of a field winning.
fn element_schema(elements: &[Node]) -> Result<Schema, Unexpandable> {
    let mut present = elements.iter().filter(|e| **e != Node::Null);
    let Some(sample) = present.next() else { return Err(Unexpandable) };
    let sample_schema = infer(sample)?;
    for element in present.clone() {
        let same_type = std::mem::discriminant(&json_type(element)) == std::mem::discriminant(&json_type(sample));
        let same_width = !matches!(json_type(sample), JsonType::Number) || infer(element)? == sample_schema;
        if !same_type || !same_width {
            return Err(Unexpandable);
        }
    }
    if let Node::Object(_) = sample {
        let mut merged: Vec<(String, Schema)> = Vec::new();
        for element in std::iter::once(sample).chain(present) {
            if let Some(Schema::Struct(fields)) = infer(element)? {
                for (name, field) in fields {
                    if !merged.iter().any(|(seen, _)| *seen == name) {
                        merged.push((name, field));
                    }
                }
            }
        }
        return Ok(Schema::Struct(merged));
    }
    sample_schema.ok_or(Unexpandable)
}

/// JSON's own types, as Jackson's node types tell them apart.
enum JsonType {
    Bool,
    Number,
    Str,
    Array,
    Object,
    Null,
}

fn json_type(node: &Node) -> JsonType {
    match node {
        Node::Null => JsonType::Null,
        Node::Bool(_) => JsonType::Bool,
        Node::Int(_) | Node::Long(_) | Node::BigInteger | Node::Double(_) => JsonType::Number,
        Node::Str(_) => JsonType::Str,
        Node::Array(_) => JsonType::Array,
        Node::Object(_) => JsonType::Object,
    }
}

/// Writes `node` through `schema` as `JsonConverter` writes the rebuilt value: every field of a
/// struct in the schema's order, `null` where the object lacks it. A value of another type than
/// its schema's fails, as Connect's validation does.
fn write_value(out: &mut String, node: &Node, schema: &Schema) -> Result<(), Unexpandable> {
    match (node, schema) {
        (Node::Null, _) => out.push_str("null"),
        (Node::Bool(b), Schema::Bool) => out.push_str(if *b { "true" } else { "false" }),
        (Node::Int(i), Schema::Int32) => out.push_str(&i.to_string()),
        (Node::Long(l), Schema::Int64) => out.push_str(&l.to_string()),
        (Node::Double(d), Schema::Float64) => {
            let printed = java_double(*d);
            if d.is_finite() { out.push_str(&printed) } else { push_json_string(out, &printed) }
        }
        (Node::Str(s), Schema::Str) => push_json_string(out, s),
        (Node::Array(elements), Schema::Array(element)) => {
            out.push('[');
            for (i, e) in elements.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, e, element)?;
            }
            out.push(']');
        }
        (Node::Object(fields), Schema::Struct(schema)) => {
            out.push('{');
            for (i, (name, field_schema)) in schema.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_string(out, name);
                out.push(':');
                // The last value of a repeated name, as Jackson keeps it.
                match fields.iter().rev().find(|(n, _)| n == name) {
                    Some((_, value)) => write_value(out, value, field_schema)?,
                    None => out.push_str("null"),
                }
            }
            out.push('}');
        }
        _ => return Err(Unexpandable),
    }
    Ok(())
}

/// Nesting deeper than this is refused, as Jackson's default read constraints refuse it.
const MAX_DEPTH: usize = 1000;

/// Reads the first JSON value of a text, as Jackson's `readTree` does (what follows it is not
/// read).
struct Parser<'a> {
    text: &'a [u8],
    at: usize,
    depth: usize,
}

impl Parser<'_> {
    fn value(&mut self) -> Result<Node, Unexpandable> {
        self.skip_whitespace();
        match self.text.get(self.at).copied().ok_or(Unexpandable)? {
            b'{' => self.nested(Self::object),
            b'[' => self.nested(Self::array),
            b'"' => self.string().map(Node::Str),
            b't' => self.literal("true", Node::Bool(true)),
            b'f' => self.literal("false", Node::Bool(false)),
            b'n' => self.literal("null", Node::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(Unexpandable),
        }
    }

    fn nested(&mut self, read: fn(&mut Self) -> Result<Node, Unexpandable>) -> Result<Node, Unexpandable> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Unexpandable);
        }
        self.at += 1;
        let node = read(self);
        self.depth -= 1;
        node
    }

    fn object(&mut self) -> Result<Node, Unexpandable> {
        let mut fields: Vec<(String, Node)> = Vec::new();
        self.skip_whitespace();
        if self.eat(b'}') {
            return Ok(Node::Object(fields));
        }
        loop {
            self.skip_whitespace();
            if self.text.get(self.at) != Some(&b'"') {
                return Err(Unexpandable);
            }
            let name = self.string()?;
            self.skip_whitespace();
            if !self.eat(b':') {
                return Err(Unexpandable);
            }
            let value = self.value()?;
            match fields.iter_mut().find(|(seen, _)| *seen == name) {
                Some(field) => field.1 = value,
                None => fields.push((name, value)),
            }
            self.skip_whitespace();
            if self.eat(b'}') {
                return Ok(Node::Object(fields));
            }
            if !self.eat(b',') {
                return Err(Unexpandable);
            }
        }
    }

    fn array(&mut self) -> Result<Node, Unexpandable> {
        let mut elements = Vec::new();
        self.skip_whitespace();
        if self.eat(b']') {
            return Ok(Node::Array(elements));
        }
        loop {
            elements.push(self.value()?);
            self.skip_whitespace();
            if self.eat(b']') {
                return Ok(Node::Array(elements));
            }
            if !self.eat(b',') {
                return Err(Unexpandable);
            }
        }
    }

    fn string(&mut self) -> Result<String, Unexpandable> {
        self.at += 1;
        let mut out = String::new();
        loop {
            let start = self.at;
            while let Some(&b) = self.text.get(self.at) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.at += 1;
            }
            out.push_str(std::str::from_utf8(&self.text[start..self.at]).map_err(|_| Unexpandable)?);
            match self.text.get(self.at).copied().ok_or(Unexpandable)? {
                b'"' => {
                    self.at += 1;
                    return Ok(out);
                }
                b'\\' => {
                    self.at += 1;
                    let escaped = self.text.get(self.at).copied().ok_or(Unexpandable)?;
                    self.at += 1;
                    out.push(match escaped {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{08}',
                        b'f' => '\u{0C}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err(Unexpandable),
                    });
                }
                _ => return Err(Unexpandable),
            }
        }
    }

    /// `\uXXXX`, joined with a following low surrogate when it is a high one.
    fn unicode_escape(&mut self) -> Result<char, Unexpandable> {
        let high = self.hex4()?;
        if (0xD800..0xDC00).contains(&high) && self.text.get(self.at..self.at + 2) == Some(b"\\u") {
            self.at += 2;
            let low = self.hex4()?;
            let code = 0x10000 + ((high - 0xD800) << 10) + (low.wrapping_sub(0xDC00) & 0x3FF);
            return char::from_u32(code).ok_or(Unexpandable);
        }
        // A lone surrogate cannot be written as UTF-8; Jackson would keep it, PostgreSQL never stores it.
        char::from_u32(high).ok_or(Unexpandable)
    }

    fn hex4(&mut self) -> Result<u32, Unexpandable> {
        let digits = self.text.get(self.at..self.at + 4).ok_or(Unexpandable)?;
        let digits = std::str::from_utf8(digits).map_err(|_| Unexpandable)?;
        self.at += 4;
        u32::from_str_radix(digits, 16).map_err(|_| Unexpandable)
    }

    fn number(&mut self) -> Result<Node, Unexpandable> {
        let start = self.at;
        self.eat(b'-');
        let int_start = self.at;
        while self.text.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        let int_digits = &self.text[int_start..self.at];
        if int_digits.is_empty() || (int_digits.len() > 1 && int_digits[0] == b'0') {
            return Err(Unexpandable);
        }
        let mut fractional = false;
        if self.eat(b'.') {
            fractional = true;
            let digits = self.at;
            while self.text.get(self.at).is_some_and(u8::is_ascii_digit) {
                self.at += 1;
            }
            if self.at == digits {
                return Err(Unexpandable);
            }
        }
        if self.eat(b'e') || self.eat(b'E') {
            fractional = true;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            let digits = self.at;
            while self.text.get(self.at).is_some_and(u8::is_ascii_digit) {
                self.at += 1;
            }
            if self.at == digits {
                return Err(Unexpandable);
            }
        }
        let text = std::str::from_utf8(&self.text[start..self.at]).map_err(|_| Unexpandable)?;
        if fractional {
            return text.parse::<f64>().map(Node::Double).map_err(|_| Unexpandable);
        }
        Ok(match text.parse::<i64>() {
            Ok(n) => i32::try_from(n).map_or(Node::Long(n), Node::Int),
            Err(_) => Node::BigInteger,
        })
    }

    fn literal(&mut self, word: &str, node: Node) -> Result<Node, Unexpandable> {
        if self.text.get(self.at..self.at + word.len()) == Some(word.as_bytes()) {
            self.at += word.len();
            Ok(node)
        } else {
            Err(Unexpandable)
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.text.get(self.at) == Some(&byte);
        if found {
            self.at += 1;
        }
        found
    }

    fn skip_whitespace(&mut self) {
        while self.text.get(self.at).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn doubles_are_printed_as_java_prints_them() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (100.5, "100.5"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (1e-7, "1.0E-7"),
            (0.001, "0.001"),
            (0.000_999, "9.99E-4"),
            (9_999_999.0, "9999999.0"),
            (10_000_000.0, "1.0E7"),
            (1.5e300, "1.5E300"),
            (123_456.789, "123456.789"),
            (-2.5e-10, "-2.5E-10"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (value, java) in cases {
            assert_eq!(java_double(value), java, "{value:e}");
        }
        assert_eq!(java_float(0.1), "0.1");
        assert_eq!(java_float(1e10), "1.0E10");
    }

    #[test]
    fn strings_are_escaped_as_jackson_escapes_them() {
        assert_eq!(json_string("a\"b\\c/d"), r#""a\"b\\c/d""#);
        assert_eq!(json_string("\n\t\r\u{08}\u{0C}"), r#""\n\t\r\b\f""#);
        assert_eq!(json_string("\u{01}\u{1F}\u{7F}\u{2028}é😀"), "\"\\u0001\\u001F\u{7F}\u{2028}é\\uD83D\\uDE00\"");
    }

    #[test]
    fn column_values_are_written_as_their_connect_types() {
        assert_eq!(column_json(Some("42"), ColumnKind::Integer), "42");
        assert_eq!(column_json(Some("true"), ColumnKind::Boolean), "true");
        assert_eq!(column_json(Some("1"), ColumnKind::Double), "1.0");
        assert_eq!(column_json(Some("NaN"), ColumnKind::Double), "\"NaN\"");
        assert_eq!(column_json(Some("OrderCreated"), ColumnKind::Text), "\"OrderCreated\"");
        assert_eq!(column_json(None, ColumnKind::Text), "null");
        assert_eq!(column_header("1e+300", ColumnKind::Double), "1.0E300");
        assert_eq!(column_header("7", ColumnKind::Integer), "7");
    }

    #[test]
    fn an_expanded_payload_is_compact_in_its_fields_order_without_nulls_or_empty_arrays() {
        let expanded = expand(r#"{"b": 1, "a": {"x": null, "y": [], "z": "s"}, "n": null, "d": 1.0}"#);
        assert_eq!(expanded.as_deref(), Some(r#"{"b":1,"a":{"z":"s"},"d":1.0}"#));
        assert_eq!(expand("{}").as_deref(), Some("{}"));
        assert_eq!(expand(r#"{"big": 2147483648, "small": -1}"#).as_deref(), Some(r#"{"big":2147483648,"small":-1}"#));
    }

    #[test]
    fn objects_in_an_array_get_every_field_of_any_of_them() {
        let expanded = expand(r#"{"lines": [{"sku": "a", "qty": 1}, {"sku": "b", "note": "gift"}]}"#);
        assert_eq!(
            expanded.as_deref(),
            Some(r#"{"lines":[{"sku":"a","qty":1,"note":null},{"sku":"b","qty":null,"note":"gift"}]}"#)
        );
    }

    pub(crate) mod hostile {
        //! Whatever a payload holds, expansion returns JSON or leaves it a string, never panics;
        //! strings and doubles read back as what was written.

        use proptest::prelude::*;
        use serde_json::Value;

        use super::*;

        /// Any JSON document (finite numbers), nested a few levels, with object keys from `keys`.
        pub(crate) fn any_json<K>(keys: K) -> impl Strategy<Value = Value>
        where
            K: Strategy<Value = String> + Clone + 'static,
        {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
                any::<String>().prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 32, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(keys.clone(), inner, 0..6)
                        .prop_map(|map| Value::Object(map.into_iter().collect())),
                ]
            })
        }

        fn json() -> impl Strategy<Value = Value> {
            any_json("[a-z]{0,3}")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn an_expanded_payload_is_json_and_keeps_every_non_null_scalar(value in json()) {
                let text = value.to_string();
                if let Some(expanded) = expand(&text) {
                    let back: Value = serde_json::from_str(&expanded).expect("expansion writes JSON");
                    prop_assert!(back.is_object());
                    fn strings(v: &Value, out: &mut Vec<String>) {
                        match v {
                            Value::String(s) => out.push(s.clone()),
                            Value::Array(a) => a.iter().for_each(|e| strings(e, out)),
                            Value::Object(o) => o.values().for_each(|e| strings(e, out)),
                            _ => {}
                        }
                    }
                    let (mut before, mut after) = (Vec::new(), Vec::new());
                    strings(&value, &mut before);
                    strings(&back, &mut after);
                    before.sort();
                    after.sort();
                    prop_assert_eq!(before, after, "every string survives, none is made up");
                }
            }

            #[test]
            fn any_text_expands_or_not_without_panicking(text in any::<String>()) {
                let _ = expand(&text);
                let _ = expand(&format!("{{\"a\": {text}}}"));
            }

            #[test]
            fn a_json_string_reads_back_as_the_text(text in any::<String>()) {
                prop_assert_eq!(serde_json::from_str::<String>(&json_string(&text)).unwrap(), text);
            }

            #[test]
            fn a_java_double_reads_back_as_the_double(value in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
                prop_assert_eq!(java_double(value).parse::<f64>().unwrap(), value);
            }
        }

        #[test]
        fn nesting_deeper_than_jackson_reads_is_not_expanded() {
            let deep = format!("{}1{}", "{\"a\":".repeat(2000), "}".repeat(2000));
            assert_eq!(expand(&deep), None);
        }
    }

    #[test]
    fn payloads_debezium_cannot_expand_stay_strings() {
        for payload in [
            r#""text""#,
            "42",
            r#" {"a": 1}"#,
            r#"{"mixed": [1, "a"]}"#,
            r#"{"widths": [1, 2147483648]}"#,
            r#"{"nulls": [null, null]}"#,
            r#"{"huge": 9223372036854775808}"#,
            "[1, 2]",
            r#"{"lines": [{"q": 1}, {"q": "x"}]}"#,
            "{not json",
        ] {
            assert_eq!(expand(payload), None, "{payload}");
        }
    }
}
