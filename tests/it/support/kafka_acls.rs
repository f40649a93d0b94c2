//! Kafka ACLs for the tests of a broker that enforces them ([`SecuredKafka::start_with_acls`]):
//! the grants a test gives the relay's principal, created through librdkafka's admin API.
//!
//! rust-rdkafka has no call for ACLs, so this module calls librdkafka's C API
//! (`rd_kafka_CreateAcls`, `rd_kafka_DescribeAcls`) through `rdkafka::bindings` on an admin
//! client of the PLAINTEXT listener, whose principal the node takes for a super user. Every
//! answer is checked, and a refusal panics naming the grant: a test must never run with fewer
//! grants than it says.
//!
//! [`SecuredKafka::start_with_acls`]: super::secured_kafka::SecuredKafka::start_with_acls

use std::ffi::{CStr, CString, c_char};
use std::fmt;
use std::time::{Duration, Instant};

use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// How long one admin request may wait for the broker's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// What an ACL lets the principal do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Fetching records (implies `Describe`).
    Read,
    /// Producing records, and for a transactional id, using it (implies `Describe`).
    Write,
    /// Metadata: that the resource exists, its partitions, its coordinator.
    Describe,
    /// Reading a topic's configuration.
    DescribeConfigs,
}

impl Operation {
    fn native(self) -> rd::rd_kafka_AclOperation_t {
        match self {
            Operation::Read => rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_READ,
            Operation::Write => rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_WRITE,
            Operation::Describe => rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_DESCRIBE,
            Operation::DescribeConfigs => rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_DESCRIBE_CONFIGS,
        }
    }
}

/// What an ACL is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// One topic, by its name.
    Topic(String),
    /// Every transactional id that starts with the prefix (`--resource-pattern-type prefixed`).
    TransactionalIdsPrefixed(String),
    /// One consumer group, by its name.
    Group(String),
}

impl Resource {
    fn native(&self) -> (rd::rd_kafka_ResourceType_t, &str, rd::rd_kafka_ResourcePatternType_t) {
        use rd::rd_kafka_ResourcePatternType_t::{
            RD_KAFKA_RESOURCE_PATTERN_LITERAL, RD_KAFKA_RESOURCE_PATTERN_PREFIXED,
        };
        use rd::rd_kafka_ResourceType_t::{
            RD_KAFKA_RESOURCE_GROUP, RD_KAFKA_RESOURCE_TOPIC, RD_KAFKA_RESOURCE_TRANSACTIONAL_ID,
        };
        match self {
            Resource::Topic(name) => (RD_KAFKA_RESOURCE_TOPIC, name, RD_KAFKA_RESOURCE_PATTERN_LITERAL),
            Resource::Group(name) => (RD_KAFKA_RESOURCE_GROUP, name, RD_KAFKA_RESOURCE_PATTERN_LITERAL),
            Resource::TransactionalIdsPrefixed(prefix) => {
                (RD_KAFKA_RESOURCE_TRANSACTIONAL_ID, prefix, RD_KAFKA_RESOURCE_PATTERN_PREFIXED)
            }
        }
    }
}

/// An ACL allowing `operation` on `resource` (to whichever principal it is granted to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    /// What it allows.
    pub operation: Operation,
    /// On what.
    pub resource: Resource,
}

impl Acl {
    /// `operation` on `resource`.
    pub fn allow(operation: Operation, resource: Resource) -> Acl {
        Acl { operation, resource }
    }
}

impl fmt::Display for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.resource {
            Resource::Topic(name) => write!(f, "{:?} on topic {name}", self.operation),
            Resource::Group(name) => write!(f, "{:?} on group {name}", self.operation),
            Resource::TransactionalIdsPrefixed(prefix) => {
                write!(f, "{:?} on the transactional ids {prefix}*", self.operation)
            }
        }
    }
}

