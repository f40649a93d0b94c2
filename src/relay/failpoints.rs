//! Fault injection for the tests (cargo feature `failpoints`): a failpoint that gives a number
//! of milliseconds, for the waits that must not block the loop's thread, as the failpoint's own
//! `sleep` does. Without the feature it never fires.

/// The milliseconds failpoint `name` gives when it fires (`return(MS)`).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub(super) fn millis(name: &str) -> Option<u64> {
    fail::fail_point!(name, |ms| ms.and_then(|ms| ms.parse().ok()));
    None
}
