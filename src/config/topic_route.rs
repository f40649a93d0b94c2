//! `[outbox.topic_route]`: a row's topic from one column through a regular expression and a
//! replacement, as Debezium's outbox router routes (`route.by.field`, `route.topic.regex`,
//! `route.topic.replacement`), so that a Debezium user's topics come out unchanged.
//!
//! The rule is Kafka Connect's `RegexRouter`: when the whole value matches the expression, the
//! first match is replaced by the replacement and the rest of the value is kept; a value that
//! does not match is the topic itself. The replacement is written as Java writes it (`$1`,
//! `${name}`, `\$` for a literal dollar), because it is copied from a connector's
//! configuration; it is checked against the expression's groups when the relay starts.

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::Identifier;

/// The expression Debezium routes with when `route.topic.regex` is not set.
pub const DEFAULT_ROUTE_REGEX: &str = "(?<routedByValue>.*)";

/// The replacement Debezium routes with when `route.topic.replacement` is not set.
pub const DEFAULT_ROUTE_REPLACEMENT: &str = "outbox.event.${routedByValue}";

/// `[outbox.topic_route]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRouteConfig {
    /// The column routed by (Debezium's `route.by.field`, default there `aggregatetype`).
    pub column: String,
    /// Matched against the whole value (`route.topic.regex`).
    #[serde(default = "default_regex")]
    pub regex: String,
    /// The topic, with `$n` and `${name}` standing for the expression's groups
    /// (`route.topic.replacement`).
    #[serde(default = "default_replacement")]
    pub replacement: String,
}

fn default_regex() -> String {
    DEFAULT_ROUTE_REGEX.to_owned()
}

fn default_replacement() -> String {
    DEFAULT_ROUTE_REPLACEMENT.to_owned()
}

/// A checked route: the column, the expression and the parsed replacement.
#[derive(Debug, Clone)]
pub struct TopicRoute {
    column: Identifier,
    /// The expression anchored at both ends: whether the whole value matches.
    whole: Regex,
    /// The expression as written: the first match, which is what is replaced.
    first: Regex,
    replacement: Vec<Piece>,
}

/// A part of the replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Group(usize),
}

impl TopicRoute {
    /// Checks `config`; the error says which of its keys is wrong and why, for
    /// `outbox.topic_route.<key>`.
    pub fn parse(config: &TopicRouteConfig) -> Result<TopicRoute, (&'static str, String)> {
        let column = Identifier::parse(&config.column).map_err(|p| ("column", p))?;
        let compile = |pattern: &str| {
            Regex::new(pattern).map_err(|e| {
                let why = e.to_string().lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
                ("regex", format!("\"{}\" does not compile: {why}", config.regex))
            })
        };
        let first = compile(&config.regex)?;
        let whole = compile(&format!(r"\A(?:{})\z", config.regex))?;
        let replacement = parse_replacement(&config.replacement, &first).map_err(|p| ("replacement", p))?;
        Ok(TopicRoute { column, whole, first, replacement })
    }

    /// The column routed by.
    pub fn column(&self) -> &Identifier {
        &self.column
    }

    /// The topic for a row whose route column holds `value`.
    pub fn topic(&self, value: Option<&str>) -> Result<String, String> {
        let value = value.ok_or_else(|| format!("topic route column \"{}\" is NULL", self.column.as_str()))?;
        if !self.whole.is_match(value) {
            return Ok(value.to_owned());
        }
        let Some(groups) = self.first.captures(value) else { return Ok(value.to_owned()) };
        let Some(matched) = groups.get(0) else { return Ok(value.to_owned()) };
        let mut topic = String::with_capacity(value.len() + 16);
        topic.push_str(&value[..matched.start()]);
        for piece in &self.replacement {
            match piece {
                Piece::Literal(text) => topic.push_str(text),
                // A group that took no part in the match stands for nothing, as in Java.
                Piece::Group(index) => topic.push_str(groups.get(*index).map_or("", |g| g.as_str())),
            }
        }
        topic.push_str(&value[matched.end()..]);
        Ok(topic)
    }
}

