// Apache Kafka's own Java consumer (kafka-clients) reads a topic from its beginning to its end
// and prints one JSON line per record, so a test can check what the relay wrote with a client
// nobody on this project wrote:
//
//   {"partition":0,"offset":3,"key":"k","value":"{...}","headers":[["type","A"],["event_id","..."]],
//    "java_partition":0}
//
// key, value and header values are the bytes as UTF-8 text, or null (a tombstone's value is
// null, never ""). java_partition is the partition Java's default partitioner picks for the key
// and the topic's partition count (null for a keyless record): KafkaProducer.partition() calls
// BuiltInPartitioner.partitionForKey when no partitioner is configured.
//
// Usage (Java 17's source launcher, no build step; the jars of scripts/kafka.sh fetch):
//   java -cp "LIB/*" tests/java/ReadTopic.java BOOTSTRAP_SERVERS TOPIC
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.Instant;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class ReadTopic {
    private static final Duration PATIENCE = Duration.ofSeconds(60);

    public static void main(String[] args) {
        if (args.length != 2) {
            System.err.println("usage: ReadTopic BOOTSTRAP_SERVERS TOPIC");
            System.exit(2);
        }
        String topic = args[1];
        // The records go to the real stdout; anything a logging library on the class path
        // prints goes to stderr, so it cannot mix its lines into the JSON.
        PrintStream out = System.out;
        System.setOut(System.err);

        Properties config = new Properties();
        config.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        config.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        config.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        config.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(config)) {
            List<TopicPartition> partitions = consumer.partitionsFor(topic, PATIENCE).stream()
                    .map(p -> new TopicPartition(topic, p.partition()))
                    .toList();
            if (partitions.isEmpty()) {
                fail("topic " + topic + " does not exist");
            }
            consumer.assign(partitions);
            consumer.seekToBeginning(partitions);
            // Everything written before this program started, and nothing after.
            Map<TopicPartition, Long> end = consumer.endOffsets(partitions, PATIENCE);
            Instant deadline = Instant.now().plus(PATIENCE);
            while (partitions.stream().anyMatch(p -> consumer.position(p, PATIENCE) < end.get(p))) {
                if (Instant.now().isAfter(deadline)) {
                    fail("did not reach the end of " + topic + " within " + PATIENCE);
                }
                for (ConsumerRecord<byte[], byte[]> record : consumer.poll(Duration.ofMillis(200))) {
                    if (record.offset() < end.get(new TopicPartition(topic, record.partition()))) {
                        out.println(json(record, partitions.size()));
                    }
                }
            }
        }
        out.flush();
    }

    private static String json(ConsumerRecord<byte[], byte[]> record, int partitionCount) {
        StringBuilder line = new StringBuilder("{");
        line.append("\"partition\":").append(record.partition());
        line.append(",\"offset\":").append(record.offset());
        line.append(",\"key\":").append(text(record.key()));
        line.append(",\"value\":").append(text(record.value()));
        line.append(",\"headers\":[");
        boolean first = true;
        for (Header header : record.headers()) {
            line.append(first ? "" : ",").append('[').append(quote(header.key())).append(',');
            line.append(text(header.value())).append(']');
            first = false;
        }
        line.append("],\"java_partition\":");
        line.append(record.key() == null
                ? "null"
                : String.valueOf(BuiltInPartitioner.partitionForKey(record.key(), partitionCount)));
        return line.append('}').toString();
    }

    private static String text(byte[] bytes) {
        return bytes == null ? "null" : quote(new String(bytes, StandardCharsets.UTF_8));
    }

    private static String quote(String s) {
        StringBuilder quoted = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> quoted.append("\\\"");
                case '\\' -> quoted.append("\\\\");
                default -> {
                    if (c < 0x20) {
                        quoted.append(String.format("\\u%04x", (int) c));
                    } else {
                        quoted.append(c);
                    }
                }
            }
        }
        return quoted.append('"').toString();
    }

    private static void fail(String message) {
        System.err.println("ReadTopic: " + message);
        System.exit(1);
    }
}
