//! How a statement names its parameters: [`statement_params!`] declares them as an enum whose
//! variants are numbered `$1`, `$2`, ... in the order written. The SQL text writes a parameter
//! as its variant (formatted, it is its `$n`), and the values are passed in the enum's order,
//! each from a `match` over the variants: so a parameter's number is written in one place, and
//! a statement cannot be run with a value missing or in another's place.

/// Declares the parameters of one statement; see the [module](self).
macro_rules! statement_params {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every parameter, in the order the statement numbers them.
            const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value of every parameter, in the order the statement numbers them.
            fn values<'a>(
                value: impl Fn($name) -> $crate::postgres::params::Value<'a>,
            ) -> Vec<$crate::postgres::params::Value<'a>> {
                Self::ALL.iter().map(|param| value(*param)).collect()
            }
        }

        impl std::fmt::Display for $name {
            /// The placeholder the SQL text writes for it: `$1` for the first variant.
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "${}", *self as usize + 1)
            }
        }
    };
}

pub(in crate::postgres) use statement_params;

/// A parameter value as the driver takes it.
pub(in crate::postgres) type Value<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
