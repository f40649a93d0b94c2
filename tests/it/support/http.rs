//! The relay's HTTP endpoints as a scraper sees them: a plain GET, `/metrics`, and one sample of
//! the Prometheus text.

/// GETs `path` from `addr`; returns the status code and the body (status 0 when nothing
/// listens there).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Not listening (yet, or any more) reads as status 0, so wait conditions can poll through it.
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(e) => return (0, e.to_string()),
    };
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n").as_bytes()).await.expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// GETs `/metrics` from `addr` and returns the text.
pub async fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample line that starts with `series` (name plus labels).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
