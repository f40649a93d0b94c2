//! The names an operator configures: PostgreSQL identifiers (the table, its columns) and topic
//! templates. Both are parsed when the configuration is validated, so a name that could never
//! work is refused at startup with its key; the statements and records are built from the
//! parsed values.

use std::fmt;

/// A PostgreSQL identifier, quoted when written into SQL so that any configured name is taken
/// literally and can never alter a statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identifier(String);

impl Identifier {
    /// Accepts a single identifier such as a column name.
    pub fn parse(name: &str) -> Result<Identifier, String> {
        if name.is_empty() {
            return Err("is empty".to_owned());
        }
        if name.len() > 63 {
            return Err(format!("\"{name}\" is longer than PostgreSQL's 63-byte identifier limit"));
        }
        if name.contains('\0') {
            return Err("contains a NUL character".to_owned());
        }
        Ok(Identifier(name.to_owned()))
    }

    /// Accepts `table` or `schema.table`.
    pub fn parse_qualified(name: &str) -> Result<Vec<Identifier>, String> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 {
            return Err(format!("\"{name}\" has more than one dot; use table or schema.table"));
        }
        parts.into_iter().map(Identifier::parse).collect()
    }

    /// The name as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Identifier {
    /// Writes the identifier double-quoted, doubling embedded quotes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.replace('"', "\"\""))
    }
}

/// A topic built from literal text and column values, such as `outbox.event.{aggregatetype}`.
/// `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Column(Identifier),
}

impl TopicTemplate {
    /// Parses a template; every `{name}` must name a column.
    pub fn parse(template: &str) -> Result<TopicTemplate, String> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(format!("\"{template}\": '{{' without a closing '}}'"));
                            }
                        }
                    }
                    let column = Identifier::parse(name.trim())
                        .map_err(|p| format!("\"{template}\": placeholder {{{name}}} {p}"))?;
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Column(column));
                }
                '}' => {
                    return Err(format!(
                        "\"{template}\": '}}' without an opening '{{'; write '}}}}' for a literal brace"
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        if segments.is_empty() {
            return Err("is empty".to_owned());
        }
        Ok(TopicTemplate { segments })
    }

    /// The columns the template reads, in order of appearance.
    pub fn columns(&self) -> Vec<&Identifier> {
        self.segments
            .iter()
            .filter_map(|s| match s {
                Segment::Column(c) => Some(c),
                Segment::Literal(_) => None,
            })
            .collect()
    }

    /// Fills the template with one row's values, given in the order of [`TopicTemplate::columns`].
    pub fn render(&self, values: &[Option<String>]) -> Result<String, String> {
        let mut topic = String::new();
        let mut values = values.iter();
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => topic.push_str(text),
                Segment::Column(column) => match values.next() {
                    Some(Some(value)) => topic.push_str(value),
                    _ => {
                        return Err(format!("topic template column \"{}\" is NULL", column.as_str()));
                    }
                },
            }
        }
        Ok(topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_so_names_cannot_alter_sql() {
        let id = Identifier::parse("we\"ird").unwrap();
        assert_eq!(id.to_string(), "\"we\"\"ird\"");
    }

    #[test]
    fn a_qualified_table_name_has_at_most_one_dot() {
        assert_eq!(Identifier::parse_qualified("app.outbox").unwrap().len(), 2);
        assert!(Identifier::parse_qualified("a.b.c").is_err());
        assert!(Identifier::parse_qualified("").is_err());
    }

    #[test]
    fn a_template_renders_column_values_and_literal_braces() {
        let t = TopicTemplate::parse("outbox.{aggregatetype}.{{v}}.{type}").unwrap();
        let columns: Vec<&str> = t.columns().iter().map(|c| c.as_str()).collect();
        assert_eq!(columns, ["aggregatetype", "type"]);
        let topic = t.render(&[Some("order".into()), Some("created".into())]).unwrap();
        assert_eq!(topic, "outbox.order.{v}.created");
    }

    #[test]
    fn a_template_with_a_null_column_is_a_row_error_naming_the_column() {
        let t = TopicTemplate::parse("x.{aggregatetype}").unwrap();
        let err = t.render(&[None]).unwrap_err();
        assert!(err.contains("aggregatetype"), "{err}");
    }

    #[test]
    fn malformed_templates_are_rejected() {
        assert!(TopicTemplate::parse("a.{b").is_err());
        assert!(TopicTemplate::parse("a}b").is_err());
        assert!(TopicTemplate::parse("a.{}").is_err());
        assert!(TopicTemplate::parse("").is_err());
    }

    mod hostile {
        //! Configured names and templates are text from the operator and topic values are text from
        //! the application: whatever they hold, parsing and rendering answer, never panic.

        use proptest::prelude::*;

        use super::*;

        /// Any text, and text made mostly of the characters the template syntax gives meaning to.
        fn template_text() -> impl Strategy<Value = String> {
            prop_oneof![any::<String>(), "[{}a. _\"\\x00é]{0,24}"]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_template_is_refused_or_renders_exactly_when_its_columns_have_values(
                template in template_text(),
                values in prop::collection::vec(prop::option::of(any::<String>()), 0..4),
            ) {
                match TopicTemplate::parse(&template) {
                    Ok(parsed) => {
                        let wanted = parsed.columns().len();
                        let all_present = values.len() >= wanted && values[..wanted].iter().all(Option::is_some);
                        prop_assert_eq!(parsed.render(&values).is_ok(), all_present);
                    }
                    Err(reason) => prop_assert!(!reason.is_empty()),
                }
            }

            #[test]
            fn any_name_is_refused_or_quoted_so_that_it_reads_back_literally(name in template_text()) {
                if let Ok(id) = Identifier::parse(&name) {
                    let quoted = id.to_string();
                    let inner = &quoted[1..quoted.len() - 1];
                    prop_assert!(!inner.replace("\"\"", "").contains('"'), "a lone quote would end the identifier");
                    prop_assert_eq!(inner.replace("\"\"", "\""), name.as_str());
                }
                if let Ok(parts) = Identifier::parse_qualified(&name) {
                    prop_assert!(matches!(parts.len(), 1 | 2));
                }
            }
        }
    }
}
