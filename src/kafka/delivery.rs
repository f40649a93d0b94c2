//! What a delivery report says about a row: acknowledged, or failed with an error classified
//! here, in one place: whether it is the row's fault or the cluster's (an outage), whether the
//! producer must be replaced, and the `reason` label the metrics count it under.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::time::SystemTime;

/// Why one record did not reach the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    /// A short, fixed label for metrics (`message_timeout`, `unknown_topic`, ...).
    pub reason: &'static str,
    /// The full error, stored in the row's last-error column.
    pub message: String,
    /// Whether the broker side may accept it later without any change to the row.
    pub transient: bool,
    /// Whether the broker has disowned this producer session (fenced, or lost its sequence
    /// state), so that no later record from it can succeed: the producer must be replaced.
    pub producer_unusable: bool,
}

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker acknowledged it (its report arrived at `at`); its row may be marked published.
    Acked {
        /// When the relay received the acknowledgement.
        at: SystemTime,
    },
    /// It was not delivered; its row stays unpublished and records the error.
    Failed(DeliveryError),
    /// It was not sent because an earlier record of the same key failed before it could be
    /// sent; sending it would have overtaken that record. The row stays unpublished, untouched.
    Deferred,
    /// It was sent and its report had not come when the batch stopped waiting (its partition
    /// stalled while the brokers answered): the record stays in flight, and its report comes
    /// through [`Published::unacknowledged`](crate::kafka::publisher::Published::unacknowledged).
    StillInFlight,
}

pub(crate) fn outcome_of(
    report: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
) -> Outcome {
    match report {
        Ok(Ok(_)) => Outcome::Acked { at: SystemTime::now() },
        Ok(Err((error, _))) => Outcome::Failed(classify(&error)),
        Err(_) => Outcome::Failed(DeliveryError {
            reason: "producer_closed",
            message: "the producer was closed before the delivery report arrived".to_owned(),
            transient: true,
            producer_unusable: true,
        }),
    }
}

/// Labels a Kafka error for metrics and decides whether it is about the record or the cluster.
pub fn classify(error: &KafkaError) -> DeliveryError {
    use RDKafkaErrorCode as C;
    let code = error.rdkafka_error_code();
    // librdkafka recovers an idempotent producer from most of these itself, but a broker that
    // keeps refusing the session (seen with brokers that fence an epoch bump) leaves it stuck;
    // a new producer gets a new producer id and starts clean.
    let producer_unusable = matches!(
        code,
        Some(
            C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::OutOfOrderSequenceNumber
                | C::UnknownProducerId
                | C::InvalidProducerIdMapping
        )
    );
    if producer_unusable {
        return DeliveryError {
            reason: "producer_fenced",
            message: error.to_string(),
            transient: true,
            producer_unusable,
        };
    }
    let (reason, transient) = match code {
        Some(C::MessageTimedOut) => ("message_timeout", true),
        Some(C::QueueFull) => ("queue_full", true),
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => ("unknown_topic", false),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => ("message_too_large", false),
        Some(C::TopicAuthorizationFailed) => ("not_authorized", false),
        // The producer itself may not write (the IdempotentWrite ACL): no row can succeed, so
        // charging each row an attempt would only park every key until `retry --all`. Waited
        // out as an outage: readiness fails and the error is logged until the grant is fixed.
        Some(C::ClusterAuthorizationFailed) => ("not_authorized", true),
        // A timestamp the topic's `message.timestamp.{before,after}.max.ms` refuses (a record
        // timestamp column, `outbox.columns.timestamp`): the record's own, and the broker refuses
        // its whole batch for it.
        Some(C::InvalidRecord | C::InvalidMessage | C::InvalidArgument | C::InvalidTimestamp) => {
            ("invalid_record", false)
        }
        Some(C::AllBrokersDown | C::BrokerTransportFailure) => ("broker_unavailable", true),
        _ => ("other", true),
    };
    DeliveryError { reason, message: error.to_string(), transient, producer_unusable }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_classified_reason_is_a_declared_metric_label() {
        use RDKafkaErrorCode as C;
        let codes = [
            C::MessageTimedOut,
            C::QueueFull,
            C::UnknownTopicOrPartition,
            C::MessageSizeTooLarge,
            C::TopicAuthorizationFailed,
            C::InvalidRecord,
            C::AllBrokersDown,
            C::ProducerFenced,
            C::OutOfOrderSequenceNumber,
            C::RequestTimedOut,
        ];
        for code in codes {
            let failure = classify(&KafkaError::MessageProduction(code));
            assert!(
                crate::service::metrics::PUBLISH_ERROR_REASONS.contains(&failure.reason),
                "{code:?} -> {}",
                failure.reason
            );
        }
    }

    /// The README's table "Broker errors: outage or row". librdkafka retries these itself while
    /// `message.timeout.ms = 0`; should one reach a delivery report (a user's timeout), it must
    /// not count toward `relay.max_attempts`.
    #[test]
    fn a_cluster_fault_is_an_outage_never_the_rows_error() {
        use RDKafkaErrorCode as C;
        let cluster_faults = [
            C::NotEnoughReplicas,
            C::NotEnoughReplicasAfterAppend,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::RequestTimedOut,
            C::OperationTimedOut,
            C::MessageTimedOut,
            C::NetworkException,
            C::KafkaStorageError,
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::Fatal,
            C::ClusterAuthorizationFailed,
        ];
        for code in cluster_faults {
            let failure = classify(&KafkaError::MessageProduction(code));
            assert!(failure.transient && !failure.producer_unusable, "{code:?} -> {failure:?}");
        }
        for code in [C::OutOfOrderSequenceNumber, C::UnknownProducerId, C::InvalidProducerEpoch, C::ProducerFenced] {
            let failure = classify(&KafkaError::MessageProduction(code));
            assert!(failure.transient && failure.producer_unusable, "{code:?}: a new session, not the row's error");
        }
    }

    #[test]
    fn a_fenced_producer_must_be_replaced_but_a_timeout_does_not_need_it() {
        let fenced = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced));
        assert!(fenced.producer_unusable && fenced.transient);
        let timeout = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut));
        assert!(!timeout.producer_unusable && timeout.transient);
        let too_large = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(!too_large.transient, "a record too large for the broker will not fit later either");
        let timestamp = classify(&KafkaError::MessageProduction(RDKafkaErrorCode::InvalidTimestamp));
        assert!(!timestamp.transient && timestamp.reason == "invalid_record", "the row's own timestamp: {timestamp:?}");
    }
}