/// Grants `acls`, which `principal` (`User:NAME`) must not hold yet, through the super user's
/// listener `brokers`, and waits until the broker's authorizer holds every one: the controller
/// commits an ACL before the broker applies it, and a relay started in between would be refused.
pub fn grant(brokers: &str, principal: &str, acls: &[Acl]) {
    let admin = SuperUser::connect(brokers);
    let held = admin.count_granted(principal) + acls.len();
    admin.create(principal, acls);
    let deadline = Instant::now() + ANSWER_WITHIN;
    while admin.count_granted(principal) < held {
        assert!(Instant::now() < deadline, "the broker did not apply the ACLs of {principal} within {ANSWER_WITHIN:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// An admin client as the super user, and librdkafka's handle of it.
struct SuperUser {
    admin: AdminClient<DefaultClientContext>,
}

impl SuperUser {
    fn connect(brokers: &str) -> SuperUser {
        let admin = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
        SuperUser { admin }
    }

    /// Creates `acls` for `principal`; panics naming the first the broker refused.
    fn create(&self, principal: &str, acls: &[Acl]) {
        let principal = CString::new(principal).expect("a principal without NUL");
        let host = CString::new("*").expect("host");
        let mut bindings: Vec<*mut rd::rd_kafka_AclBinding_t> = Vec::with_capacity(acls.len());
        for acl in acls {
            let (resource_type, name, pattern) = acl.resource.native();
            let name = CString::new(name).expect("a resource name without NUL");
            let mut error = [0 as c_char; 512];
            // SAFETY: every string is NUL-terminated and outlives the call, which copies them;
            // `error` is writable for its length.
            let binding = unsafe {
                rd::rd_kafka_AclBinding_new(
                    resource_type,
                    name.as_ptr(),
                    pattern,
                    principal.as_ptr(),
                    host.as_ptr(),
                    acl.operation.native(),
                    rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW,
                    error.as_mut_ptr(),
                    error.len(),
                )
            };
            // SAFETY: librdkafka NUL-terminates the message it writes into `error`.
            assert!(!binding.is_null(), "ACL {acl}: {}", unsafe { text(error.as_ptr()) });
            bindings.push(binding);
        }
        let queue = Queue::new(&self.admin);
        // SAFETY: the handle and the queue are live; librdkafka copies the bindings, which are
        // freed here after the call.
        unsafe {
            rd::rd_kafka_CreateAcls(
                self.native(),
                bindings.as_mut_ptr(),
                bindings.len(),
                std::ptr::null(),
                queue.native,
            );
            rd::rd_kafka_AclBinding_destroy_array(bindings.as_mut_ptr(), bindings.len());
        }
        let event = queue.answer("CreateAcls");
        // SAFETY: `event` is live until dropped; the results live as long as it.
        let refusals: Vec<String> = unsafe {
            let result = rd::rd_kafka_event_CreateAcls_result(event.native);
            assert!(!result.is_null(), "CreateAcls: the answer is not a CreateAcls result");
            let mut count = 0;
            let results = rd::rd_kafka_CreateAcls_result_acls(result, &mut count);
            assert_eq!(count, acls.len(), "CreateAcls: one result per ACL");
            (0..count)
                .filter_map(|i| {
                    let error = rd::rd_kafka_acl_result_error(*results.add(i));
                    (!error.is_null()).then(|| format!("{}: {}", acls[i], text(rd::rd_kafka_error_string(error))))
                })
                .collect()
        };
        assert!(refusals.is_empty(), "the broker refused ACLs of {principal:?}: {refusals:?}");
    }

    /// How many ACLs of `principal` the broker describes (its authorizer's, as applied).
    fn count_granted(&self, principal: &str) -> usize {
        let principal = CString::new(principal).expect("a principal without NUL");
        let mut error = [0 as c_char; 512];
        // SAFETY: as for `rd_kafka_AclBinding_new`; NULL name and host match any.
        let filter = unsafe {
            rd::rd_kafka_AclBindingFilter_new(
                rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_ANY,
                std::ptr::null(),
                rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_ANY,
                principal.as_ptr(),
                std::ptr::null(),
                rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_ANY,
                rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ANY,
                error.as_mut_ptr(),
                error.len(),
            )
        };
        // SAFETY: librdkafka NUL-terminates the message it writes into `error`.
        assert!(!filter.is_null(), "ACL filter of {principal:?}: {}", unsafe { text(error.as_ptr()) });
        let queue = Queue::new(&self.admin);
        // SAFETY: the handle and the queue are live; librdkafka copies the filter, freed here.
        unsafe {
            rd::rd_kafka_DescribeAcls(self.native(), filter, std::ptr::null(), queue.native);
            rd::rd_kafka_AclBinding_destroy(filter);
        }
        let event = queue.answer("DescribeAcls");
        // SAFETY: `event` is live until dropped.
        unsafe {
            let result = rd::rd_kafka_event_DescribeAcls_result(event.native);
            assert!(!result.is_null(), "DescribeAcls: the answer is not a DescribeAcls result");
            let mut count = 0;
            rd::rd_kafka_DescribeAcls_result_acls(result, &mut count);
            count
        }
    }

    fn native(&self) -> *mut rd::rd_kafka_t {
        self.admin.inner().native_ptr()
    }
}

/// A queue for one admin request's answer; destroyed on drop.
struct Queue {
    native: *mut rd::rd_kafka_queue_t,
}

impl Queue {
    fn new(admin: &AdminClient<DefaultClientContext>) -> Queue {
        // SAFETY: the admin client's handle is live while `admin` is.
        let native = unsafe { rd::rd_kafka_queue_new(admin.inner().native_ptr()) };
        assert!(!native.is_null(), "rd_kafka_queue_new");
        Queue { native }
    }

    /// Waits for the answer to `request`; panics if none comes, or if it is an error.
    fn answer(&self, request: &str) -> Event {
        let within = ANSWER_WITHIN.as_millis() as i32;
        // SAFETY: the queue is live.
        let native = unsafe { rd::rd_kafka_queue_poll(self.native, within) };
        assert!(!native.is_null(), "{request}: no answer within {ANSWER_WITHIN:?}");
        let event = Event { native };
        // SAFETY: the event is live; its error string lives as long as it.
        unsafe {
            let code = rd::rd_kafka_event_error(event.native);
            assert!(
                code == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
                "{request}: {code:?}: {}",
                text(rd::rd_kafka_event_error_string(event.native))
            );
        }
        event
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: created by `rd_kafka_queue_new`, destroyed once.
        unsafe { rd::rd_kafka_queue_destroy(self.native) }
    }
}

/// An admin request's answer; destroyed on drop.
struct Event {
    native: *mut rd::rd_kafka_event_t,
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: returned by `rd_kafka_queue_poll`, destroyed once.
        unsafe { rd::rd_kafka_event_destroy(self.native) }
    }
}

/// A C string of librdkafka's as text; empty for NULL.
///
/// # Safety
/// `text` is NULL or a NUL-terminated string live for the call.
unsafe fn text(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: the caller's promise.
    unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
}
