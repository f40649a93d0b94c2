//! The trace context a writer stored beside its event, in the form Debezium's outbox router
//! reads it (`tracing.span.context.field`): Java properties text, as `Properties.store` writes
//! it, holding the W3C headers (`traceparent=00-...`, and `tracestate=...` when there is one).
//! The relay sends them as record headers, so that the consumer's span joins the writer's trace.

/// The W3C headers a trace context may carry, in the order they are sent.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// The trace headers found in `properties`, in [`TRACE_HEADERS`] order.
pub fn trace_headers(properties: &str) -> Vec<(String, String)> {
    let entries = parse_properties(properties);
    TRACE_HEADERS
        .iter()
        .filter_map(|name| {
            // A repeated key keeps its last value, as `Properties.load` does.
            let value = entries.iter().rev().find(|(key, _)| key == name)?.1.clone();
            Some(((*name).to_owned(), value))
        })
        .collect()
}

/// Reads Java properties text: `key=value`, `key: value` or `key value` per logical line,
/// comments from `#` or `!`, a backslash at a line's end continuing it, `\t \n \r \f \uXXXX`
/// escapes and a backslash before any other character standing for that character.
fn parse_properties(text: &str) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    let mut lines = text.lines();
    while let Some(first) = lines.next() {
        let mut line = first.trim_start_matches([' ', '\t', '\u{0C}']).to_owned();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        while ends_with_odd_backslashes(&line) {
            line.pop();
            match lines.next() {
                Some(next) => line.push_str(next.trim_start_matches([' ', '\t', '\u{0C}'])),
                None => break,
            }
        }
        let (key, value) = split_key(&line);
        entries.push((unescape(key), unescape(value)));
    }
    entries
}

fn ends_with_odd_backslashes(line: &str) -> bool {
    line.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1
}

/// Splits a logical line at the first unescaped `=`, `:` or whitespace; whitespace around the
/// separator belongs to neither side.
fn split_key(line: &str) -> (&str, &str) {
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '=' | ':' => return (&line[..i], line[i + 1..].trim_start_matches([' ', '\t', '\u{0C}'])),
            ' ' | '\t' | '\u{0C}' => {
                let rest = line[i..].trim_start_matches([' ', '\t', '\u{0C}']);
                let rest = rest.strip_prefix(['=', ':']).unwrap_or(rest);
                return (&line[..i], rest.trim_start_matches([' ', '\t', '\u{0C}']));
            }
            _ => {}
        }
    }
    (line, "")
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{0C}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                if let Some(c) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(c);
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn the_w3c_headers_are_read_from_what_properties_store_writes() {
        let stored =
            format!("#Thu Dec 03 10:00:00 UTC 2026\ntraceparent={TRACEPARENT}\ntracestate=congo\\=t61rcWkgMzE\n");
        assert_eq!(
            trace_headers(&stored),
            [
                ("traceparent".to_owned(), TRACEPARENT.to_owned()),
                ("tracestate".to_owned(), "congo=t61rcWkgMzE".to_owned())
            ]
        );
    }

    #[test]
    fn separators_continuations_and_repeats_are_read_as_java_reads_them() {
        let text = format!(
            "! comment\n  traceparent : stale\ntraceparent {}\\\n  {}\n",
            &TRACEPARENT[..20],
            &TRACEPARENT[20..]
        );
        assert_eq!(trace_headers(&text), [("traceparent".to_owned(), TRACEPARENT.to_owned())]);
        assert!(trace_headers("other=1").is_empty());
        assert!(trace_headers("").is_empty());
    }
}
