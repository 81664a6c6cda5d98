//! Reading lazysnap's Prometheus endpoint the way a scraper does: one plain HTTP GET, and
//! one sample's value picked from the text.

use std::io::{Read, Write};
use std::time::Duration;

/// The text of `GET /metrics` from the daemon's metrics endpoint on `port` (loopback).
pub fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read metrics");
    text
}

/// The value of sample `name` (with its labels, if any, as written) in `text`.
pub fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not in:\n{text}"))
}
