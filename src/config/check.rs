//! What validation collects: a problem per field path (located in the file later, by
//! `spans`), and the small checks every part of `validate` shares.

use std::net::SocketAddr;
use std::time::Duration;

/// A field path and what is wrong with it, before it is located in the file.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub field: String,
    pub message: String,
}

pub(super) struct Check {
    pub(super) problems: Vec<Problem>,
}

impl Check {
    pub(super) fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    pub(super) fn positive(&mut self, field: String, d: Duration) {
        if d.is_zero() {
            self.err(field, "must be greater than zero");
        }
    }

    pub(super) fn range(&mut self, field: String, v: i64, lo: i64, hi: i64) -> usize {
        if v < lo || v > hi {
            self.err(field, format!("must be between {lo} and {hi}, got {v}"));
        }
        v.clamp(lo, hi) as usize
    }
}

pub(super) fn socket_addr(c: &mut Check, field: String, text: &str) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            c.err(field, format!("invalid address {text:?}: expected IP:PORT"));
            None
        }
    }
}