/// Parses a replacement as Java's `Matcher.appendReplacement` reads it: `\x` is `x`, `${name}`
/// a named group, `$` and digits a numbered group (as many digits as still name a group).
fn parse_replacement(replacement: &str, regex: &Regex) -> Result<Vec<Piece>, String> {
    let groups = regex.captures_len() - 1;
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut chars = replacement.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped) => literal.push(escaped),
                None => return Err(format!("\"{replacement}\" ends with '\\'; write '\\\\' for a backslash")),
            },
            '$' => {
                let index = match chars.peek() {
                    Some('{') => {
                        chars.next();
                        let mut name = String::new();
                        loop {
                            match chars.next() {
                                Some('}') => break,
                                Some(c) if c.is_ascii_alphanumeric() => name.push(c),
                                _ => {
                                    return Err(format!(
                                        "\"{replacement}\": a group name is letters and digits closed by '}}'"
                                    ));
                                }
                            }
                        }
                        group_index(regex, &name).ok_or_else(|| {
                            format!("\"{replacement}\" names group \"{name}\", which outbox.topic_route.regex lacks")
                        })?
                    }
                    Some(d) if d.is_ascii_digit() => {
                        let mut index = 0;
                        let mut first = true;
                        while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                            let longer = index * 10 + d as usize;
                            // Java takes a second digit only while the number still names a group.
                            if !first && longer > groups {
                                break;
                            }
                            index = longer;
                            first = false;
                            chars.next();
                        }
                        if index > groups {
                            return Err(format!(
                                "\"{replacement}\" refers to group {index}, but outbox.topic_route.regex has {groups}"
                            ));
                        }
                        index
                    }
                    _ => {
                        return Err(format!(
                            "\"{replacement}\": '$' must be followed by a group number or {{name}}; write '\\$' for a dollar sign"
                        ));
                    }
                };
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Group(index));
            }
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(pieces)
}

fn group_index(regex: &Regex, name: &str) -> Option<usize> {
    regex.capture_names().position(|n| n == Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(regex: &str, replacement: &str) -> Result<TopicRoute, (&'static str, String)> {
        TopicRoute::parse(&TopicRouteConfig {
            column: "aggregatetype".into(),
            regex: regex.into(),
            replacement: replacement.into(),
        })
    }

    #[test]
    fn debeziums_default_route_prefixes_the_value() {
        let route = parse(DEFAULT_ROUTE_REGEX, DEFAULT_ROUTE_REPLACEMENT).unwrap();
        assert_eq!(route.topic(Some("order")).unwrap(), "outbox.event.order");
        assert_eq!(route.topic(Some("")).unwrap(), "outbox.event.");
        assert!(route.topic(None).unwrap_err().contains("\"aggregatetype\" is NULL"));
    }

    #[test]
    fn numbered_and_named_groups_and_escapes_are_read_as_java_reads_them() {
        let route = parse(r"(?<kind>[a-z]+)-(\d+)", r"t.$2.${kind}.\$x").unwrap();
        assert_eq!(route.topic(Some("order-12")).unwrap(), "t.12.order.$x");
        // `$12` with two groups is group 1 followed by a literal 2.
        let route = parse(r"(a)(b)", "$12").unwrap();
        assert_eq!(route.topic(Some("ab")).unwrap(), "a2");
    }

    #[test]
    fn a_value_the_whole_expression_does_not_match_is_the_topic_itself() {
        let route = parse(r"order", "orders").unwrap();
        assert_eq!(route.topic(Some("order")).unwrap(), "orders");
        assert_eq!(route.topic(Some("order-line")).unwrap(), "order-line");
    }

    #[test]
    fn only_the_first_match_is_replaced_and_the_rest_kept_as_kafka_connects_router_does() {
        // A lazy expression matches the whole value, but its first match is empty.
        let route = parse(r"(.*?)", "p.").unwrap();
        assert_eq!(route.topic(Some("order")).unwrap(), "p.order");
    }

    #[test]
    fn bad_expressions_and_replacements_name_their_key() {
        assert_eq!(parse("(unclosed", "x").unwrap_err().0, "regex");
        let (key, problem) = parse("(?<kind>.*)", "${type}").unwrap_err();
        assert_eq!(key, "replacement");
        assert!(problem.contains("\"type\""), "{problem}");
        let (key, problem) = parse("(.*)", "$2").unwrap_err();
        assert_eq!(key, "replacement");
        assert!(problem.contains("group 2"), "{problem}");
        assert_eq!(parse("(.*)", "cost$").unwrap_err().0, "replacement");
        assert_eq!(parse("(.*)", r"x\").unwrap_err().0, "replacement");
    }
}
