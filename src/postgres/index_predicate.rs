//! What rows a partial index holds, read from its predicate as PostgreSQL prints it
//! (`pg_get_expr`): whether every row a query wants is in the index. `outbox-relay check` judges
//! the table's indexes with it, and the relay's session whether the index of failing rows
//! answers the claim's lookup (see [`crate::postgres::layout::Layout::failing_rows_by_key_index`]).

/// Whether a partial index's predicate, as PostgreSQL prints it, is a conjunction of only the
/// `allowed` conditions (so every row the query wants is in the index). No predicate: yes.
///
/// Conditions are compared by meaning for the forms a predicate on these columns takes:
/// `NOT (x IS NOT NULL)` is `x IS NULL`, `attempts >= 1`, `0 < attempts` and `NOT (attempts <= 0)`
/// are `attempts > 0`, and parentheses do not matter. A condition of any other form makes the
/// index count as not covering the query: `check` may then report an index as lacking that
/// the planner could use, never the reverse.
pub fn predicate_within(predicate: Option<&str>, allowed: &[&str]) -> bool {
    let Some(predicate) = predicate else { return true };
    let allowed: Vec<String> = allowed.iter().map(|condition| normalize_condition(condition)).collect();
    conjuncts(predicate).iter().all(|conjunct| allowed.contains(&normalize_condition(conjunct)))
}

/// The conditions of a conjunction, split at its top-level `AND`s (not inside parentheses or
/// quotes).
fn conjuncts(expression: &str) -> Vec<&str> {
    let expression = strip_parentheses(expression);
    let (mut depth, mut quoted, mut start, mut parts) = (0i32, false, 0, Vec::new());
    let bytes = expression.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => quoted = !quoted,
            b'(' if !quoted => depth += 1,
            b')' if !quoted => depth -= 1,
            b' ' if !quoted && depth == 0 && expression[i..].starts_with(" AND ") => {
                parts.push(&expression[start..i]);
                i += " AND ".len();
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&expression[start..]);
    let nested: Vec<&str> = parts.iter().map(|part| strip_parentheses(part)).collect();
    if nested.len() == 1 {
        return nested;
    }
    // `(a AND b) AND c`: a part may itself be a conjunction.
    nested.into_iter().flat_map(conjuncts).collect()
}

/// `expression` without parentheses that enclose all of it.
fn strip_parentheses(expression: &str) -> &str {
    let mut expression = expression.trim();
    while expression.starts_with('(') && expression.ends_with(')') && encloses_all(expression) {
        expression = expression[1..expression.len() - 1].trim();
    }
    expression
}

/// Whether the parenthesis opening `expression` is the one closing it.
fn encloses_all(expression: &str) -> bool {
    let (mut depth, mut quoted) = (0i32, false);
    for (i, c) in expression.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth == 0 {
                    return i == expression.len() - 1;
                }
            }
            _ => {}
        }
    }
    false
}

/// One condition in a canonical form, so that conditions that mean the same compare equal.
fn normalize_condition(condition: &str) -> String {
    let condition = strip_parentheses(condition);
    if let Some(negated) = condition.strip_prefix("NOT ") {
        let inner = strip_parentheses(negated);
        if let Some(operand) = inner.strip_suffix(" IS NOT NULL") {
            return format!("{} IS NULL", strip_parentheses(operand));
        }
        if let Some(operand) = inner.strip_suffix(" IS NULL") {
            return format!("{} IS NOT NULL", strip_parentheses(operand));
        }
        if let Some(operand) = inner.strip_suffix(" <= 0") {
            return format!("{} > 0", strip_parentheses(operand));
        }
        if let Some(operand) = inner.strip_prefix("0 >= ") {
            return format!("{} > 0", strip_parentheses(operand));
        }
        return format!("NOT {inner}");
    }
    // An integer column (the attempts column is one) is above 0 exactly when at least 1.
    if let Some(operand) = condition.strip_suffix(" >= 1") {
        return format!("{} > 0", strip_parentheses(operand));
    }
    if let Some(operand) = condition.strip_prefix("0 < ").or_else(|| condition.strip_prefix("1 <= ")) {
        return format!("{} > 0", strip_parentheses(operand));
    }
    condition.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_predicate_is_accepted_only_when_every_condition_is_one_the_query_also_has() {
        let allowed = ["published_at IS NULL", "attempts > 0"];
        assert!(predicate_within(None, &allowed));
        assert!(predicate_within(Some("(published_at IS NULL)"), &allowed));
        assert!(predicate_within(Some("((published_at IS NULL) AND (attempts > 0))"), &allowed));
        assert!(!predicate_within(Some("(topic = 'orders'::text)"), &allowed), "a subset of rows");
        assert!(!predicate_within(Some("((published_at IS NULL) AND (key IS NOT NULL))"), &allowed));
        assert!(!predicate_within(Some("((published_at IS NULL) OR (attempts > 0))"), &allowed), "a disjunction");
    }

    /// The predicates as PostgreSQL 15 prints them for `WHERE NOT (published_at IS NOT NULL)`,
    /// `WHERE attempts >= 1` and the like: each means a condition the query has.
    #[test]
    fn a_predicate_is_read_for_its_meaning_not_its_spelling() {
        let allowed = ["published_at IS NULL", "attempts > 0"];
        for predicate in [
            "(NOT (published_at IS NOT NULL))",
            "((published_at IS NULL) AND (attempts >= 1))",
            "((NOT (published_at IS NOT NULL)) AND (0 < attempts))",
            "((NOT (attempts <= 0)) AND (published_at IS NULL))",
            "(((published_at IS NULL) AND (attempts > 0)))",
        ] {
            assert!(predicate_within(Some(predicate), &allowed), "{predicate}");
        }
        for predicate in [
            "(NOT (published_at IS NULL))",
            "(attempts >= 2)",
            "(NOT ((published_at IS NULL) AND (attempts > 0)))",
            "(note = 'a AND b'::text)",
        ] {
            assert!(!predicate_within(Some(predicate), &allowed), "{predicate}");
        }
    }
}
